"""L2-SP, EWC (penalty side), KL, WiSE-FT and the config wiring; resume equals an uninterrupted run."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from forgetkit.config import ConfigError, ModelConfig, config_from_dict
from forgetkit.data.batching import BatchStream
from forgetkit.data.sets import load_examples
from forgetkit.models import load_model
from forgetkit.regularizers import EWC, L2SP, KLToInit, RegContext, build_regularizers
from forgetkit.regularizers.base import optimizer_lr_lookup
from forgetkit.regularizers.build import regularizer_names
from forgetkit.regularizers.functional import (
    decoupled_pull_,
    ewc_grad_,
    ewc_penalty,
    l2_grad_,
    l2_penalty,
)
from forgetkit.regularizers.wise import interpolate_state_dicts, write_wise_checkpoints

ROOT = Path(__file__).resolve().parents[1]
GENERAL = str(ROOT / "experiments/data/smoke_general.jsonl")
TASK = str(ROOT / "experiments/data/smoke_task.jsonl")
TINY = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 128}


def tiny_model(seed: int = 0):
    return load_model(ModelConfig(random_init=dict(TINY), tokenizer="byte"), seed=seed)


def ctx_for(model, optimizer=None) -> RegContext:
    def params():
        seen = set()
        for n, p in model.named_parameters():
            if id(p) not in seen:
                seen.add(id(p))
                yield n, p
    return RegContext(model=model, params=params, device=torch.device("cpu"),
                      param_lr=optimizer_lr_lookup(optimizer) if optimizer else None)


@torch.no_grad()
def perturb(model, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g) * scale)


# ----------------------------------------------------------------------------- functional

def test_functional_penalties_match_formula():
    g = torch.Generator().manual_seed(0)
    theta = {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)}
    theta0 = {k: v + torch.randn(v.shape, generator=g) for k, v in theta.items()}
    fisher = {k: torch.rand(v.shape, generator=g) for k, v in theta.items()}
    l2 = sum(((theta[k] - theta0[k]) ** 2).sum() for k in theta) / 2
    ewc = sum((fisher[k] * (theta[k] - theta0[k]) ** 2).sum() for k in theta) / 2
    torch.testing.assert_close(l2_penalty(theta, theta0), l2)
    torch.testing.assert_close(ewc_penalty(theta, theta0, fisher), ewc)
    assert float(l2_penalty(theta, theta)) == 0.0
    # bf16 anchors are upcast; the sum stays fp32
    half = {k: v.bfloat16() for k, v in theta0.items()}
    assert l2_penalty(theta, half).dtype == torch.float32

    # in-place helpers: gradient and value
    names = list(theta)
    grads = [torch.zeros_like(theta[k]) for k in names]
    v = l2_grad_(grads, [theta[k] for k in names], [theta0[k] for k in names], 0.3)
    for gr, k in zip(grads, names, strict=True):
        torch.testing.assert_close(gr, 0.3 * (theta[k] - theta0[k]))
    torch.testing.assert_close(v, 0.3 * l2)
    grads = [torch.ones_like(theta[k]) for k in names]
    v = ewc_grad_(grads, [theta[k] for k in names], [theta0[k] for k in names],
                  [fisher[k] for k in names], 2.0)
    for gr, k in zip(grads, names, strict=True):
        torch.testing.assert_close(gr, 1 + 2.0 * fisher[k] * (theta[k] - theta0[k]))
    torch.testing.assert_close(v, 2.0 * ewc)

    ps = [theta[k].clone() for k in names]
    decoupled_pull_(ps, [theta0[k] for k in names], [0.1, 0.5])
    torch.testing.assert_close(ps[0], theta["a"] - 0.1 * (theta["a"] - theta0["a"]))
    torch.testing.assert_close(ps[1], theta["b"] - 0.5 * (theta["b"] - theta0["b"]))
    with pytest.raises(ValueError):
        decoupled_pull_(ps, [theta0[k] for k in names], 1.5)


# ----------------------------------------------------------------------------- L2-SP

def test_l2_zero_at_anchor_and_grad_matches_autograd():
    model, _ = tiny_model()
    reg = L2SP(lam=0.7)
    ctx = ctx_for(model)
    reg.prepare(ctx)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert float(reg.grad_term(ctx)) == 0.0  # at theta0: no penalty, no pull
    assert all(float(p.grad.abs().max()) == 0.0 for p in model.parameters())

    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model)
    # autograd reference: d/dtheta of lam * 1/2 ||theta - theta0||^2
    model.zero_grad(set_to_none=True)
    ref = 0.7 * l2_penalty(dict(model.named_parameters()), theta0)
    ref.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        torch.testing.assert_close(expected[n], 0.7 * (p.detach() - theta0[n]))
    grads_before = {n: torch.randn_like(p) for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.grad = grads_before[n].clone()
    v = reg.grad_term(ctx)
    torch.testing.assert_close(v, ref.detach())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_before[n] + expected[n])
    assert reg.penalty(ctx, {}) is None and reg.after_step(ctx, 1e-3) is None


def test_l2_include_exclude():
    model, _ = tiny_model()
    reg = L2SP(lam=1.0, include=[r"\.layers\.0\."], exclude=[r"norm"])
    reg.prepare(ctx_for(model))
    assert reg.names and all(".layers.0." in n and "norm" not in n for n in reg.names)
    with pytest.raises(ValueError, match="select no"):
        L2SP(1.0, include=["nothing-matches"]).prepare(ctx_for(model))


def _one_adam_step(variant: str, lam: float, lr: float, delta: float):
    """One AdamW step with a zero task gradient from theta = theta0 + delta."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.zeros(64))
    model = torch.nn.Module()
    model.w = w
    reg = L2SP(lam=lam, variant=variant)
    opt = torch.optim.AdamW([w], lr=lr, weight_decay=0.0)

    ctx = ctx_for(model, opt)
    reg.prepare(ctx)
    with torch.no_grad():
        w.add_(torch.linspace(-1, 1, 64) * delta)
    before = w.detach().clone()
    w.grad = torch.zeros_like(w)  # the task gradient
    reg.grad_term(ctx)
    opt.step()
    reg.after_step(ctx, lr)
    return before, w.detach().clone()


def test_l2_coupled_vs_decoupled_one_adam_step():
    lr = 1e-2
    # coupled: the pull lam*(theta - theta0) goes through Adam, whose first step is
    # lr * g / (|g| + eps) ~ lr * sign(theta - theta0): normalised, independent of lambda.
    for lam in (0.1, 10.0):
        before, after = _one_adam_step("coupled", lam, lr, delta=0.5)
        step = before - after
        nz = before.abs() > 1e-3
        torch.testing.assert_close(step[nz], lr * before[nz].sign(), rtol=1e-4, atol=1e-6)
    # decoupled: Adam sees a zero gradient (no move), then theta -= lr*lam*(theta - theta0)
    for lam in (0.1, 10.0):
        before, after = _one_adam_step("decoupled", lam, lr, delta=0.5)
        torch.testing.assert_close(before - after, lr * lam * before)


def test_decoupled_uses_each_group_lr():
    model = torch.nn.Module()
    model.a = torch.nn.Parameter(torch.zeros(3))
    model.b = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([{"params": [model.a], "lr": 0.1}, {"params": [model.b], "lr": 0.01}])

    ctx = ctx_for(model, opt)
    reg = L2SP(lam=2.0, variant="decoupled")
    reg.prepare(ctx)
    with torch.no_grad():
        model.a.fill_(1.0)
        model.b.fill_(1.0)
    v = reg.after_step(ctx, 0.1)
    assert float(v) == pytest.approx(2.0 / 2 * 6)  # value before the pull
    torch.testing.assert_close(model.a.detach(), torch.full((3,), 1 - 0.1 * 2.0))
    torch.testing.assert_close(model.b.detach(), torch.full((3,), 1 - 0.01 * 2.0))


def test_l2_resume_fingerprint_mismatch_raises():
    model, _ = tiny_model()
    reg = L2SP(lam=1.0)
    reg.prepare(ctx_for(model))
    state = reg.state_dict()
    other, _ = tiny_model(seed=5)
    reg2 = L2SP(lam=1.0)
    reg2.prepare(ctx_for(other))
    with pytest.raises(RuntimeError, match="theta0"):
        reg2.load_state_dict(state)
    reg3 = L2SP(lam=1.0)
    reg3.prepare(ctx_for(model))
    reg3.load_state_dict(state)  # same initial weights: fine


# ----------------------------------------------------------------------------- EWC penalty

def test_ewc_penalty_and_grad_term_match_formula():
    model, _ = tiny_model()
    g = torch.Generator().manual_seed(3)
    named = dict(model.named_parameters())
    reg = EWC(lam=3.0)
    ctx = ctx_for(model)
    reg._setup(ctx)  # set theta0 only; the Fisher is injected below (estimation: test_fisher.py)
    reg.fisher = [torch.rand(named[n].shape, generator=g) for n in reg.names]
    theta0 = {n: a.clone() for n, a in zip(reg.names, reg.anchor, strict=True)}
    fisher = dict(zip(reg.names, reg.fisher, strict=True))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    assert float(reg.grad_term(ctx)) == 0.0
    perturb(model)
    model.zero_grad(set_to_none=True)
    ref = 3.0 * ewc_penalty(named, theta0, fisher)
    formula = 1.5 * sum((fisher[n] * (named[n].detach() - theta0[n]) ** 2).sum() for n in named)
    torch.testing.assert_close(ref.detach(), formula)
    ref.backward()
    expected = {n: p.grad.clone() for n, p in named.items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    v = reg.grad_term(ctx)
    torch.testing.assert_close(v, formula)
    for n, p in named.items():
        torch.testing.assert_close(p.grad, expected[n])
        torch.testing.assert_close(p.grad, 3.0 * fisher[n] * (p.detach() - theta0[n]))


# ----------------------------------------------------------------------------- KL

def test_kl_zero_at_init_positive_after_and_resumable():
    model, tok = tiny_model()
    spec = config_from_dict({"regularizers": [{"type": "kl", "lambda": 2.0, "data": {
        "path": GENERAL, "format": "text", "limit": 16}}]}).regularizers[0].data
    stream = BatchStream(load_examples(spec, tok, max_length=64), 4, tok.pad_token_id)
    reg = KLToInit(2.0, stream)
    ctx = ctx_for(model)
    reg.prepare(ctx)
    v0 = reg.penalty(ctx, {})
    assert abs(float(v0.detach())) < 1e-6
    perturb(model, 0.2)
    v1 = reg.penalty(ctx, {})
    assert float(v1.detach()) > 1e-4 and v1.requires_grad
    v1.backward()
    assert any(p.grad is not None and float(p.grad.abs().max()) > 0 for p in model.parameters())
    assert all(p.grad is None for p in reg.reference.parameters())
    st = reg.state_dict()
    assert st["calls"] == 2
    reg2 = KLToInit(2.0, BatchStream(load_examples(spec, tok, max_length=64), 4,
                                     tok.pad_token_id))
    reg2.prepare(ctx)
    reg2.load_state_dict(st)
    assert reg2.calls == 2
    assert reg2.batches.indices(2) == reg.batches.indices(2)


# ----------------------------------------------------------------------------- WiSE-FT

def test_wise_interpolation_and_checkpoints(tmp_path):
    from forgetkit.models import save_hf_checkpoint
    from forgetkit.regularizers.wise import load_hf_state_dict

    m0, tok = tiny_model(0)
    m1, _ = tiny_model(1)
    sd0, sd1 = m0.state_dict(), m1.state_dict()
    for k in sd0:
        torch.testing.assert_close(interpolate_state_dicts(sd0, sd1, 0.0)[k], sd0[k])
        torch.testing.assert_close(interpolate_state_dicts(sd0, sd1, 1.0)[k], sd1[k])
        torch.testing.assert_close(interpolate_state_dicts(sd0, sd1, 0.25)[k],
                                   0.75 * sd0[k] + 0.25 * sd1[k])
    save_hf_checkpoint(m0, tok, tmp_path / "m0")
    save_hf_checkpoint(m1, tok, tmp_path / "m1")
    dirs = write_wise_checkpoints(tmp_path / "m0", tmp_path / "m1", [0.0, 0.5, 1.0],
                                  tmp_path / "wise")
    assert sorted(dirs) == [0.0, 0.5, 1.0]
    f0, f1 = load_hf_state_dict(tmp_path / "m0"), load_hf_state_dict(tmp_path / "m1")
    mid = load_hf_state_dict(dirs[0.5])
    for k in f0:
        torch.testing.assert_close(mid[k], 0.5 * f0[k] + 0.5 * f1[k])
    assert (dirs[0.5] / "config.json").exists() and (dirs[0.5] / "tokenizer.json").exists()


# ----------------------------------------------------------------------------- config wiring

def _cfg(regs, tmp_path, **extra):
    raw = {"name": "t", "seed": 0,
           "model": {"random_init": dict(TINY), "tokenizer": "byte"},
           "data": {"train": {"path": GENERAL, "format": "text", "limit": 40},
                    "validation_fraction": 0.1, "max_length": 96, "batching": "random"},
           "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 2,
                        "max_steps": 6, "lr": 1e-2, "scheduler": "cosine", "log_every": 1,
                        "checkpoint_every": 3, "keep_checkpoints": 2},
           "output": {"dir": str(tmp_path / "{name}")},
           "regularizers": regs}
    raw.update(extra)
    return config_from_dict(raw)


def test_build_regularizers(tmp_path):
    from forgetkit.data.sets import build_example_sets

    cfg = _cfg([{"type": "l2", "lambda": 0.5, "variant": "decoupled"},
                {"type": "l2", "lambda": 1.0},
                {"type": "ewc", "lambda": 10, "fisher_examples": 6, "fisher_batch_size": 4,
                 "fisher_data": {"path": GENERAL, "format": "text"}},
                {"type": "kl", "lambda": 0.1, "batch_size": 3,
                 "data": {"path": GENERAL, "format": "text"}}],
               tmp_path)
    cfg.data.replay = config_from_dict({"data": {"replay": {
        "ratio": 0.2, "data": {"path": GENERAL, "format": "text"}}}}).data.replay
    _, tok = tiny_model()
    sets = build_example_sets(cfg, tok)
    regs = build_regularizers(cfg, sets, tok.pad_token_id)
    assert [r.name for r in regs] == ["l2_0", "l2_1", "ewc", "kl"]
    assert isinstance(regs[0], L2SP) and regs[0].variant == "decoupled"
    assert isinstance(regs[2], EWC) and regs[2].run_dir == tmp_path / "t"
    # the data layer built every example set: EWC gets 6 examples in batches of 4, KL a stream
    assert [int(b["input_ids"].shape[0]) for b in regs[2].batches] == [4, 2]
    assert regs[2].identity is not None and regs[2].identity["fisher_examples"] == 6
    assert isinstance(regs[3], KLToInit) and regs[3].batches.batch_size == 3
    assert len(sets.replay) > 0 and sets.replay_ratio == 0.2
    assert all(e.source == 1 for e in sets.replay)
    with pytest.raises(ConfigError, match="fisher_data"):
        build_regularizers(_cfg([{"type": "ewc", "lambda": 1.0}], tmp_path), sets, 0)
    with pytest.raises(ConfigError, match="fisher_clamp"):
        build_regularizers(_cfg([{"type": "ewc", "fisher_postprocess": "clamp", "fisher_data":
                                  {"path": GENERAL, "format": "text"}}], tmp_path), sets, 0)


# ----------------------------------------------------------------------------- resume

def _final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "model" / "model.safetensors"))


@pytest.mark.parametrize("reg", [
    {"type": "l2", "lambda": 5.0},
    {"type": "l2", "lambda": 5.0, "variant": "decoupled"},
    {"type": "ewc", "lambda": 50.0, "fisher_examples": 12, "fisher_batch_size": 4,
     "fisher_data": {"path": GENERAL, "format": "text"}},
], ids=["l2-coupled", "l2-decoupled", "ewc"])
def test_resume_equals_uninterrupted(tmp_path, reg):
    from forgetkit.train.loop import train

    cfg = _cfg([reg], tmp_path)
    res = train(cfg, progress=False)
    full = _final_weights(res.out_dir)
    log = [json.loads(x) for x in (res.out_dir / "train_log.jsonl").read_text().splitlines()]
    name = regularizer_names(cfg)[0]
    vals = [r[f"reg/{name}"] for r in log if f"reg/{name}" in r]
    assert len(vals) == 6 and vals[0] >= 0.0 and vals[-1] > 0.0  # the regularizer acted

    ckpts = res.out_dir / "checkpoints"
    assert (ckpts / "step-00000003" / "COMPLETE").exists()
    shutil.rmtree(ckpts / "step-00000006")
    shutil.rmtree(res.out_dir / "model")
    res2 = train(cfg, progress=False)
    assert res2.resumed_from == 3
    resumed = _final_weights(res2.out_dir)
    assert full.keys() == resumed.keys()
    for k in full:
        torch.testing.assert_close(resumed[k], full[k], rtol=0, atol=0)
    log2 = [json.loads(x) for x in (res.out_dir / "train_log.jsonl").read_text().splitlines()]
    vals2 = [r[f"reg/{name}"] for r in log2 if f"reg/{name}" in r]
    assert vals2 == pytest.approx(vals, rel=1e-6)


# ----------------------------------------------------------------------------- the seam

def test_capture_reference_keeps_theta0_and_fisher_across_a_checkpoint_load():
    """A loop that loads a checkpoint into the model before ``prepare`` (a resuming HF Trainer)
    captures theta0 first: the anchors, the Fisher and the KL reference are those of theta0,
    not of the loaded weights."""
    model, tok = tiny_model()
    examples = load_examples(config_from_dict({"regularizers": [{
        "type": "kl", "data": {"path": GENERAL, "format": "text", "limit": 8}}]}
    ).regularizers[0].data, tok, max_length=64)
    from forgetkit.data.batching import make_batches

    batches = make_batches(examples, 4, tok.pad_token_id)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    direct = EWC(5.0, batches=batches, include=["mlp"])  # prepared at theta0: the reference
    direct.prepare(ctx_for(model))
    kl_direct = KLToInit(1.0, BatchStream(examples, 4, tok.pad_token_id))
    kl_direct.prepare(ctx_for(model))

    l2, ewc = L2SP(1.0), EWC(5.0, batches=batches, include=["mlp"])
    kl = KLToInit(1.0, BatchStream(examples, 4, tok.pad_token_id))
    for r in (l2, ewc, kl):
        r.capture_reference(model)
    perturb(model, 0.1)  # "the checkpoint's weights"
    ctx = ctx_for(model)
    for r in (l2, ewc, kl):
        r.prepare(ctx)
    for n, a in zip(l2.names, l2.anchor, strict=True):
        assert torch.equal(a, theta0[n])
    assert ewc.names == direct.names
    for a, b in zip(ewc.fisher, direct.fisher, strict=True):
        assert torch.equal(a, b)
    for n, a in zip(ewc.names, ewc.anchor, strict=True):
        assert torch.equal(a, theta0[n])
    # the same reference model: the same KL on the same stream batch
    torch.testing.assert_close(kl.penalty(ctx, {}), kl_direct.penalty(ctx, {}), rtol=0, atol=0)
    assert float(kl.penalty(ctx, {}).detach()) > 1e-4  # the perturbed model differs from it


def test_grads_in_params_false_puts_the_term_in_the_loss():
    """``grads_in_params=False`` (DeepSpeed, or a loop that wants the term before its clip):
    L2-SP's penalty goes through autograd and its gradient is exactly lam * (theta - theta0)."""
    model, _ = tiny_model()
    reg = L2SP(2.0)
    ctx = RegContext(model=model, params=model.named_parameters, device=torch.device("cpu"),
                     grads_in_params=False)
    reg.prepare(ctx)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    perturb(model, 0.05)
    assert reg.grad_term(ctx) is None
    model.zero_grad(set_to_none=True)
    reg.penalty(ctx, {}).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 2.0 * (p.detach() - theta0[n]))


def test_regularizers_use_only_the_typed_context():
    """No regularizer reaches into a loop: the context has no backend, tokenizer or extras."""
    import dataclasses

    fields = {f.name for f in dataclasses.fields(RegContext)}
    assert fields == {"model", "params", "device", "rank", "world_size", "strategy",
                      "zero_stage", "grads_in_params", "all_reduce_sum", "autocast", "param_lr"}
    src = "\n".join((ROOT / "forgetkit/regularizers" / f).read_text()
                    for f in ("l2.py", "ewc.py", "kl.py", "fisher.py", "functional.py"))
    for banned in ("ctx.backend", "ctx.tokenizer", "ctx.extra", "load_records", "forgetkit.train"):
        assert banned not in src, banned
