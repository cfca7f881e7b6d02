"""Padding-free batches (``data.batching: padding_free``) on a tiny random-init Llama, CPU fp32.

The padding-free forward must compute what the padded forward computes, example by example:
the same per-token losses, the same training steps, no attention across example boundaries.

Tolerances. Both forwards do the same fp32 arithmetic on different matmul shapes (one row of N
tokens against B rows of T), so only the summation order differs: masked keys contribute exact
zeros in both. Each output is a sum of at most ~1e2 products per matmul (hidden 64, MLP 128,
<= 64 keys), a relative rounding error of order sqrt(n) * eps_fp32 ~ 1e-6 per layer, so the
per-token cross-entropy (~5.5 here) differs by ~1e-6..1e-5 absolute; measured: 4.8e-7 under
ATEN_CPU_CAPABILITY=default, 0 under avx2 (1 and 2 threads each). CE_ATOL = 1e-4 sits well above that and
far below what a boundary leak does (``test_per_token_losses_match_padded`` measures the leak of a
row whose positions do not restart: O(1e-1)). Training: the accumulation test's argument
(tests/test_loop.py), same thresholds; measured: relative update difference <= 3.3e-5 and
losses equal to 1e-7 relative in the four environments above.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LLAMA
from numerics import diff_report, relative_update_diff
from safetensors.torch import load_file

from forgetkit.config import ConfigError, ModelConfig
from forgetkit.data.batching import collate, collate_flat, plan_batches
from forgetkit.data.templates import IGNORE_INDEX, Example
from forgetkit.models import load_model
from forgetkit.train import segment_attention
from forgetkit.train.loop import (
    PaddingFree,
    model_inputs,
    padding_free_setup,
    token_losses,
    train,
)

CE_ATOL = 1e-4
LEAK_MIN = 100 * CE_ATOL  # a boundary leak must show at least this (checked, not assumed)
UPDATE_RTOL = 1e-3  # as ACCUM_UPDATE_RTOL in tests/test_loop.py
LOSS_RTOL = 1e-5  # as ACCUM_LOSS_RTOL in tests/test_loop.py
IMPLS = ("sdpa", "eager")
# (implementation, how): every way a padding-free forward keeps the boundaries; ``segments``
# (one SDPA per example, forgetkit.train.segment_attention) exists for sdpa models only
HOWS = [(i, h) for i in IMPLS for h in ("segments", "position_ids", "mask")
        if h != "segments" or i == "sdpa"]


def tiny_model(impl: str) -> torch.nn.Module:
    model, _ = load_model(ModelConfig(random_init=copy.deepcopy(TINY_LLAMA), tokenizer="byte",
                                      attn_implementation=impl))
    return model.eval()


def model_for(impl: str, how: str) -> tuple[torch.nn.Module, PaddingFree]:
    """The tiny model and its padding-free form; ``segments`` switches the model's attention
    implementation as padding_free_setup does."""
    model = tiny_model(impl)
    if how == "segments":
        model.config._attn_implementation = segment_attention.register()
    return model, PaddingFree(how, impl)


def examples(seed: int = 0, n: int = 6) -> list[Example]:
    """Random token examples of different lengths, prompt masked, last label ignored."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 48, (1,), generator=g))
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        prompt = int(torch.randint(1, length - 1, (1,), generator=g))
        labels = [ids[t + 1] if t + 1 >= prompt else IGNORE_INDEX for t in range(length - 1)]
        out.append(Example(ids, labels + [IGNORE_INDEX], source=len(out) % 2))
    return out


def padded_ce(model: torch.nn.Module, exs: list[Example]) -> list[torch.Tensor]:
    batch = collate(exs, pad_id=257, pad_to_multiple_of=8)
    with torch.no_grad():
        ce = token_losses(model(**model_inputs(batch, None)), batch["labels"])
    return [ce[i, :len(e.input_ids)] for i, e in enumerate(exs)]


def flat_ce(model: torch.nn.Module, exs: list[Example], pf: PaddingFree,
            batch: dict | None = None) -> list[torch.Tensor]:
    batch = batch or collate_flat(exs)
    with torch.no_grad():
        ce = token_losses(model(**model_inputs(batch, pf)), batch["labels"])[0]
    cu = batch["cu_seq_lens"].tolist()
    return [ce[cu[i]:cu[i + 1]] for i in range(len(exs))]


def max_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(("impl", "how"), HOWS)
def test_per_token_losses_match_padded(impl, how):
    (model, pf), exs = model_for(impl, how), examples()
    ref = padded_ce(model, exs)  # padded batches: plain sdpa/eager whatever ``how`` is
    got = flat_ce(model, exs, pf)
    d = max_diff(got, ref)
    print(f"\n{impl}/{how}: max |CE_flat - CE_padded| = {d:.2e}")
    assert d <= CE_ATOL, f"{impl}/{how}: per-token losses differ by {d:.3e} > {CE_ATOL:g}"
    # The comparison has power: the same row with positions that do not restart (transformers
    # then sees one sequence: attention crosses every boundary) is far off.
    batch = collate_flat(exs)
    batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
    leak = max_diff(flat_ce(model, exs, PaddingFree("position_ids", impl), batch), ref)
    assert leak >= LEAK_MIN, f"a leaking row differs by only {leak:.3e}: the test is vacuous"


@pytest.mark.parametrize(("impl", "how"), HOWS)
def test_no_attention_across_boundaries(impl, how):
    """Changing example 1's tokens leaves example 2's logits in the same row unchanged."""
    model, pf = model_for(impl, how)
    a, b, c = examples(seed=1, n=3)
    a2 = Example([(t + 7) % 256 for t in a.input_ids], a.labels)

    def logits(exs):
        batch = collate_flat(exs)
        with torch.no_grad():
            return model(**model_inputs(batch, pf)).logits[0], batch["cu_seq_lens"].tolist()

    (x, cu), (y, _) = logits([a, b, c]), logits([a2, b, c])
    assert not torch.equal(x[:cu[1]], y[:cu[1]])  # example 1 did change
    # B and C see only themselves: masked keys add exact zeros, same shapes, same kernels, so
    # rounding at most (the probe's bound; measured: bitwise equal); a leak is O(1e-1).
    bound = 4 * torch.finfo(torch.float32).eps * max(1.0, float(x.abs().max()))
    d = float((x[cu[1]:] - y[cu[1]:]).abs().max())
    assert d <= bound, f"{impl}/{how}: {d:.3e} > {bound:.3e}; {diff_report({'l': x}, {'l': y})}"
    alone, _ = logits([b])
    d = float((x[cu[1]:cu[2]] - alone).abs().max())
    assert d <= CE_ATOL, f"{impl}/{how}: example 2 in the row vs alone differs by {d:.3e}"


def test_collate_flat_has_no_padding():
    exs = examples(seed=2, n=5)
    lens = [len(e.input_ids) for e in exs]
    flat, padded = collate_flat(exs), collate(exs, pad_id=257, pad_to_multiple_of=8)
    n = flat["input_ids"].numel()
    assert flat["input_ids"].shape == (1, sum(lens)) and n == sum(lens)
    assert padded["input_ids"].numel() > sum(lens)  # the padded batch does pad this data
    assert flat["cu_seq_lens"].tolist() == [sum(lens[:i]) for i in range(len(lens) + 1)]
    assert flat["max_length"] == max(lens)
    pos, cu = flat["position_ids"][0].tolist(), flat["cu_seq_lens"].tolist()
    for i, e in enumerate(exs):
        s, t = cu[i], cu[i + 1]
        assert pos[s:t] == list(range(lens[i]))
        assert flat["input_ids"][0, s:t].tolist() == e.input_ids
        assert flat["labels"][0, s:t].tolist() == e.labels  # per example, pre-shifted
        assert flat["labels"][0, t - 1] == IGNORE_INDEX  # no target crosses the boundary
        assert set(flat["source"][0, s:t].tolist()) == {e.source}
    n_targets = sum(e.n_targets for e in exs)
    assert int((flat["labels"] != IGNORE_INDEX).sum()) == n_targets
    assert int((padded["labels"] != IGNORE_INDEX).sum()) == n_targets
    with pytest.raises(ValueError, match="last label"):
        collate_flat([Example([1, 2, 3], [2, 3, 4])])  # a packed text block


def test_plan_is_length_grouped():
    g = torch.Generator().manual_seed(3)
    lens = [int(x) for x in torch.randint(5, 300, (96,), generator=g)]
    for epoch in (0, 1):
        assert plan_batches(lens, 8, "padding_free", 0, epoch) == \
            plan_batches(lens, 8, "length_grouped", 0, epoch)


def _run(tiny_cfg, tmp_path: Path, batching: str, impl: str):
    cfg = tiny_cfg(model={"random_init": copy.deepcopy(TINY_LLAMA), "tokenizer": "byte",
                          "attn_implementation": impl},
                   data={"batching": batching},
                   training={"max_steps": 3, "warmup_steps": 0, "micro_batch_size": 2,
                             "gradient_accumulation_steps": 2},
                   output={"dir": str(tmp_path / f"{impl}-{batching}")})
    res = train(cfg, progress=False)
    recs = [json.loads(x) for x in (res.out_dir / "train_log.jsonl").read_text().splitlines()]
    w = load_file(str(res.out_dir / "model" / "model.safetensors"))
    return cfg, res, [r["loss"] for r in recs if "loss" in r], w


@pytest.mark.parametrize("impl", IMPLS)
def test_training_matches_padded(tiny_cfg, tmp_path, impl):
    cfg, pad, lp, wp = _run(tiny_cfg, tmp_path, "length_grouped", impl)
    _, flat, lf, wf = _run(tiny_cfg, tmp_path, "padding_free", impl)
    assert len(lp) == len(lf) == 3
    assert lf == pytest.approx(lp, rel=LOSS_RTOL), (lf, lp)
    assert flat.tokens == pad.tokens and flat.target_tokens == pad.target_tokens
    assert math.isfinite(pad.final_val_loss)
    assert flat.final_val_loss == pytest.approx(pad.final_val_loss, rel=LOSS_RTOL)
    model, _ = load_model(cfg.model)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rel, where = relative_update_diff(wf, wp, init)
    print(f"\n{impl}: padding-free vs padded: max relative update difference {rel:.3e} "
          f"({where}); {diff_report(wf, wp)}")
    assert not [k for k in wp if torch.equal(wp[k], init[k])]  # every tensor moved
    assert rel <= UPDATE_RTOL, f"{where}: relative update difference {rel:.3e}"
    # the run's attention switch (sdpa -> segments) is not written into the saved model
    assert segment_attention.SEGMENT_ATTN not in (flat.model_dir / "config.json").read_text()


def test_setup_picks_segments_for_sdpa_and_transformers_detection_for_eager():
    for impl, want, attn in (("sdpa", "segments", segment_attention.SEGMENT_ATTN),
                             ("eager", "position_ids", "eager")):
        model = tiny_model(impl)
        backend = SimpleNamespace(model=model, unwrap=lambda m=model: m,
                                  device=torch.device("cpu"),
                                  forward=lambda m=model, **kw: m(**kw), autocast=torch.no_grad)
        pf = padding_free_setup(backend)
        assert (pf.how, pf.attn_implementation) == (want, impl)
        assert model.config._attn_implementation == attn


def test_segments_do_the_attention_flops_of_the_examples_alone(monkeypatch):
    """The block-diagonal mask computes attention scores over the whole row (N^2 per head and
    layer); segments over the examples (sum of n_i^2): the query x key sizes of every SDPA call
    counted. Padded batches through the segment implementation are plain sdpa, bit for bit."""
    exs = examples(seed=4, n=4)
    batch = collate_flat(exs)
    lens = [len(e.input_ids) for e in exs]
    sdpa, scores = torch.nn.functional.scaled_dot_product_attention, []

    def counting(q, k, v, *a, **kw):
        scores.append(q.shape[:-2].numel() * q.shape[-2] * k.shape[-2])
        return sdpa(q, k, v, *a, **kw)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)

    def attn_scores(how: str) -> int:
        model, pf = model_for("sdpa", how)
        scores.clear()
        with torch.no_grad():
            model(**model_inputs(batch, pf))
        return sum(scores)

    full, seg = attn_scores("position_ids"), attn_scores("segments")
    assert full > 0 and seg > 0
    assert seg / full == pytest.approx(sum(n * n for n in lens) / sum(lens) ** 2, rel=1e-12)
    plain, seg_model = tiny_model("sdpa"), model_for("sdpa", "segments")[0]
    padded = collate(exs, pad_id=257, pad_to_multiple_of=8)
    with torch.no_grad():
        a = plain(**model_inputs(padded, None)).logits
        b = seg_model(**model_inputs(padded, None)).logits
    assert torch.equal(a, b)


def test_segments_refuse_boundaries_that_do_not_describe_the_row():
    model, pf = model_for("sdpa", "segments")
    batch = collate_flat(examples(seed=5, n=3))
    kw = model_inputs(batch, pf)
    kw["fk_segments"] = kw["fk_segments"][:-1]  # the last example left out
    with pytest.raises(ValueError, match="fk_segments"):
        model(**kw)


def test_setup_refuses_a_model_that_crosses_boundaries():
    """A model that ignores positions and masks (here: a wrapper dropping them) is refused."""
    model = tiny_model("sdpa")

    def forward(input_ids, **kw):
        return model(input_ids=input_ids, use_cache=False)  # one causal sequence: leaks

    backend = SimpleNamespace(model=model, unwrap=lambda: model, device=torch.device("cpu"),
                              forward=forward, autocast=torch.no_grad)
    with pytest.raises(ConfigError, match="padding_free.*does not keep the example boundaries"):
        padding_free_setup(backend)
    assert model.config._attn_implementation == "sdpa"  # the failed segments probe undone


def test_segments_are_not_used_for_sliding_window_layers():
    """sdpa keeps a sliding window through its mask, which segments do not build: a model with
    one (Mistral) falls back to transformers' block-diagonal mask, and its losses still match."""
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=258, hidden_size=32, intermediate_size=64,
                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                        sliding_window=8, attn_implementation="sdpa")
    model = MistralForCausalLM(cfg).eval()
    backend = SimpleNamespace(model=model, unwrap=lambda: model, device=torch.device("cpu"),
                              forward=lambda **kw: model(**kw), autocast=torch.no_grad)
    pf = padding_free_setup(backend)
    assert pf.how == "position_ids" and model.config._attn_implementation == "sdpa"
    exs = examples(seed=6, n=3)  # up to 47 tokens: the window of 8 matters
    assert max_diff(flat_ce(model, exs, pf), padded_ce(model, exs)) <= CE_ATOL


@pytest.mark.parametrize("mixed_precision", ["no", "bf16", "fp16"])
def test_probe_tolerance_is_the_compute_dtypes(monkeypatch, mixed_precision):
    """Under mixed precision the probe's forwards compute in 16 bits over fp32 weights, and B in
    the row may round differently from B alone (another matmul shape: on a GPU cuBLAS picks
    other kernels) by a 16-bit ulp, far above fp32's sqrt(eps): the tolerance is the compute
    dtype's (bf16: 4 eps = 0.031, sqrt(eps) = 0.088 of the logit scale), which still refuses a
    leak across the boundary (0.44-1.6 of the scale on random-init Llamas). The CPU computes
    both shapes alike, so the rounding is injected here: the probe's answer is replaced."""
    import forgetkit.train.loop as loop

    model = tiny_model("sdpa")
    backend = SimpleNamespace(model=model, unwrap=lambda: model, device=torch.device("cpu"),
                              forward=lambda **kw: model(**kw), autocast=torch.no_grad,
                              tcfg=SimpleNamespace(mixed_precision=mixed_precision))
    eps16 = {"bf16": torch.finfo(torch.bfloat16).eps,
             "fp16": torch.finfo(torch.float16).eps}.get(mixed_precision)
    assert loop.probe_eps(backend, model) == (eps16 or torch.finfo(torch.float32).eps)
    # a 16-bit rounding difference between B in the row and B alone (4 ulps of bf16/fp16 at
    # the scale 2; 2 x sqrt(fp32 eps) for fp32)
    rounding = 4 * (eps16 or math.sqrt(torch.finfo(torch.float32).eps) / 2) * 2.0
    monkeypatch.setattr(loop, "_boundary_probe", lambda *a, **k: (0.0, rounding, 2.0))
    if eps16 is None:  # fp32 weights, fp32 compute: such a difference is no rounding
        with pytest.raises(ConfigError, match="does not keep the example boundaries"):
            padding_free_setup(backend)
    else:
        assert padding_free_setup(backend).how == "segments"
    # a leak across the boundary is refused at every precision
    monkeypatch.setattr(loop, "_boundary_probe", lambda *a, **k: (0.44 * 2.0, 0.47 * 2.0, 2.0))
    with pytest.raises(ConfigError, match="does not keep the example boundaries"):
        padding_free_setup(backend)
