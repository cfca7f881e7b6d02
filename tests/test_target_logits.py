"""Logits at target positions only (``training.logits: targets``, the default) on a tiny
random-init Llama, CPU fp32.

The vocabulary projection runs on the K target positions instead of all B x T: the same hidden
states through a matmul with fewer rows, so each kept logit is the full forward's up to the
rounding of another GEMM shape, and positions without a target never entered the loss (their
cross-entropy gradient is exactly 0). Tolerances as tests/test_padding_free.py (the same
argument: only the summation order of fp32 matmuls differs): per-token CE within CE_ATOL 1e-4,
training losses within rel 1e-5, weight updates within a relative difference of 1e-3; measured
here: CE equal to ~1e-6, updates ~1e-5 (ATEN_CPU_CAPABILITY default/avx2, 1 and 2 threads).
"""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch
from conftest import TINY_LLAMA
from numerics import diff_report, relative_update_diff
from safetensors.torch import load_file

from forgetkit.config import ModelConfig
from forgetkit.data.batching import collate, collate_flat
from forgetkit.data.templates import IGNORE_INDEX, Example
from forgetkit.models import load_model
from forgetkit.train.loop import (
    PaddingFree,
    model_inputs,
    target_logits_setup,
    target_losses,
    target_mask,
    token_losses,
    train,
)

CE_ATOL = 1e-4
LOSS_RTOL = 1e-5
UPDATE_RTOL = 1e-3


def tiny_model() -> torch.nn.Module:
    model, _ = load_model(ModelConfig(random_init=copy.deepcopy(TINY_LLAMA), tokenizer="byte",
                                      attn_implementation="sdpa"))
    return model.eval()


def examples(seed: int = 0, n: int = 5) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 40, (1,), generator=g))
        ids = torch.randint(0, 256, (length,), generator=g).tolist()
        prompt = int(torch.randint(2, length - 1, (1,), generator=g))
        labels = [ids[t + 1] if t + 1 >= prompt else IGNORE_INDEX for t in range(length - 1)]
        out.append(Example(ids, labels + [IGNORE_INDEX]))
    return out


def backend_of(model, forward=None):
    return SimpleNamespace(model=model, unwrap=lambda: model, device=torch.device("cpu"),
                           forward=forward or (lambda **kw: model(**kw)),
                           autocast=torch.no_grad)


@pytest.mark.parametrize("flat", [False, True])
def test_kept_losses_equal_the_full_forward(flat):
    model, exs = tiny_model(), examples()
    pf = PaddingFree("position_ids", "sdpa") if flat else None
    batch = collate_flat(exs) if flat else collate(exs, pad_id=257, pad_to_multiple_of=8)
    keep = target_mask(batch, True)
    with torch.no_grad():
        full = token_losses(model(**model_inputs(batch, pf)), batch["labels"])
        out = model(**model_inputs(batch, pf, keep))
        kept = target_losses(out, batch["labels"], keep)
    k = int(keep.sum())
    assert out.logits.shape == (k, model.config.vocab_size) and 0 < k < keep.numel() / 2  # fewer rows
    d = float((kept - full[keep]).abs().max())
    assert d <= CE_ATOL, d
    assert float(full[~keep].abs().max()) == 0.0  # what the kept forward leaves out is 0
    assert float(kept.sum()) == pytest.approx(float(full.sum()), rel=LOSS_RTOL)


def test_setup_accepts_transformers_models():
    model = tiny_model()
    assert target_logits_setup(backend_of(model), None, 257) is True
    assert target_logits_setup(backend_of(model), PaddingFree("position_ids", "sdpa"), 257)


def test_setup_falls_back_when_the_model_cannot(caplog):
    """A forward without the keyword, and one that ignores it (full logits), fall back."""
    model = tiny_model()

    def no_kw(input_ids, attention_mask=None, **kw):
        if "logits_to_keep" in kw:
            raise TypeError("forward() got an unexpected keyword argument 'logits_to_keep'")
        return model(input_ids=input_ids, attention_mask=attention_mask)

    def ignores(input_ids, attention_mask=None, **kw):
        return model(input_ids=input_ids, attention_mask=attention_mask)

    with caplog.at_level("INFO", logger="forgetkit"):
        assert target_logits_setup(backend_of(model, no_kw), None, 257) is False
        assert target_logits_setup(backend_of(model, ignores), None, 257) is False
    assert "TypeError" in caplog.text and "logits of shape" in caplog.text
    assert "computed at every position" in caplog.text
    assert model.training is False  # the probe restores the mode it found


def _run(tiny_cfg, tmp_path, logits: str, batching: str, replay: bool = False):
    data = {"batching": batching}
    if replay:
        data["replay"] = {"ratio": 0.25, "data": {"path": str(tmp_path / "task.jsonl"),
                                                  "format": "instruction"}}
    cfg = tiny_cfg(data=data,
                   training={"max_steps": 3, "warmup_steps": 0, "micro_batch_size": 2,
                             "gradient_accumulation_steps": 2, "logits": logits},
                   output={"dir": str(tmp_path / f"{logits}-{batching}-{replay}")})
    res = train(cfg, progress=False)
    recs = [json.loads(x) for x in (res.out_dir / "train_log.jsonl").read_text().splitlines()]
    w = load_file(str(res.out_dir / "model" / "model.safetensors"))
    return cfg, res, recs, w


@pytest.mark.parametrize("batching,replay", [("length_grouped", False),
                                             ("padding_free", False),
                                             ("length_grouped", True)])
def test_training_equals_all_positions(tiny_cfg, tmp_path, batching, replay):
    cfg, a, ra, wa = _run(tiny_cfg, tmp_path, "all", batching, replay)
    _, t, rt, wt = _run(tiny_cfg, tmp_path, "targets", batching, replay)
    keys = ["loss"] + (["loss/replay"] if replay else [])
    for k in keys:
        la, lt = [r[k] for r in ra if k in r], [r[k] for r in rt if k in r]
        # every step logs a loss; a replay loss where the step drew replay examples
        assert len(la) == (3 if k == "loss" else len(lt)) >= 1, (k, la, lt)
        assert lt == pytest.approx(la, rel=LOSS_RTOL), (k, la, lt)
    assert t.tokens == a.tokens and t.target_tokens == a.target_tokens
    if replay:  # the replay examples the 3 steps of 2 x 2 examples trained on, recorded
        info = json.loads((t.out_dir / "train_result.json").read_text())
        n_steps_with_replay = len([r for r in rt if "loss/replay" in r])
        assert n_steps_with_replay <= info["n_replay_trained"] < 12
    assert t.final_val_loss == pytest.approx(a.final_val_loss, rel=LOSS_RTOL)
    model, _ = load_model(cfg.model)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    rel, where = relative_update_diff(wt, wa, init)
    print(f"\n{batching} replay={replay}: targets vs all: max relative update difference "
          f"{rel:.3e} ({where}); {diff_report(wt, wa)}")
    assert not [k for k in wa if torch.equal(wa[k], init[k])]  # every tensor moved
    assert rel <= UPDATE_RTOL, f"{where}: relative update difference {rel:.3e}"


def test_memory_estimate_counts_the_kept_positions(tiny_cfg):
    """forgetkit.memory: the logits/loss term is K V (c + 12) bytes at K kept positions; without
    the data's count it is every position's, and the note says it is an upper bound."""
    from forgetkit.memory import _hf_config_from_model_cfg, estimate_for_config

    cfg = tiny_cfg(training={"micro_batch_size": 4, "logits": "targets"})
    v, s, b = _hf_config_from_model_cfg(cfg.model).vocab_size, cfg.data.max_length, 4
    assert v > 200  # the byte tokenizer's vocabulary
    full = estimate_for_config(cfg)
    kept = estimate_for_config(cfg, logit_positions=100)
    assert full.details["logits_bytes"] == s * b * v * 16  # fp32: 4 + 12 bytes per logit
    assert kept.details["logits_bytes"] == 100 * v * 16
    assert full.total_bytes - kept.total_bytes == (s * b - 100) * v * 16
    assert any("upper bound" in n for n in full.notes)
    assert not any("training.logits" in n for n in kept.notes)
    every = tiny_cfg(training={"micro_batch_size": 4, "logits": "all"})
    assert estimate_for_config(every, logit_positions=100).details["logits_bytes"] == \
        s * b * v * 16  # 'all' computes every position whatever the data
    with pytest.raises(ValueError, match="logit_positions"):
        from forgetkit.memory import estimate, typical_shape

        estimate(typical_shape(10_000_000), seq_len=8, micro_batch=2, logit_positions=17)


@pytest.mark.parametrize("mixed_precision", ["no", "bf16"])
def test_probe_tolerance_is_the_compute_dtypes(mixed_precision):
    """Under bf16 autocast the kept logits come from a smaller matmul in bf16, which may round
    differently from the full forward's by a bf16 ulp (on a GPU: another cuBLAS kernel); the
    probe accepts that under bf16 (tolerance sqrt(bf16 eps) x scale) and not in fp32, where
    such a difference is no rounding. The rounding is injected (the CPU computes both alike)."""
    model = tiny_model()

    def rounds_16bit(**kw):
        out = model(**kw)
        if "logits_to_keep" in kw:  # 4 bf16 ulps of the logit scale
            scale = max(1.0, float(out.logits.abs().max()))
            out.logits = out.logits + 4 * torch.finfo(torch.bfloat16).eps * scale
        return out

    backend = backend_of(model, rounds_16bit)
    backend.tcfg = SimpleNamespace(mixed_precision=mixed_precision)
    assert target_logits_setup(backend, None, 257) is (mixed_precision == "bf16")
