"""Config loading: strict keys with did-you-mean, types, ranges, overrides, exit code 2."""

from __future__ import annotations

import dataclasses
import inspect
import subprocess
import sys
import typing
import warnings
from pathlib import Path

import pytest
import yaml

from forgetkit.config import (
    REGULARIZER_CONFIGS,
    ConfigError,
    DatasetSpec,
    EWCConfig,
    KLConfig,
    L2Config,
    ReplayConfig,
    apply_overrides,
    config_from_dict,
    config_to_dict,
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


def with_regs(*regs: dict, **data) -> dict:
    raw = base()
    raw["regularizers"] = list(regs)
    raw["data"].update(data)
    return raw


def test_regularizer_keys_checked_per_type():
    cfg = config_from_dict(with_regs({"type": "l2", "lambda": 0.5, "variant": "decoupled"},
                                     {"type": "ewc", "lam": 2.0, "estimator": "sampled"},
                                     {"type": "kl", "lambda": 3.0, "data": {"path": "g.jsonl"}}))
    l2, ewc, kl = cfg.regularizers
    assert type(l2) is L2Config and (l2.lam, l2.variant) == (0.5, "decoupled")
    assert type(ewc) is EWCConfig and (ewc.lam, ewc.estimator) == (2.0, "sampled")
    assert type(kl) is KLConfig and kl.lam == 3.0 and kl.data.path == "g.jsonl"
    assert not hasattr(l2, "fisher_data") and not hasattr(ewc, "temperature")
    # a key of another type says whose it is (and this type's spelling, if it has one)
    with pytest.raises(ConfigError, match=r"unknown key 'regularizers\[0\].temperature': "
                       r"'temperature' is a key of type 'kl', not 'ewc' \(its keys: "):
        config_from_dict(with_regs({"type": "ewc", "temperature": 2.0}))
    with pytest.raises(ConfigError, match=r"'data' is a key of type 'kl' \(and of data.replay\),"
                       r" not 'ewc'; did you mean 'regularizers\[0\].fisher_data'\?"):
        config_from_dict(with_regs({"type": "ewc", "data": {"path": "g.jsonl"}}))
    with pytest.raises(ConfigError, match="'include' is a key of types 'l2' and 'ewc', not 'kl'"):
        config_from_dict(with_regs({"type": "kl", "include": ["mlp"], "data": {"path": "g"}}))
    with pytest.raises(ConfigError, match=r"regularizers\[0\].ratio': 'ratio' is a key of "
                       r"data.replay \(replay is data, not a regularizer\), not 'l2'"):
        config_from_dict(with_regs({"type": "l2", "ratio": 0.5}))
    # misspelt keys and types: did you mean, among that type's own keys
    with pytest.raises(ConfigError, match="did you mean 'regularizers\\[0\\].lambda'"):
        config_from_dict(with_regs({"type": "ewc", "lamda": 1}))
    with pytest.raises(ConfigError, match=r"regularizers\[1\].type: expected one of 'l2', "
                       r"'ewc', 'kl', got 'ewk'; did you mean 'ewc'\?"):
        config_from_dict(with_regs({"type": "l2"}, {"type": "ewk"}))
    with pytest.raises(ConfigError, match=r"regularizers\[0\].type: missing; expected "
                       r"type: l2\|ewc\|kl"):
        config_from_dict(with_regs({"lambda": 1.0}))
    with pytest.raises(ConfigError, match="needs a data source"):
        config_from_dict(with_regs({"type": "kl", "lambda": 1.0}))
    with pytest.raises(ConfigError, match=r"regularizers\[0\].fisher_clamp: fisher_postprocess "
                       "'clamp' needs a cap"):
        config_from_dict(with_regs({"type": "ewc", "fisher_postprocess": "clamp"}))
    with pytest.raises(ConfigError, match=r"regularizers\[0\]: expected a mapping with type"):
        config_from_dict(with_regs("l2"))


@pytest.mark.parametrize("reg", [{"type": "l2"}, {"type": "ewc"},
                                 {"type": "kl", "data": {"path": "g.jsonl"}}])
def test_lambda_is_lam_on_every_type(reg):
    assert config_from_dict(with_regs({**reg, "lambda": 4.0})).regularizers[0].lam == 4.0
    assert config_from_dict(with_regs({**reg, "lam": 4.0})).regularizers[0].lam == 4.0
    with pytest.raises(ConfigError, match=r"given twice \(as 'lam' and 'lambda'"):
        config_from_dict(with_regs({**reg, "lam": 4.0, "lambda": 5.0}))


def test_kl_batch_size_and_its_legacy_spelling():
    kl = {"type": "kl", "data": {"path": "g.jsonl"}}
    assert config_from_dict(with_regs(kl)).regularizers[0].batch_size == 8
    assert config_from_dict(with_regs({**kl, "batch_size": 2})).regularizers[0].batch_size == 2
    assert config_from_dict(with_regs({**kl, "fisher_batch_size": 3})).regularizers[0] \
        .batch_size == 3
    with pytest.raises(ConfigError, match="given twice"):
        config_from_dict(with_regs({**kl, "fisher_batch_size": 3, "batch_size": 2}))
    with pytest.raises(ConfigError, match=r"regularizers\[0\].fisher_batch_size: expected a "
                       "value >= 1"):  # the key as the user wrote it
        config_from_dict(with_regs({**kl, "fisher_batch_size": 0}))


REPLAY = {"data": {"path": "general.jsonl", "format": "text"}, "ratio": 0.2}


def test_replay_is_data():
    cfg = config_from_dict(with_regs(replay=REPLAY))
    assert isinstance(cfg.data.replay, ReplayConfig) and cfg.regularizers == []
    assert cfg.data.replay.ratio == 0.2 and cfg.data.replay.data.path == "general.jsonl"
    assert config_from_dict(base()).data.replay is None
    assert config_from_dict(with_regs(replay={"data": {"path": "g"}})).data.replay.ratio == 0.1
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match=r"data.replay.ratio: expected a value > 0.0 and "
                           "< 1.0"):
            config_from_dict(with_regs(replay={**REPLAY, "ratio": bad}))
    with pytest.raises(ConfigError, match="data.replay.data: missing; replay needs a data source"):
        config_from_dict(with_regs(replay={"ratio": 0.2}))
    with pytest.raises(ConfigError, match="did you mean 'data.replay.ratio'"):
        config_from_dict(with_regs(replay={**REPLAY, "ration": 0.2}))


def test_legacy_replay_entry_moves_to_data_replay():
    raw = with_regs({"type": "ewc", "lambda": 1.0}, {"type": "replay", **REPLAY},
                    {"type": "l2"})
    with pytest.warns(FutureWarning) as rec:
        cfg = config_from_dict(raw, "c.yaml")
    msgs = [str(w.message) for w in rec]
    assert len(msgs) == 1 and "\n" not in msgs[0]
    assert msgs[0].startswith("c.yaml: regularizers[1]: 'type: replay' is deprecated")
    assert "data.replay: {data: ..., ratio: ...}" in msgs[0]
    assert [type(r) for r in cfg.regularizers] == [EWCConfig, L2Config]
    assert cfg.data.replay == config_from_dict(with_regs(replay=REPLAY)).data.replay
    assert raw["regularizers"][1]["type"] == "replay" and "replay" not in raw["data"]  # untouched
    # the dumped (resolved) config shows the new spelling, and loads without a warning
    text = dump_config(cfg)
    assert "type: replay" not in text and yaml.safe_load(text)["data"]["replay"]["ratio"] == 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert config_from_dict(yaml.safe_load(text)) == cfg


def test_legacy_replay_errors():
    with pytest.raises(ConfigError, match=r"regularizers\[0\]: replay is given twice, here .* "
                       "and as data.replay; keep data.replay only"):
        config_from_dict(with_regs({"type": "replay", **REPLAY}, replay=REPLAY))
    with pytest.raises(ConfigError, match=r"regularizers\[2\]: a second replay source "
                       r"\(regularizers\[0\] is one\)"):
        config_from_dict(with_regs({"type": "replay", **REPLAY}, {"type": "l2"},
                                   {"type": "replay", **REPLAY}))
    with pytest.raises(ConfigError, match=r"regularizers\[0\].data: missing; replay needs a "
                       "data source"):
        config_from_dict(with_regs({"type": "replay", "ratio": 0.1}))
    with pytest.raises(ConfigError, match=r"regularizers\[0\].ratio: expected a value > 0.0"):
        config_from_dict(with_regs({"type": "replay", **REPLAY, "ratio": 1.5}))
    with pytest.raises(ConfigError, match=r"unknown key 'regularizers\[0\].lambda'; a replay "
                       "entry has data and ratio only"):
        config_from_dict(with_regs({"type": "replay", **REPLAY, "lambda": 1.0}))


# A regularizer entry as forgetkit wrote it into config.yaml before the per-type split: every
# key of the old shared class (what results/*/config.yaml holds).
OLD_DEFAULTS = {
    "type": "l2", "lam": 1.0, "variant": "coupled", "include": [], "exclude": [],
    "anchor_dtype": "float32", "fisher_data": None, "fisher_examples": 256,
    "fisher_batch_size": 8, "estimator": "empirical", "fisher_samples": 1, "fisher_path": None,
    "fisher_postprocess": "none", "fisher_clamp": None, "online_gamma": None, "ratio": 0.1,
    "data": None, "temperature": 1.0}


def test_config_yaml_of_the_old_shared_class_reads_back():
    g = {"path": "g.jsonl", "format": "text"}
    old = [{**OLD_DEFAULTS, "type": "ewc", "lam": 100.0, "fisher_data": g, "fisher_batch_size": 4},
           {**OLD_DEFAULTS, "type": "kl", "lam": 0.5, "data": g, "fisher_batch_size": 2},
           {**OLD_DEFAULTS, "type": "replay", "data": g, "ratio": 0.3}]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a record: no deprecation warning
        cfg = config_from_dict(with_regs(*old))
    ewc, kl = cfg.regularizers
    assert (ewc.lam, ewc.fisher_batch_size, ewc.fisher_data.path) == (100.0, 4, "g.jsonl")
    assert (kl.lam, kl.batch_size, kl.data.path) == (0.5, 2, "g.jsonl")
    assert cfg.data.replay.ratio == 0.3 and cfg.data.replay.data.path == "g.jsonl"
    assert cfg == config_from_dict(with_regs(
        {"type": "ewc", "lambda": 100.0, "fisher_data": g, "fisher_batch_size": 4},
        {"type": "kl", "lambda": 0.5, "data": g, "batch_size": 2}, replay={"data": g,
                                                                         "ratio": 0.3}))
    # a key another type used must still hold the old default (as the old check demanded)
    with pytest.raises(ConfigError, match=r"regularizers\[0\].temperature: not used by a "
                       "regularizer of type 'ewc', got 2.0"):
        config_from_dict(with_regs({**OLD_DEFAULTS, "type": "ewc", "temperature": 2.0}))


def test_regularizer_overrides_and_round_trip(tmp_path):
    raw = with_regs({"type": "l2", "lambda": 1.0}, {"type": "ewc", "lambda": 10.0},
                    {"type": "kl", "lambda": 0.1, "data": {"path": "g.jsonl"}}, replay=REPLAY)
    raw["output"] = {"trackers": ["tensorboard", "mlflow"]}
    p = write(tmp_path, raw)
    cfg = load_config(p, ["regularizers.0.lambda=5", "regularizers.1.fisher_examples=16",
                          "regularizers.2.batch_size=4", "data.replay.ratio=0.25"])
    assert [r.lam for r in cfg.regularizers] == [5.0, 10.0, 0.1]
    assert cfg.regularizers[1].fisher_examples == 16 and cfg.regularizers[2].batch_size == 4
    assert cfg.data.replay.ratio == 0.25 and cfg.data.replay.data.path == "general.jsonl"
    assert load_config(p, ["regularizers=[]", "data.replay=null"]).regularizers == []
    with pytest.raises(ConfigError, match="command-line overrides.*'temperature' is a key of "
                       "type 'kl', not 'l2'"):
        load_config(p, ["regularizers.0.temperature=2"])
    with pytest.raises(ConfigError, match="regularizers has 3 entries; '3' is not a valid index"):
        load_config(p, ["regularizers.3.lambda=1"])
    # dump -> load gives an equal config, types and all
    text = dump_config(cfg)
    again = config_from_dict(yaml.safe_load(text))
    assert again == cfg and [type(r) for r in again.regularizers] == [L2Config, EWCConfig,
                                                                      KLConfig]
    assert again.output.trackers == ["tensorboard", "mlflow"]
    d = config_to_dict(cfg)
    assert d["regularizers"][2] == {"type": "kl", "lam": 0.1, "data": config_to_dict(
        cfg.regularizers[2].data), "temperature": 1.0, "batch_size": 4}
    assert set(d["data"]["replay"]) == {"data", "ratio", "sources"}


def test_arm_overrides_add_replay_and_keep_the_regularizers(tmp_path):
    from forgetkit.runner import plan_runs

    raw = with_regs({"type": "l2", "lambda": 1.0})
    raw["experiment"] = {"arms": [
        {"name": "base"},
        {"name": "replay", "overrides": {"data.replay": REPLAY}},
        {"name": "ewc_replay", "overrides": {"regularizers": [{"type": "ewc", "lambda": 3.0}],
                                             "data": {"replay": REPLAY}}},
        {"name": "legacy", "overrides": {"regularizers": [{"type": "ewc", "lambda": 3.0},
                                                          {"type": "replay", **REPLAY}]}},
        {"name": "grid", "grid": {"data.replay.ratio": [0.1, 0.3]},
         "overrides": {"data.replay": REPLAY}}]}
    raw["experiment"]["results_dir"] = str(tmp_path / "results")
    with pytest.warns(FutureWarning, match="arm 'legacy'"):
        _, runs = plan_runs(raw, "x.yaml")
    got = {r.arm: ([x.type for x in r.cfg.regularizers],
                   r.cfg.data.replay and r.cfg.data.replay.ratio) for r in runs}
    assert got == {"base": (["l2"], None), "replay": (["l2"], 0.2),
                   "ewc_replay": (["ewc"], 0.2), "legacy": (["ewc"], 0.2),
                   "grid@ratio=0.1": (["l2"], 0.1), "grid@ratio=0.3": (["l2"], 0.3)}
    assert all(r.cfg.data.train.path == "d.jsonl" for r in runs)  # data: merges, not replaces
    by = {r.arm: r for r in runs}
    assert by["legacy"].identity() == by["ewc_replay"].identity()  # the same run, spelt twice


def test_trackers():
    from forgetkit.config import TRACKERS, OutputConfig

    (choice,) = typing.get_args(typing.get_type_hints(OutputConfig)["trackers"])
    assert typing.get_args(choice) == TRACKERS
    raw = base()
    assert config_from_dict(raw).output.trackers == []
    raw["output"] = {"trackers": ["wandb", "trackio"]}
    assert config_from_dict(raw).output.trackers == ["wandb", "trackio"]
    raw["output"] = {"trackers": ["wandbb"]}
    with pytest.raises(ConfigError, match=r"output.trackers\[0\]: expected one of "
                       "'tensorboard', 'wandb', 'trackio', 'mlflow', got 'wandbb'; did you mean"):
        config_from_dict(raw)
    raw["output"] = {"trackers": "wandb"}
    with pytest.raises(ConfigError, match="output.trackers: expected a list of"):
        config_from_dict(raw)
    raw["output"] = {"trackers": ["wandb", "wandb"]}
    with pytest.raises(ConfigError, match="each tracker once"):
        config_from_dict(raw)


# ----------------------------------------------------------------------------- binding
# Each regularizer config class is bound to the constructor it configures (as torchtune's
# config validation binds a config to its component): every field but ``type`` and the
# data-source fields (DATA_KEYS: the data layer reads them and builds the batches) is a
# constructor parameter, under these names where they differ, with the same default and, for
# a Literal, the same choices. A field added to a config without its constructor (or renamed
# in one only) fails here.

def _ctor(name: str):
    from forgetkit.regularizers.ewc import EWC
    from forgetkit.regularizers.kl import KLToInit
    from forgetkit.regularizers.l2 import L2SP

    return {"l2": L2SP, "ewc": EWC, "kl": KLToInit}[name]


BINDING = {  # type -> (config class, data-source fields, config field -> parameter name)
    "l2": (L2Config, set(), {}),
    "ewc": (EWCConfig, {"fisher_data", "fisher_examples", "fisher_batch_size"},
            {"fisher_postprocess": "postprocess", "fisher_clamp": "clamp"}),
    "kl": (KLConfig, {"data", "batch_size"}, {}),
}
# constructor parameters without a default that the builder supplies (from the data layer)
SUPPLIED_BY_BUILDER = {"batches"}


def _same_default(a, b) -> bool:
    def norm(v):
        return tuple(v) if isinstance(v, (list, tuple)) else v

    return norm(a) == norm(b)


@pytest.mark.parametrize("kind", sorted(BINDING))
def test_config_class_binds_to_its_regularizer_constructor(kind):
    cls, data_keys, rename = BINDING[kind]
    assert REGULARIZER_CONFIGS[kind] is cls
    assert set(cls.DATA_KEYS) == data_keys
    ctor = _ctor(kind)
    params = inspect.signature(ctor).parameters
    ctor_hints = typing.get_type_hints(ctor.__init__)
    cfg_hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    bound = set(fields) - {"type"} - data_keys
    assert set(rename) <= bound
    for name in sorted(bound):
        pname = rename.get(name, name)
        assert pname in params, f"{cls.__name__}.{name} is no parameter of {ctor.__name__}"
        default, f = params[pname].default, fields[name]
        if default is not inspect.Parameter.empty and f.default is not dataclasses.MISSING:
            assert _same_default(f.default, default), (name, f.default, default)
        if default is not inspect.Parameter.empty and f.default_factory is not dataclasses.MISSING:
            assert _same_default(f.default_factory(), default), (name, default)
        if typing.get_origin(cfg_hints[name]) is typing.Literal:
            assert set(typing.get_args(ctor_hints[pname])) == set(
                typing.get_args(cfg_hints[name])), name
    required = {n for n, p in params.items() if p.default is inspect.Parameter.empty
                and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and n != "self"}
    covered = {rename.get(n, n) for n in bound} | SUPPLIED_BY_BUILDER
    assert required <= covered, f"{ctor.__name__} needs {required - covered} from no config"


def test_data_layer_consumes_replay_and_the_data_source_fields(tmp_path):
    """ReplayConfig's fields, EWC's fisher_data/fisher_examples and KL's data are read by the
    data layer (forgetkit.data.sets.build_example_sets), which builds the example sets."""
    import json

    from conftest import write_instruction_data

    from forgetkit.data.sets import build_example_sets
    from forgetkit.models import build_byte_tokenizer

    task, general = tmp_path / "task.jsonl", tmp_path / "general.jsonl"
    write_instruction_data(task, n=20)
    general.write_text("".join(json.dumps({"text": f"general passage {i}"}) + "\n"
                               for i in range(30)))
    g = {"path": str(general), "format": "text"}
    raw = with_regs({"type": "l2"}, {"type": "ewc", "fisher_data": g, "fisher_examples": 7},
                    {"type": "kl", "data": {**g, "limit": 5}},
                    replay={"data": {**g, "limit": 11}, "ratio": 0.3})
    raw["data"]["train"] = {"path": str(task)}
    raw["data"]["max_length"] = 256
    cfg = config_from_dict(raw)
    assert {f.name for f in dataclasses.fields(ReplayConfig)} == {"data", "ratio", "sources"}
    sets = build_example_sets(cfg, build_byte_tokenizer())
    assert len(sets.replay) == 11 and all(e.source == 1 for e in sets.replay)
    assert sets.replay_ratio == cfg.data.replay.ratio == 0.3
    assert set(sets.fisher) == {1} and len(sets.fisher[1]) == 7
    assert set(sets.kl) == {2} and len(sets.kl[2]) == 5
    cfg.data.replay = None
    assert build_example_sets(cfg, build_byte_tokenizer()).replay == []


def test_regularizer_data_specs_lists_every_mitigation_source():
    from forgetkit.config import regularizer_data_specs

    g = {"path": "g.jsonl"}
    cfg = config_from_dict(with_regs({"type": "l2"}, {"type": "ewc", "fisher_data": g},
                                     {"type": "ewc"}, {"type": "kl", "data": g},
                                     replay={"data": g}))
    keys = [k for k, spec in regularizer_data_specs(cfg)]
    assert keys == ["data.replay.data", "regularizers[1].fisher_data", "regularizers[3].data"]
    assert all(isinstance(s, DatasetSpec) for _, s in regularizer_data_specs(cfg))


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
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)  # no legacy spelling shipped
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
    # data.replay in a base file: a child changes one key of it, or drops it
    (tmp_path / "rbase.yaml").write_text(
        "model: {name_or_path: gpt2}\ndata: {train: {path: d.jsonl}, replay: {ratio: 0.1, "
        "data: {path: g.jsonl, format: text}}}\n")
    (tmp_path / "rchild.yaml").write_text("extends: rbase.yaml\ndata: {replay: {ratio: 0.3}}\n")
    (tmp_path / "rnone.yaml").write_text("extends: rbase.yaml\ndata: {replay: null}\n")
    rp = load_config(tmp_path / "rchild.yaml").data.replay
    assert rp.ratio == 0.3 and rp.data.path == "g.jsonl"
    assert load_config(tmp_path / "rnone.yaml").data.replay is None
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
