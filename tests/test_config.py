"""Config loading: strict keys with did-you-mean, types, ranges, overrides, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from forgetkit.config import (
    ConfigError,
    apply_overrides,
    config_from_dict,
    dump_config,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path: Path, raw: dict) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(raw))
    return p


def base() -> dict:
    return {"name": "x", "model": {"name_or_path": "gpt2"},
            "data": {"train": {"path": "d.jsonl"}}}


def test_defaults_and_roundtrip():
    cfg = config_from_dict(base())
    assert cfg.training.max_grad_norm == 1.0
    assert cfg.training.min_lr_ratio == 0.1
    again = config_from_dict(yaml.safe_load(dump_config(cfg)))
    assert again == cfg


def test_unknown_key_did_you_mean(tmp_path):
    raw = base()
    raw["training"] = {"lrr": 1e-4}
    p = write(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert str(p) in msg and "training.lrr" in msg and "did you mean 'training.lr'" in msg
    assert "\n" not in msg


def test_unknown_section(tmp_path):
    raw = base()
    raw["trainig"] = {}
    with pytest.raises(ConfigError, match="did you mean 'training'"):
        load_config(write(tmp_path, raw))


@pytest.mark.parametrize("key,value,expect", [
    ("lr", -1.0, "training.lr: expected a value > 0.0"),
    ("lr", "fast", "training.lr: expected a number"),
    ("micro_batch_size", 2.5, "training.micro_batch_size: expected an integer"),
    ("scheduler", "cosin", "did you mean 'cosine'"),
    ("resume", "yes", "training.resume: expected true or false"),
    ("betas", [0.9], "training.betas: expected two numbers"),
])
def test_bad_values(tmp_path, key, value, expect):
    raw = base()
    raw["training"] = {key: value}
    with pytest.raises(ConfigError, match=expect.replace("(", r"\(")):
        load_config(write(tmp_path, raw))


def test_yaml_scientific_notation_string_accepted(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: {name_or_path: gpt2}\ndata: {train: {path: d.jsonl}}\n"
                 "training: {lr: 1e-5}\n")  # PyYAML reads 1e-5 (no dot) as a string
    assert load_config(p).training.lr == 1e-5


def test_overrides(tmp_path):
    p = write(tmp_path, base())
    cfg = load_config(p, ["training.lr=3e-4", "data.max_length=64", "regularizers=[]"])
    assert cfg.training.lr == 3e-4 and cfg.data.max_length == 64
    with pytest.raises(ConfigError, match="command-line overrides.*training.lrr.*did you mean"):
        load_config(p, ["training.lrr=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["training.lr"])


def test_mapping_override_merges_into_the_section(tmp_path):
    # an arm's `training: {max_grad_norm: null}` must change that key only, not reset the section
    p = write(tmp_path, base())
    ref = load_config(p, ["training.lr=3e-4", "training.max_steps=7"])
    cfg = load_config(p, ["training.lr=3e-4", "training.max_steps=7",
                          "training={max_grad_norm: null}"])
    assert cfg.training.max_grad_norm is None and ref.training.max_grad_norm == 1.0
    assert (cfg.training.lr, cfg.training.max_steps) == (3e-4, 7)
    cfg = load_config(p, ["data={max_length: 64}"])  # data.train survives the merge
    assert cfg.data.max_length == 64 and cfg.data.train.path == "d.jsonl"
    raw = apply_overrides({"regularizers": [{"type": "l2"}, {"type": "ewc"}]},
                          {"regularizers": [{"type": "kl"}]})
    assert raw["regularizers"] == [{"type": "kl"}]  # lists replace


def test_dataset_needs_exactly_one_source():
    raw = base()
    raw["data"]["train"] = {"path": "a.jsonl", "name": "hub/ds"}
    with pytest.raises(ConfigError, match="exactly one of"):
        config_from_dict(raw)


def test_regularizer_keys_checked_per_type():
    raw = base()
    raw["regularizers"] = [{"type": "l2", "lambda": 0.5, "variant": "decoupled"}]
    cfg = config_from_dict(raw)
    assert cfg.regularizers[0].lam == 0.5
    raw["regularizers"] = [{"type": "l2", "ratio": 0.5}]
    with pytest.raises(ConfigError, match=r"regularizers\[0\].ratio: not used by a regularizer"):
        config_from_dict(raw)
    raw["regularizers"] = [{"type": "replay", "ratio": 0.1}]
    with pytest.raises(ConfigError, match="needs a data source"):
        config_from_dict(raw)
    raw["regularizers"] = [{"type": "ewc", "lamda": 1}]
    with pytest.raises(ConfigError, match="did you mean 'regularizers\\[0\\].lambda'"):
        config_from_dict(raw)


def test_cli_exit_2_no_traceback_writes_nothing(tmp_path):
    raw = base()
    raw["training"] = {"lrr": 1e-4}
    raw["output"] = {"dir": str(tmp_path / "out")}
    p = write(tmp_path, raw)
    r = subprocess.run([sys.executable, "-m", "forgetkit.train", str(p)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "did you mean 'training.lr'" in lines[0]
    assert not (tmp_path / "out").exists()


def test_shipped_experiment_files_validate():
    for p in sorted((ROOT / "experiments").glob("*.yaml")):
        load_config(p)


def test_extends_merges_a_base_file(tmp_path):
    from forgetkit.config import ConfigError, load_config

    (tmp_path / "base.yaml").write_text(
        "name: base\nmodel: {name_or_path: gpt2}\ndata: {train: {path: d.jsonl}}\n"
        "training: {lr: 1.0e-4, max_steps: 5}\n"
        "regularizers: [{type: l2, lambda: 1.0}]\n")
    (tmp_path / "child.yaml").write_text(
        "extends: base.yaml\nname: child\ntraining: {max_steps: 7}\nregularizers: []\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert cfg.name == "child" and cfg.training.max_steps == 7 and cfg.training.lr == 1e-4
    assert cfg.regularizers == []  # lists replace, they do not concatenate
    (tmp_path / "loop.yaml").write_text("extends: loop.yaml\n")
    with pytest.raises(ConfigError, match="circular"):
        load_config(tmp_path / "loop.yaml")


def test_clip_scope_loss_rejected_with_deepspeed():
    raw = base()
    raw["training"] = {"clip_scope": "loss"}
    assert config_from_dict(raw).training.clip_scope == "loss"
    raw["distributed"] = {"strategy": "deepspeed"}
    with pytest.raises(ConfigError, match="training.clip_scope: 'loss' is not possible"):
        config_from_dict(raw)
