"""training.freeze on a tiny random-init Llama: what is frozen, that it stays bitwise at the base
through training (weight decay, L2-SP, coupled and decoupled), that the optimizer holds no state
for it, and the config errors. The tests run the loop as it is (it calls :func:`apply_freeze`
right after ``load_model``).
"""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import pytest
import torch
from conftest import TINY_LLAMA, skip_unless_installed
from safetensors.torch import load_file

from forgetkit.config import ConfigError, FreezeConfig
from forgetkit.models import load_model
from forgetkit.train import loop as loop_mod
from forgetkit.train.freeze import FreezeSummary, apply_freeze, check_freeze, decoder_module_list
from forgetkit.train.optim import param_groups

FREEZE = {"embeddings": True, "bottom_layers": 1, "patterns": [r"layers\.1\.self_attn\.q_proj"]}


def expected_frozen(names: list[str]) -> set[str]:
    """FREEZE spelled out by hand for the 2-layer tiny Llama (untied head)."""
    return {n for n in names if n == "model.embed_tokens.weight"
            or n.startswith("model.layers.0.") or n.startswith("model.layers.1.self_attn.q_proj")}


def run(cfg: Any, monkeypatch: pytest.MonkeyPatch, regularizers: Any = None
        ) -> tuple[Any, dict[str, Any]]:
    """Train ``cfg`` with the loop; returns (TrainResult, captured) where captured holds the
    ``named`` parameters the loop passed to ``param_groups`` and the ``optimizer`` it built."""
    captured: dict[str, Any] = {}
    real_groups, real_build = loop_mod.param_groups, loop_mod.build_optimizer

    def groups(named: Any, t: Any) -> Any:
        captured["named"] = list(named)
        return real_groups(named, t)

    def build(g: Any, t: Any, dev: Any) -> Any:
        captured["optimizer"] = real_build(g, t, dev)
        return captured["optimizer"]

    monkeypatch.setattr(loop_mod, "param_groups", groups)
    monkeypatch.setattr(loop_mod, "build_optimizer", build)
    return loop_mod.train(cfg, regularizers, progress=False), captured


def init_weights(cfg: Any) -> dict[str, torch.Tensor]:
    model, _ = load_model(cfg.model)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- selection

def test_selection_and_counts(tiny_cfg, caplog):
    cfg = tiny_cfg(training={"freeze": FREEZE})
    model, _ = load_model(cfg.model)
    named = dict(model.named_parameters())
    want = expected_frozen(list(named))
    with caplog.at_level(logging.INFO, logger="forgetkit"):
        s = apply_freeze(model, cfg)
    assert {n for n, p in named.items() if not p.requires_grad} == want
    assert set(s.names) == want
    n_frozen = sum(named[n].numel() for n in want)
    n_total = sum(p.numel() for p in named.values())
    assert (s.frozen_parameters, s.total_parameters) == (n_frozen, n_total)
    assert s.trainable_parameters == n_total - n_frozen
    assert (s.frozen_tensors, s.total_tensors) == (len(want), len(named))
    assert s.embeddings and s.tied_head is None
    assert (s.layers, s.n_layers) == ([0], 2)
    assert s.pattern_matches == {FREEZE["patterns"][0]: 1}
    line = (f"frozen: {n_frozen:,} of {n_total:,} parameters ({100 * n_frozen / n_total:.2f} %): "
            f"embeddings, layer 0, 1 pattern match; {len(want)} of {len(named)} tensors")
    assert line in caplog.text
    d = s.to_dict()
    assert d["frozen_parameters"] == n_frozen and d["trainable_parameters"] == n_total - n_frozen
    assert d["fraction"] == pytest.approx(n_frozen / n_total) and "names" not in d
    json.dumps(d)  # goes into train_result.json
    # the optimizer groups hold exactly the trainable parameters
    groups = param_groups(list(model.named_parameters()), cfg.training)
    assert {n for g in groups for n in g["names"]} == set(named) - want


def test_nothing_to_freeze_changes_nothing(tiny_cfg):
    cfg = tiny_cfg()
    model, _ = load_model(cfg.model)
    s = apply_freeze(model, cfg)
    assert all(p.requires_grad for p in model.parameters())
    assert s.frozen_parameters == 0 and s.trainable_parameters == s.total_parameters > 0


def test_tied_head_is_frozen_with_the_embeddings(tiny_cfg, caplog):
    cfg = tiny_cfg(model={"random_init": {**copy.deepcopy(TINY_LLAMA),
                                          "tie_word_embeddings": True}},
                   training={"freeze": {"embeddings": True}})
    model, _ = load_model(cfg.model)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # the premise: tied
    with caplog.at_level(logging.INFO, logger="forgetkit"):
        s = apply_freeze(model, cfg)
    assert s.tied_head == "lm_head.weight" and not model.lm_head.weight.requires_grad
    assert s.names == ["model.embed_tokens.weight"]  # one tensor, counted once
    assert s.frozen_parameters == model.lm_head.weight.numel()
    assert "with the tied output head lm_head.weight" in caplog.text
    assert "tied to the input embeddings" in caplog.text


def test_decoder_layers_are_the_config_layer_list(tiny_cfg):
    cfg = tiny_cfg()
    model, _ = load_model(cfg.model)
    where, layers = decoder_module_list(model)
    assert where == "model.layers" and len(layers) == 2 and layers[0] is model.model.layers[0]

    # A longer same-typed ModuleList (per-layer MoE experts) is not taken for the layers.
    model.model.layers[1].experts = torch.nn.ModuleList(torch.nn.Linear(2, 2) for _ in range(5))
    where, layers = decoder_module_list(model)
    assert where == "model.layers" and len(layers) == 2


# ----------------------------------------------------------------------------- training

@pytest.mark.parametrize("variant", ["coupled", "decoupled"])
def test_frozen_bitwise_through_training(tiny_cfg, monkeypatch, variant):
    """Weight decay 0.1 and an L2-SP pull on every (trainable) weight: frozen tensors come out
    bitwise equal to the base, in memory and in the saved model; the optimizer has no group
    entry and no state for them, and a state for every trainable one."""
    cfg = tiny_cfg(training={"freeze": FREEZE, "weight_decay": 0.1, "max_steps": 3},
                   regularizers=[{"type": "l2", "lambda": 10.0, "variant": variant}])
    base = init_weights(cfg)
    res, cap = run(cfg, monkeypatch)
    named = dict(cap["named"])
    want = expected_frozen(list(named))
    opt = cap["optimizer"]
    in_groups = {id(p) for g in opt.param_groups for p in g["params"]}
    assert {n for g in opt.param_groups for n in g["names"]} == set(named) - want
    for n, p in named.items():
        if n in want:
            assert not p.requires_grad and p.grad is None
            assert id(p) not in in_groups and p not in opt.state
            assert torch.equal(p.detach(), base[n]), n
        else:
            assert "exp_avg" in opt.state[p], n
    saved = load_file(str(res.out_dir / "model" / "model.safetensors"))
    for n in want:
        assert torch.equal(saved[n], base[n]), n
    moved = [n for n in named if n not in want and not torch.equal(saved[n], base[n])]
    assert len(moved) == len(named) - len(want)  # every trainable tensor moved: not vacuous


def test_resume_with_frozen_parameters(tiny_cfg, monkeypatch, tmp_path):
    """A checkpoint of a frozen run (model + optimizer state of the trainable part only)
    resumes to the uninterrupted result, bit for bit."""
    import shutil

    sec = {"freeze": FREEZE, "max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5,
           "weight_decay": 0.1}
    full, _ = run(tiny_cfg(training=sec, output={"dir": str(tmp_path / "full")}), monkeypatch)
    cfg = tiny_cfg(training=sec, output={"dir": str(tmp_path / "cut")})
    first, _ = run(cfg, monkeypatch)
    shutil.rmtree(first.out_dir / "checkpoints" / "step-00000004")
    shutil.rmtree(first.out_dir / "model")
    second, _ = run(cfg, monkeypatch)
    assert second.resumed_from == 2
    a = load_file(str(full.out_dir / "model" / "model.safetensors"))
    b = load_file(str(second.out_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_result_reports_the_freeze(tiny_cfg):
    cfg = tiny_cfg(training={"freeze": FREEZE, "max_steps": 1})
    res = loop_mod.train(cfg, progress=False)
    info = json.loads((res.out_dir / "train_result.json").read_text())
    model, _ = load_model(cfg.model)
    named = dict(model.named_parameters())
    want = expected_frozen(list(named))
    n_frozen = sum(named[n].numel() for n in want)
    n_total = sum(p.numel() for p in named.values())
    assert info["trainable_params"] == n_total - n_frozen
    assert info["total_params"] == n_total
    f = info["freeze"]
    assert f["frozen_parameters"] == n_frozen and f["layers"] == [0] and f["embeddings"]


# ----------------------------------------------------------------------------- config errors

def _model(tiny_cfg: Any, **freeze: Any) -> tuple[Any, Any]:
    cfg = tiny_cfg(training={"freeze": freeze})
    return load_model(cfg.model)[0], cfg


@pytest.mark.parametrize("freeze, message", [
    ({"patterns": ["("]}, r"patterns\[0\]: '\(' is not a valid regular expression"),
    ({"patterns": ["q_proj", ""]}, r"patterns\[1\]: the empty pattern matches every"),
    ({"bottom_layers": 2}, r"bottom_layers: 2 freezes every decoder layer of a model with 2"),
])
def test_config_only_errors(tiny_cfg, freeze, message):
    cfg = tiny_cfg(training={"freeze": freeze})
    with pytest.raises(ConfigError, match=message):
        check_freeze(cfg)


def test_model_dependent_errors(tiny_cfg):
    model, cfg = _model(tiny_cfg, patterns=["no_such_weight"])
    with pytest.raises(ConfigError, match=r"'no_such_weight' matches no parameter name.*"
                       r"model\.embed_tokens\.weight"):
        apply_freeze(model, cfg)
    assert all(p.requires_grad for p in model.parameters())  # nothing half-applied
    model, cfg = _model(tiny_cfg, patterns=["."])
    with pytest.raises(ConfigError, match="freezes every parameter"):
        apply_freeze(model, cfg)
    assert all(p.requires_grad for p in model.parameters())
    # bottom_layers against the loaded model (a hub model's depth is not in the config)
    model, _ = _model(tiny_cfg)
    with pytest.raises(ConfigError, match="bottom_layers: 5 freezes every decoder layer"):
        apply_freeze(model, FreezeConfig(bottom_layers=5))


def test_refused_combinations(tiny_cfg):
    with pytest.raises(ConfigError, match="not combined with training.lora"):
        check_freeze(tiny_cfg(training={"freeze": {"embeddings": True}, "lora": {"r": 4}}))
    with pytest.raises(ConfigError, match="'deepspeed' and training.mixed_precision 'bf16'"):
        check_freeze(tiny_cfg(training={"freeze": {"embeddings": True},
                                        "mixed_precision": "bf16"},
                              distributed={"strategy": "deepspeed"}))
    check_freeze(tiny_cfg(training={"lora": {"r": 4}}))  # no freezing: nothing refused


def test_all_frozen_model_has_no_optimizer_groups(tiny_cfg):
    cfg = tiny_cfg()
    model, _ = load_model(cfg.model)
    model.requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameter"):
        param_groups(list(model.named_parameters()), cfg.training)


def test_freeze_summary_default_is_empty():
    s = FreezeSummary()
    assert s.fraction == 0.0 and "nothing" in s.describe()


# ----------------------------------------------------------------------------- 2 processes

@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed"])
def test_two_processes_freeze_like_one(strategy, tmp_path):
    """2 processes x micro 2 x accumulation 2 against 1 x 2 x 4 (the same global batch, see
    tests/test_distributed.py): frozen tensors bitwise at the base in both; the trainable ones
    equal within that test's fp32 tolerances."""
    import importlib.util

    import yaml
    from dist_utils import reports, run_worker, weights
    from test_distributed import ATOL, DATA, RTOL, SMOKE

    if strategy == "deepspeed":
        skip_unless_installed(importlib.util.find_spec("deepspeed") is None,
                              "DeepSpeed is not installed: pip install 'forgetkit[deepspeed]'")
    raw = yaml.safe_load(SMOKE.read_text())
    raw["data"]["train"]["path"] = str(DATA)
    conf = tmp_path / "smoke.yaml"
    conf.write_text(yaml.safe_dump(raw))
    common = ["training.max_steps=4", "training.micro_batch_size=2", "training.weight_decay=0.1",
              "training.freeze.embeddings=true", "training.freeze.bottom_layers=1",
              "output.save_model=true"]
    one, two = tmp_path / "one", tmp_path / "two"
    run_worker(conf, 1, *common, "training.gradient_accumulation_steps=4",
               f"output.dir={one}", "--save-init", str(tmp_path / "init.safetensors"))
    extra = ["distributed.zero_stage=2"] if strategy == "deepspeed" else []
    run_worker(conf, 2, *common, "training.gradient_accumulation_steps=2", f"output.dir={two}",
               f"distributed.strategy={strategy}", *extra)
    assert {r["name"] for r in reports(two)} == {strategy} and len(reports(two)) == 2
    base = load_file(str(tmp_path / "init.safetensors"))
    a, b = weights(one), weights(two)
    # smoke.yaml ties the head to the embeddings: lm_head.weight is frozen with them (and saved
    # once, under the embeddings' name)
    frozen = {k for k in base if k in ("model.embed_tokens.weight", "lm_head.weight")
              or k.startswith("model.layers.0.")}
    assert a.keys() == b.keys() and "model.embed_tokens.weight" in a
    assert all(torch.equal(a[k], base[k]) and torch.equal(b[k], base[k])
               for k in frozen if k in a)
    for k in a:
        if k not in frozen:
            assert not torch.equal(a[k], base[k]), k
            torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=RTOL)
