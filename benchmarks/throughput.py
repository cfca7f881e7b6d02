"""Training throughput where users run it: forgetkit's loop against HF ``Trainer`` at its best.

One run measures, on the same random-init Llama, the same instruction data (thousands of
examples with a realistic length distribution) and the same hyper-parameters, the *target tokens
per second* (tokens that carry loss: the responses) of these ways to fully fine-tune a causal LM:

  hf-grouped  HF ``Trainer`` with ``train_sampling_strategy="group_by_length"`` (transformers 5
              spelling of ``group_by_length=True``: ``LengthGroupedSampler``) and dynamic padding,
              ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``;
  hf-flat     HF ``Trainer`` padding-free: ``DataCollatorWithFlattening`` (each micro-batch one
              row, ``position_ids`` restarting per example; with sdpa and no attention mask
              transformers builds the block-diagonal causal mask from the position resets);
  fk-grouped  ``forgetkit.train.loop.train(cfg)`` with ``data.batching: length_grouped``;
  fk-flat     the same with ``data.batching: padding_free``;
  fk-flat-all the same with ``training.logits: all`` (the LM head and the cross-entropy at every
              position, as HF computes them; the two forgetkit rows above use the default
              ``training.logits: targets``: logits at the target positions only), so that the
              table separates what padding-free rows and what the target-only head each buy;
  hf-maxlen   (not run by default) HF ``Trainer`` with every example padded to ``max_length``.

Data (``--dist``): ``medmcqa`` (default) is the embedded task's own data, the MedMCQA train
split forgetkit ships (``forgetkit.assets.load_alias('medmcqa', 'train')``, 3,087 records, the
``data.train`` of experiments/ewc_medical.yaml) in the instruction format; ``longtail`` is 3,000
synthetic instruction records whose lengths in tokens are lognormal (median 120, sigma 0.9,
clipped to [24, max_length - 16]: a long right tail), made of words drawn from MedMCQA's text.
Tokenizer: SmolLM2-135M's (the embedded model's, offline via forgetkit.assets; V = 49152) when
present, otherwise forgetkit's byte tokenizer.

Models (``--model``): ``mid`` (default) a random-init Llama d 384, 6 layers, MLP 1024, tied
embeddings (29.5 M parameters with V = 49152), where the step is compute-bound;
``smol135m`` SmolLM2-135M's shape (d 576, 30 layers, GQA 9/3, MLP 1536, tied; random init,
same compute as the real weights) for a short timed window; ``tiny`` (``--quick``).

Protocol. Every method trains the same global batch (micro-batch 4 x accumulation 2, as
experiments/ewc_medical.yaml), the same ``warmup + steps`` optimizer steps, AdamW (fused) at
the same constant lr, clip 1.0, fp32, sdpa attention, one fresh Python process per (method,
repeat). Timed, identically for all: wall clock from the end of optimizer step ``warmup`` to the
end of step ``warmup + steps`` (data loading and collation inside the window). Repeats are
interleaved (A B C D A B C D ...); repeat r uses data-order seed ``seed + r`` for every method
(weights fixed), so the spread covers both timing noise and which batches fall in the window.

The window and HF's length grouping: transformers 5's ``LengthGroupedSampler`` sorts each
mega-batch of 50 global batches by length, longest first, and does not shuffle the batches, so
a window shorter than 50 steps sees only the long end of HF's first mega-batch, while forgetkit
shuffles its batches (any window is a random sample of its epoch). The default window, 2 warm-up
+ 48 timed steps, covers exactly one HF mega-batch (a random 400-example draw of the epoch), so
that both sides' windows sample the epoch without bias; ``--quick`` times 14 steps. A 16-step
window on the long tail read 1.10x where the 48-step one read 1.26x (benchmarks/README.md).
The table also reports
each method's padding in the timed window *and* over the whole epoch's plan, and an
epoch-adjusted rate (window processed tokens/s x the epoch's non-padding share x the data's
target share): what the window's speed gives over a whole epoch. Both ratios are printed.

Run ``.venv/bin/python benchmarks/throughput.py`` (default, ~20 minutes on 2 cores with 1
thread) or ``--quick`` (< 3 minutes). Set ``OMP_NUM_THREADS`` and ``--threads`` together. See
benchmarks/README.md for measured numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

METHODS = ("hf-grouped", "hf-flat", "fk-grouped", "fk-flat", "fk-flat-all", "hf-maxlen")
DEFAULT_METHODS = ("hf-grouped", "hf-flat", "fk-grouped", "fk-flat", "fk-flat-all")
LABEL = {"hf-grouped": "HF Trainer, group_by_length + dynamic pad",
         "hf-flat": "HF Trainer, DataCollatorWithFlattening",
         "fk-grouped": "forgetkit, length_grouped",
         "fk-flat": "forgetkit, padding_free",
         "fk-flat-all": "forgetkit, padding_free, logits: all",
         "hf-maxlen": "HF Trainer, pad to max_length"}
IGNORE = -100
SMOL = "smollm2-135m-instruct"
HF_MEGA_BATCHES = 50  # transformers' LengthGroupedSampler: min(n // (4 * batch), 50) batches

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "intermediate_size": 344},
    "mid": {"hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 6,
            "num_key_value_heads": 6, "intermediate_size": 1024},
    "smol135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
                 "num_key_value_heads": 3, "intermediate_size": 1536},
    # Llama-3.2-1B's body (d 2048, 16 layers, GQA 32/8, MLP 8192; 1.07 B parameters with
    # SmolLM2's 49152-token vocabulary, tied): the GPU check's model (--device cuda).
    "llama1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                "num_key_value_heads": 8, "intermediate_size": 8192},
}
# Dense bf16 tensor-core peaks (TFLOP/s, vendor datasheets, SXM parts) for MFU on a GPU; the
# measured bf16 matmul peak is printed beside it.
GPU_BF16_PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0}


# ----------------------------------------------------------------------------- data

def load_tokenizer_for(args: argparse.Namespace) -> Any:
    """The benchmark's tokenizer: SmolLM2-135M's (offline asset) or forgetkit's byte one."""
    import forgetkit.assets  # noqa: F401  (registers the model alias)
    from forgetkit.config import ModelConfig
    from forgetkit.models import load_tokenizer

    return load_tokenizer(ModelConfig(random_init={"model_type": "llama"},
                                      tokenizer=tokenizer_name(args)))


def tokenizer_name(args: argparse.Namespace) -> str:
    """forgetkit's ``model.tokenizer`` for ``--tokenizer``: ``byte``, SmolLM2-135M's (offline
    asset), or a directory holding a saved tokenizer (``--save-tokenizer``: SmolLM2's, for a
    machine without the asset, such as the GPU check's)."""
    return {"byte": "byte", "smollm2": SMOL}.get(args.tokenizer, args.tokenizer)


def medmcqa_train(path: Path | None = None) -> list[dict[str, str]]:
    """The MedMCQA train split forgetkit ships (instruction records): from the offline asset,
    or from ``path``, a JSONL written by ``--save-tokenizer`` for a machine without the asset."""
    if path is not None:
        with path.open() as fh:
            return [json.loads(ln) for ln in fh if ln.strip()]
    from forgetkit import assets

    return [{"instruction": r["instruction"], "input": r.get("input", ""),
             "output": r["output"]} for r in assets.load_alias("medmcqa", "train")]


def write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    """One JSON object per line (what :func:`medmcqa_train` and forgetkit's data layer read)."""
    with path.open("w") as fh:
        fh.writelines(json.dumps(r) + "\n" for r in records)


def medmcqa_records(n: int, seed: int, path: Path | None = None) -> list[dict[str, str]]:
    """The MedMCQA train split (:func:`medmcqa_train`), instruction format; the first ``n``
    after a seeded shuffle (all of them when ``n`` is 0)."""
    recs = medmcqa_train(path)
    order = np.random.default_rng(seed).permutation(len(recs))
    if n:
        if n > len(recs):
            raise SystemExit(f"--n-examples {n}: the medmcqa train split has {len(recs)}")
        order = order[:n]
    return [{"instruction": recs[i]["instruction"], "input": recs[i].get("input", ""),
             "output": recs[i]["output"]} for i in order.tolist()]


def longtail_records(n: int, seed: int, tok: Any, median: float, sigma: float, lo: int,
                     hi: int, path: Path | None = None) -> list[dict[str, str]]:
    """Instruction records whose total length in tokens is lognormal(median, sigma) clipped to
    [lo, hi], the response 30-85 % of it; words drawn (frequency-weighted) from MedMCQA's text,
    each word's token count taken from the tokenizer (totals are additive up to a few %; the
    printed distribution is the measured one)."""
    from forgetkit.data.templates import tokenize_record

    text = " ".join(r["instruction"] + " " + r["output"] for r in medmcqa_train(path))
    occ = text.split()
    uniq = sorted(set(occ))
    n_tok = dict(zip(uniq, (len(tok(" " + w, add_special_tokens=False)["input_ids"])
                            for w in uniq), strict=True))
    words = np.array(occ, dtype=object)
    wlen = np.array([n_tok[w] for w in occ])
    probe = tokenize_record({"instruction": "", "input": "", "output": ""}, "instruction", None,
                            tok, 10 ** 6)
    overhead = len(probe.input_ids) if probe is not None else 8
    rng = np.random.default_rng([seed, 0x7A11])
    total = np.clip(np.round(rng.lognormal(math.log(median), sigma, size=n)), lo, hi).astype(int)
    share = rng.uniform(0.30, 0.85, size=n)

    def draw(k: int) -> str:
        idx = rng.integers(0, len(words), size=max(4, int(k / wlen.mean() * 1.5) + 4))
        cum = np.cumsum(wlen[idx])
        stop = int(np.searchsorted(cum, k)) + 1
        return " ".join(words[idx[:stop]].tolist())

    out = []
    for length, f in zip(total.tolist(), share.tolist(), strict=True):
        budget = max(2, length - overhead)
        r_len = max(1, round(budget * f))
        out.append({"instruction": draw(max(1, budget - r_len)), "input": "",
                    "output": draw(r_len)})
    return out


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The random-init Llama config dict (vocabulary and special ids come from the tokenizer)."""
    return {"model_type": "llama", **MODELS[args.model], "tie_word_embeddings": True,
            "max_position_embeddings": max(2048, args.max_length), "use_cache": False}


def forgetkit_config(args: argparse.Namespace, work: Path, batching: str, seed: int,
                     logits: str = "targets") -> Any:
    from forgetkit.config import config_from_dict

    raw = {
        "name": "bench-forgetkit", "seed": seed,
        "model": {"random_init": model_spec(args),
                  "tokenizer": tokenizer_name(args),
                  "dtype": "float32", "attn_implementation": "sdpa"},
        "data": {"train": {"path": str(work / "train.jsonl"), "format": "instruction"},
                 "validation_fraction": 0.0, "max_length": args.max_length,
                 "batching": batching, "pad_to_multiple_of": 8},
        "training": {"micro_batch_size": args.batch_size,
                     "gradient_accumulation_steps": args.grad_accum,
                     "max_steps": args.warmup + args.steps, "lr": args.lr,
                     "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                     "max_grad_norm": 1.0, "log_every": 1, "eval_every": 0,
                     "checkpoint_every": 0, "resume": False, "logits": logits,
                     # bf16: autocast over fp32 master weights (HF: bf16=True, the same)
                     "mixed_precision": "bf16" if args.precision == "bf16" else "no"},
        "distributed": {"cpu": args.device == "cpu"},
        "output": {"dir": str(work / f"fk-{batching}-{logits}-{seed}"), "save_model": False},
    }
    return config_from_dict(raw, "benchmarks/throughput.py")


def examples(args: argparse.Namespace, work: Path) -> tuple[list[Any], Any]:
    """forgetkit's own tokenisation of train.jsonl: the token ids every method trains on."""
    from forgetkit.train.loop import build_data

    tok = load_tokenizer_for(args)
    cfg = forgetkit_config(args, work, "length_grouped", args.seed)
    return list(build_data(cfg, tok).train), tok


def hf_features(ex: Any, pad_to: int | None, pad_id: int) -> dict[str, list[int]]:
    """forgetkit's pre-shifted labels -> HF's unshifted labels (the model shifts them)."""
    ids = list(ex.input_ids)
    labels = [IGNORE] + list(ex.labels[:-1])  # labels_hf[t+1] == forgetkit labels[t]
    mask = [1] * len(ids)
    if pad_to is not None:  # padding="max_length"
        n = pad_to - len(ids)
        ids, labels, mask = ids + [pad_id] * n, labels + [IGNORE] * n, mask + [0] * n
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def padded_len(lens: list[int], multiple: int = 8) -> int:
    return int(math.ceil(max(lens) / multiple) * multiple)


def hf_epoch_micro(lengths: list[int], args: argparse.Namespace, seed: int
                   ) -> list[tuple[int, list[int]]]:
    """(padded T, real lengths) of every micro-batch of one epoch of HF's group_by_length, from
    transformers' own ``get_length_grouped_indices`` (seeded generator; drop_last)."""
    import torch
    from transformers.trainer_pt_utils import get_length_grouped_indices

    glob = args.batch_size * args.grad_accum
    idx = get_length_grouped_indices(lengths, glob, generator=torch.Generator().manual_seed(seed))
    n = len(idx) // args.batch_size * args.batch_size
    out = []
    for s in range(0, n, args.batch_size):
        lens = [lengths[i] for i in idx[s:s + args.batch_size]]
        out.append((padded_len(lens), lens))
    return out


# ----------------------------------------------------------------------------- FLOPs

def model_dims(model: Any) -> dict[str, int]:
    import torch

    c = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    return {"matmul_params": matmul, "head_params": head, "params": total,
            "layers": c.num_hidden_layers,
            "attn_dim": c.num_attention_heads * getattr(c, "head_dim", c.hidden_size //
                                                        c.num_attention_heads)}


def seq_flops(dims: dict[str, int], T: int) -> float:
    """Training FLOPs of one sequence of length T: 6*N*T + 12*L*d_attn*T^2 (PaLM convention,
    no causal discount; N = weights of all Linear layers incl. the LM head)."""
    return 6.0 * dims["matmul_params"] * T + 12.0 * dims["layers"] * dims["attn_dim"] * T * T


def account(dims: dict[str, int], micro: list[tuple[int, list[int]]], flat: bool,
            per_example_attention: bool = False) -> dict[str, float]:
    """Executed and real tokens/FLOPs of micro-batches given as (row length T, [real lengths]).

    Padded: B rows of T. Flat: one row of T = sum(lens) tokens, no padding; its executed
    attention is the whole row's (sdpa with a block mask computes every score, then masks:
    HF's flattening, forgetkit's ``position_ids``/``mask`` forms) or, with
    ``per_example_attention`` (forgetkit's ``segments``: one SDPA per example), the examples'."""
    ex_f = use_f = ex_t = use_t = 0.0
    for T, lens in micro:
        use_t += sum(lens)
        use_f += sum(seq_flops(dims, n) for n in lens)
        if flat and per_example_attention:
            ex_t += T
            ex_f += seq_flops(dims, T) - seq_flops(dims, 0) - (
                12.0 * dims["layers"] * dims["attn_dim"] * (T * T - sum(n * n for n in lens)))
        elif flat:
            ex_t += T
            ex_f += seq_flops(dims, T)
        else:
            ex_t += T * len(lens)
            ex_f += len(lens) * seq_flops(dims, T)
    return {"exec_tokens": ex_t, "useful_tokens": use_t, "exec_flops": ex_f,
            "useful_flops": use_f}


def pad_fraction(micro: list[tuple[int, list[int]]], flat: bool) -> float:
    if flat:
        return 0.0
    ex = sum(T * len(lens) for T, lens in micro)
    return 1.0 - sum(sum(lens) for _, lens in micro) / ex


def matmul_peak(seconds: float, device: str = "cpu", precision: str = "fp32") -> float:
    """Best GFLOP/s of a large square torch.matmul in the run's compute dtype (several sizes,
    best of many; on a GPU synchronised, 8192 included)."""
    import torch

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    sizes = (1024, 2048, 3072) if device == "cpu" else (2048, 4096, 8192)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    best = 0.0
    t_end = time.perf_counter() + seconds
    while True:
        for n in sizes:
            a = torch.randn(n, n, device=device).to(dtype)
            b = torch.randn(n, n, device=device).to(dtype)
            a @ b
            sync()
            t = time.perf_counter()
            a @ b
            sync()
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
        if time.perf_counter() > t_end:
            return best


def gpu_spec_peak(device: str) -> tuple[str, float | None]:
    """(device name, its dense bf16 datasheet peak in GFLOP/s or None) for a CUDA run."""
    if device != "cuda":
        return "cpu", None
    import torch

    name = torch.cuda.get_device_name()
    peak = next((v for k, v in GPU_BF16_PEAK_TFLOPS.items() if k in name), None)
    return name, (peak * 1e3 if peak is not None else None)


def largest_micro_estimate(cfg: Any, model: Any, micro: list[tuple[int, list[int]]],
                           flat: bool, targets: int | None) -> Any:
    """forgetkit's memory estimate (``forgetkit.memory.estimate_for_config``) for the largest
    micro-batch of ``micro`` (row length T, [real lengths]): B padded rows of T, or a
    padding-free row of T tokens counted as micro_batch rows of ceil(T / micro_batch)
    (activations are linear in tokens with sdpa). ``targets``: the most target positions of any
    micro-batch (logits at targets only), None for every position."""
    from forgetkit.memory import estimate_for_config

    b = cfg.training.micro_batch_size
    tokens = max(T if flat else T * len(lens) for T, lens in micro)
    return estimate_for_config(cfg, model=model, seq_len=math.ceil(tokens / b),
                               logit_positions=targets)


def cuda_memory(cfg: Any, model: Any, micro: list[tuple[int, list[int]]], flat: bool,
                targets: int | None) -> dict[str, Any]:
    """On a GPU: ``torch.cuda.max_memory_allocated`` of the whole run (weights, gradients,
    AdamW state, the largest micro-batch's activations) next to forgetkit's estimate for the
    run's largest micro-batch (:func:`largest_micro_estimate`). Empty where CUDA is unused."""
    import torch

    if not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return {}
    est = largest_micro_estimate(cfg, model, micro, flat, targets)
    measured = torch.cuda.max_memory_allocated()
    return {"cuda_max_allocated": measured, "cuda_estimate": est.total_bytes,
            "cuda_mem_ratio": measured / est.total_bytes,
            "cuda_estimate_logits": est.details.get("logits_bytes")}


# ----------------------------------------------------------------------------- workers

class _PaddingFreeForm(logging.Handler):
    """Catches the training loop's "boundaries kept by <form>" log line."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.form: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"boundaries kept by (\w+)", record.getMessage())
        if m:
            self.form = m.group(1)


def _usage() -> tuple[int, float]:
    """(minor page faults, kernel CPU seconds) of this process so far."""
    import resource

    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_minflt, ru.ru_stime


def _window_usage(start: tuple[int, float], end: tuple[int, float], steps: int
                  ) -> dict[str, float]:
    """Minor page faults per timed step and kernel seconds in the window (the CPU cost of
    fresh pages: large tensors are fresh mmaps under glibc, see --malloc)."""
    return {"faults_per_step": (end[0] - start[0]) / steps, "kernel_s": end[1] - start[1]}


def run_forgetkit(args: argparse.Namespace, work: Path, method: str, seed: int
                  ) -> dict[str, Any]:
    from forgetkit.models import load_model
    from forgetkit.train.loop import StepPlan, build_data, train

    batching = "padding_free" if method.startswith("fk-flat") else "length_grouped"
    logits = "all" if method.endswith("-all") else "targets"
    cfg = forgetkit_config(args, work, batching, seed, logits)
    how = _PaddingFreeForm()  # how the loop kept the example boundaries (its log line)
    fk_log = logging.getLogger("forgetkit")
    level = fk_log.level
    fk_log.addHandler(how)
    fk_log.setLevel(min(level or logging.INFO, logging.INFO))
    from forgetkit.train import tracking

    usage: list[tuple[int, float]] = []  # (minor faults, kernel s) at each step's log point
    real_log = tracking.Trackers.log

    def log_with_usage(self: Any, record: Any, step: int) -> None:
        usage.append(_usage())
        real_log(self, record, step)

    tracking.Trackers.log = log_with_usage  # observation only, as HF's Stamp callback below
    try:
        res = train(cfg, progress=False)
    finally:
        tracking.Trackers.log = real_log
        fk_log.removeHandler(how)
        fk_log.setLevel(level)
    log = [json.loads(ln) for ln in (res.out_dir / "train_log.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in log if "elapsed_s" in r}
    w, s = args.warmup, args.warmup + args.steps
    elapsed = by_step[s]["elapsed_s"] - by_step[w]["elapsed_s"]
    targets = by_step[s]["target_tokens"] - by_step[w]["target_tokens"]
    step_times = [by_step[k + 1]["elapsed_s"] - by_step[k]["elapsed_s"] for k in range(w, s)]

    # Shapes of the timed micro-batches and of the whole epoch, from the deterministic plan
    # (recomputed after the run so that nothing is recorded inside the timed loop).
    model, tok = load_model(cfg.model)
    data = build_data(cfg, tok)
    plan = StepPlan(data, cfg, 1)
    flat = batching == "padding_free"

    def shapes(k: int) -> tuple[list[tuple[int, list[int]]], int]:
        mbs, n_t, _ = plan.step(k, 0)
        out = []
        for mb in mbs:
            lens = [len(e.input_ids) for e in mb]
            out.append((sum(lens) if flat else padded_len(lens, cfg.data.pad_to_multiple_of),
                        lens))
        return out, n_t

    window, chk = [], 0
    for k in range(w, s):
        mbs, n_t = shapes(k)
        window += mbs
        chk += n_t
    assert chk == targets, (chk, targets)
    mem = {}
    if args.device == "cuda":  # the run's largest micro-batch (warm-up included)
        run_mbs = [mb for k in range(s) for mb in plan.step(k, 0)[0]]
        mem = cuda_memory(cfg, model, [mb for k in range(s) for mb in shapes(k)[0]], flat,
                          max(sum(e.n_targets for e in mb) for mb in run_mbs)
                          if logits == "targets" else None)
    epoch = [mb for k in range(plan.steps_per_epoch) for mb in shapes(k)[0]]
    dims = model_dims(model)
    acct = account(dims, window, flat, per_example_attention=how.form == "segments")
    acct["attention"] = how.form or ("padded" if not flat else "unknown")
    if logits == "targets":  # the LM head ran on the window's target positions only
        acct["exec_flops"] -= 6.0 * dims["head_params"] * (acct["exec_tokens"] - targets)
    return {"elapsed_s": elapsed, "target_tokens": targets, "step_times": step_times,
            **_window_usage(usage[w - 1], usage[s - 1], args.steps),
            "final_loss": log[-2]["loss"] if len(log) > 1 else None,
            "pad_epoch": pad_fraction(epoch, flat), "pad_window": pad_fraction(window, flat),
            "n_examples": len(data.train), "logits": logits, **acct, **mem}


def run_hf(args: argparse.Namespace, work: Path, method: str, seed: int) -> dict[str, Any]:
    import torch
    from transformers import (
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from forgetkit.models import load_model

    exs, tok = examples(args, work)
    cfg = forgetkit_config(args, work, "length_grouped", seed)
    model, _ = load_model(cfg.model, tokenizer=tok)  # the same weights as forgetkit's
    flat = method == "hf-flat"
    if method == "hf-maxlen":
        train_ds = [hf_features(e, args.max_length, tok.pad_token_id) for e in exs]
        collator, sampling = default_data_collator, "random"
    elif flat:
        train_ds = [{k: v for k, v in hf_features(e, None, 0).items() if k != "attention_mask"}
                    for e in exs]
        collator = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)
        sampling = "random"  # no padding to group away (rows are concatenations)
    else:
        train_ds = [hf_features(e, None, tok.pad_token_id) for e in exs]
        collator = DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8,
                                          label_pad_token_id=IGNORE, return_tensors="pt")
        sampling = "group_by_length"

    targs = TrainingArguments(
        output_dir=str(work / f"{method}-{seed}"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch_fused", use_cpu=args.device == "cpu",
        bf16=args.precision == "bf16", seed=seed,
        train_sampling_strategy=sampling, dataloader_drop_last=True,
        dataloader_num_workers=0, remove_unused_columns=False, logging_steps=10 ** 6,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)

    stamps: list[float] = []
    usage: list[tuple[int, float]] = []
    micro: list[tuple[int, list[int], int]] = []

    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)

    class Stamp(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # after optimizer.step + zero_grad
            sync()  # (forgetkit's loop syncs once a step for its log line: the same)
            stamps.append(time.perf_counter())
            usage.append(_usage())

    class BenchTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            lab = inputs["labels"]
            if flat:
                pos = inputs["position_ids"][0]
                starts = (pos == 0).nonzero().flatten().tolist() + [pos.shape[0]]
                lens = [b - a for a, b in zip(starts[:-1], starts[1:], strict=True)]
            else:
                lens = inputs["attention_mask"].sum(1).tolist()
            micro.append((lab.shape[1], lens, int((lab[:, 1:] != IGNORE).sum())))
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = BenchTrainer(model=model, args=targs, train_dataset=train_ds,
                           data_collator=collator, processing_class=tok, callbacks=[Stamp()])
    out = trainer.train()
    w, s, A = args.warmup, args.warmup + args.steps, args.grad_accum
    assert len(stamps) == s, (len(stamps), s)
    timed = [(T, lens) for T, lens, _ in micro[w * A:s * A]]
    if method == "hf-grouped":
        epoch = hf_epoch_micro([len(e.input_ids) for e in exs], args, seed)
    elif method == "hf-maxlen":
        epoch = [(args.max_length, [len(e.input_ids)]) for e in exs]
    else:
        epoch = [(0, [1])]
    mem = (cuda_memory(forgetkit_config(args, work, "length_grouped", seed, "all"), model,
                       [(T, lens) for T, lens, _ in micro], flat, None)
           if args.device == "cuda" else {})  # HF: logits at every position
    return {"elapsed_s": stamps[s - 1] - stamps[w - 1],
            "target_tokens": sum(m[2] for m in micro[w * A:s * A]),
            "step_times": [stamps[k] - stamps[k - 1] for k in range(w, s)],
            **_window_usage(usage[w - 1], usage[s - 1], args.steps),
            "final_loss": out.training_loss, "pad_epoch": pad_fraction(epoch, flat),
            "pad_window": pad_fraction(timed, flat), "n_examples": len(exs),
            **account(model_dims(model), timed, flat), **mem}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    import forgetkit.assets  # noqa: F401  (registers the model alias)

    work = Path(args.workdir)
    seed = args.seed + args.repeat
    if args.worker.startswith("fk-"):
        res = run_forgetkit(args, work, args.worker, seed)
    else:
        res = run_hf(args, work, args.worker, seed)
    res["threads"] = torch.get_num_threads()
    (work / f"result-{args.worker}-{args.repeat}.json").write_text(json.dumps(res))


def check_same_objective(args: argparse.Namespace, work: Path, exs: list[Any], tok: Any
                         ) -> dict[str, float]:
    """Loss of one micro-batch of the real data (same weights, same targets) by each path:
    forgetkit padded and padding-free, HF padded and flattened. Equal losses also show that
    both flat paths keep attention inside each example."""
    import torch
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening

    from forgetkit.data.batching import collate, collate_flat
    from forgetkit.models import load_model
    from forgetkit.train import segment_attention
    from forgetkit.train.loop import (
        PaddingFree,
        model_inputs,
        target_losses,
        target_mask,
        token_losses,
    )

    cfg = forgetkit_config(args, work, "length_grouped", args.seed)
    model, _ = load_model(cfg.model, tokenizer=tok)
    model.eval()
    batch = exs[:args.batch_size]
    out: dict[str, float] = {}
    with torch.no_grad():
        fk = collate(batch, tok.pad_token_id, 8)
        n_t = float((fk["labels"] != IGNORE).sum())
        o = model(input_ids=fk["input_ids"], attention_mask=fk["attention_mask"])
        out["fk-grouped-all"] = float(token_losses(o, fk["labels"]).sum()) / n_t
        fl = collate_flat(batch)
        # the form the loop picks for sdpa (padding_free_setup): one SDPA per example
        model.config._attn_implementation = segment_attention.register()
        pf = PaddingFree("segments", "sdpa")
        o = model(**pf.inputs(fl))
        out["fk-flat-all"] = float(token_losses(o, fl["labels"]).sum()) / n_t
        keep = target_mask(fl, True)  # training.logits: targets (the default)
        o = model(**model_inputs(fl, pf, keep))
        out["fk-flat"] = float(target_losses(o, fl["labels"], keep).sum()) / n_t
        model.config._attn_implementation = "sdpa"
        keep = target_mask(fk, True)
        o = model(**model_inputs(fk, None, keep))
        out["fk-grouped"] = float(target_losses(o, fk["labels"], keep).sum()) / n_t
        feats = [hf_features(e, None, tok.pad_token_id) for e in batch]
        hf = DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8,
                                    label_pad_token_id=IGNORE, return_tensors="pt")(feats)
        n = (hf["labels"][:, 1:] != IGNORE).sum()
        out["hf-grouped"] = float(model(**hf, num_items_in_batch=n).loss)
        hf = DataCollatorWithFlattening(return_position_ids=True, separator_id=IGNORE)(
            [{"input_ids": f["input_ids"], "labels": f["labels"]} for f in feats])
        out["hf-flat"] = float(model(**hf, num_items_in_batch=n).loss)
    return out


# ----------------------------------------------------------------------------- driver

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="tiny model, one repeat: the whole run in under 3 minutes (same data)")
    p.add_argument("--dist", choices=("medmcqa", "longtail"), default="medmcqa",
                   help="length distribution: the embedded MedMCQA task, or lognormal long tail")
    p.add_argument("--n-examples", type=int, default=0,
                   help="training examples (0: all 3,087 MedMCQA train records; longtail 3,000)")
    p.add_argument("--model", choices=tuple(MODELS), default=None,
                   help="random-init Llama shape (default mid; quick tiny)")
    p.add_argument("--tokenizer", default="auto",
                   help="auto, smollm2, byte, or a directory with a saved tokenizer; auto: "
                   "SmolLM2-135M's tokenizer when the offline asset is installed")
    p.add_argument("--save-tokenizer", type=Path, default=None,
                   help="save SmolLM2-135M's tokenizer (from the offline asset) to this "
                   "directory and exit: --tokenizer DIR then needs no asset (the GPU check)")
    p.add_argument("--medmcqa", type=Path, default=None,
                   help="MedMCQA's train split as JSONL (written by --save-tokenizer) instead "
                   "of the offline asset: the texts of both distributions")
    p.add_argument("--steps", type=int, default=None,
                   help="timed optimizer steps (default: one whole HF length-grouping mega-batch "
                   "after the warm-up, 48 with --warmup 2; tiny 14)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--batch-size", type=int, default=4, help="micro-batch size")
    p.add_argument("--grad-accum", type=int, default=2, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--median-len", type=float, default=120.0, help="longtail: median length")
    p.add_argument("--sigma", type=float, default=0.9, help="longtail: lognormal sigma")
    p.add_argument("--min-len", type=int, default=24, help="longtail: shortest example")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=None,
                   help="interleaved rounds over the methods (default 2; quick 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cuda: one GPU (forgetkit distributed.cpu false, HF use_cpu false); "
                   "MFU against the GPU's dense bf16 datasheet peak, and each run's "
                   "torch.cuda.max_memory_allocated against forgetkit's memory estimate")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: autocast over fp32 master weights on both sides (forgetkit "
                   "training.mixed_precision bf16, HF bf16=True)")
    p.add_argument("--malloc", choices=("system", "keep"), default="system",
                   help="keep: every worker (both sides) runs with glibc's MALLOC_MMAP_MAX_=0 "
                   "and MALLOC_TRIM_THRESHOLD_ at 4 GiB, so freed large tensors are reused "
                   "instead of returned to the kernel and faulted in again (a diagnostic of "
                   "the page-fault cost; forgetkit does not set it)")
    p.add_argument("--keep-going", action="store_true",
                   help="a method whose worker fails is left out of the table (its error "
                   "printed) instead of stopping the run: for one-shot runs (the GPU check)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.model = a.model or ("tiny" if a.quick else "mid")
    if a.steps is None:
        a.steps = 14 if a.model == "tiny" else max(1, HF_MEGA_BATCHES - a.warmup)
    a.repeats = a.repeats or (1 if a.quick else 2)
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (the timed window starts at the end of a step)")
    if a.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            p.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is "
                    "False)")
    if a.tokenizer not in ("auto", "smollm2", "byte") and not Path(a.tokenizer).is_dir():
        p.error(f"--tokenizer {a.tokenizer!r}: not auto, smollm2, byte or a directory")
    if a.medmcqa is not None and not a.medmcqa.is_file():
        p.error(f"--medmcqa {a.medmcqa}: no such file (write it with --save-tokenizer DIR)")
    if a.tokenizer == "auto":
        from forgetkit import assets

        a.tokenizer = "smollm2" if assets.smollm2_gguf() is not None else "byte"
    return a


def _worker_argv(args: argparse.Namespace, method: str, work: Path, repeat: int) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
            "--workdir", str(work), "--repeat", str(repeat)]
    for k in ("steps", "warmup", "model", "tokenizer", "batch_size", "grad_accum", "max_length",
              "lr", "threads", "seed", "device", "precision"):
        argv += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    return argv


def worker_env(args: argparse.Namespace) -> dict[str, str]:
    """The environment of every worker process (both sides alike)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    if args.malloc == "keep":  # read by glibc at process start
        env.update(MALLOC_MMAP_MAX_="0", MALLOC_TRIM_THRESHOLD_=str(4 << 30))
    return env


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(argv)
    if args.save_tokenizer is not None:
        args.tokenizer = "smollm2"
        load_tokenizer_for(args).save_pretrained(str(args.save_tokenizer))
        write_jsonl(args.save_tokenizer / "medmcqa_train.jsonl", medmcqa_train())
        print(f"saved SmolLM2-135M's tokenizer and MedMCQA's train split "
              f"(medmcqa_train.jsonl) to {args.save_tokenizer}")
        return 0
    if args.worker:
        worker(args)
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        raise SystemExit(f"unknown method(s) {bad}; choose from {METHODS}")
    t0 = time.perf_counter()
    import torch

    torch.set_num_threads(args.threads)
    env = worker_env(args)
    with tempfile.TemporaryDirectory(prefix="forgetkit-bench-") as tmp:
        work = Path(tmp)
        tok = load_tokenizer_for(args)
        if args.dist == "medmcqa":
            records = medmcqa_records(args.n_examples, args.seed, args.medmcqa)
        else:
            records = longtail_records(args.n_examples or 3000, args.seed, tok, args.median_len,
                                       args.sigma, args.min_len, args.max_length - 16,
                                       args.medmcqa)
        write_jsonl(work / "train.jsonl", records)
        exs, tok = examples(args, work)
        lens = np.array([len(e.input_ids) for e in exs])
        tgts = np.array([e.n_targets for e in exs])
        from forgetkit.models import load_model

        model, _ = load_model(forgetkit_config(args, work, "length_grouped", args.seed).model,
                              tokenizer=tok)
        dims = model_dims(model)
        del model
        losses = check_same_objective(args, work, exs, tok)
        spec = model_spec(args)
        vocab = {"smollm2": "SmolLM2-135M tokenizer", "byte": "byte tokenizer"}.get(
            args.tokenizer, f"tokenizer {args.tokenizer}")
        print(f"model: random-init llama '{args.model}' hidden={spec['hidden_size']} layers="
              f"{spec['num_hidden_layers']} heads={spec['num_attention_heads']}/"
              f"{spec['num_key_value_heads']} mlp={spec['intermediate_size']} vocab {len(tok)} "
              f"({vocab}), {dims['params'] / 1e6:.1f}M params ({dims['matmul_params'] / 1e6:.1f}M "
              f"in Linear layers incl. the tied LM head), {args.precision}, sdpa, "
              f"{gpu_spec_peak(args.device)[0]}, {args.threads} threads "
              f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')})")
        print(f"data: {args.dist}, {len(exs)} instruction-format examples, length (tokens) mean "
              f"{lens.mean():.0f} median {np.median(lens):.0f} p90 {np.percentile(lens, 90):.0f} "
              f"p99 {np.percentile(lens, 99):.0f} max {lens.max()}; targets/example mean "
              f"{tgts.mean():.1f} ({tgts.sum() / lens.sum():.1%} of tokens)")
        print(f"run: micro-batch {args.batch_size} x accum {args.grad_accum}, AdamW (fused) lr "
              f"{args.lr:g} constant, clip 1.0, {args.warmup} warm-up + {args.steps} timed "
              f"optimizer steps per method, {args.repeats} interleaved repeat(s), max_length "
              f"{args.max_length}")
        ref = losses["fk-grouped-all"]
        print("objective check (one micro-batch, same weights): " + ", ".join(
            f"{k} {v:.6f}" for k, v in losses.items()) +
            f"; max |diff| {max(abs(v - ref) for v in losses.values()):.1e}")
        peak = matmul_peak(3.0 if args.quick else 6.0, args.device, args.precision)
        results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        failed: dict[str, str] = {}
        for rep in range(args.repeats):
            for m in methods:
                if m in failed:
                    continue
                t = time.perf_counter()
                proc = subprocess.run(_worker_argv(args, m, work, rep), cwd=str(ROOT),
                                      capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                    if not args.keep_going:
                        raise SystemExit(f"worker {m} failed (exit {proc.returncode})")
                    failed[m] = f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"
                    del results[m]  # all its repeats: the ratios pair repeats side by side
                    print(f"  {m:<10} repeat {rep}: FAILED (exit {proc.returncode}); left out "
                          "of the table (--keep-going)", flush=True)
                    continue
                res = json.loads((work / f"result-{m}-{rep}.json").read_text())
                results[m].append(res)
                print(f"  {m:<10} repeat {rep}: {res['target_tokens'] / res['elapsed_s']:8.1f} "
                      f"target tok/s, pad {100 * res['pad_window']:.1f} % "
                      f"({time.perf_counter() - t:.0f}s incl. set-up)", flush=True)
        peak = max(peak, matmul_peak(2.0, args.device, args.precision))
    if not results:
        raise SystemExit(f"every worker failed: {failed}")
    summary = report(args, results, peak, len(exs), dims["params"],
                     float(tgts.sum() / lens.sum()))
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "peak_gflops": peak, "losses": losses,
                                         "summary": summary, "results": results,
                                         "failed": failed}, indent=1))
    print(f"total wall time {time.perf_counter() - t0:.0f}s")
    return 0


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], peak: float,
           n_examples: int, params: int, target_share: float) -> dict[str, Any]:
    """Print the table and the headline; return the summary (ratios) for --json/run_all."""
    rows = {}
    gpu, spec = gpu_spec_peak(args.device)
    mfu_peak = spec if spec is not None and args.precision == "bf16" else peak
    for m, runs in results.items():
        tps = [r["target_tokens"] / r["elapsed_s"] for r in runs]
        r = sorted(runs, key=lambda r: r["target_tokens"] / r["elapsed_s"])[len(runs) // 2]
        exec_tps = r["exec_tokens"] / r["elapsed_s"]
        rows[m] = {
            "tps": statistics.median(tps), "all": tps, "spread": (min(tps), max(tps)),
            "step_ms": 1000 * statistics.median(r["step_times"]),
            "pad_window": r["pad_window"], "pad_epoch": r["pad_epoch"],
            "real_tps": r["useful_tokens"] / r["elapsed_s"], "exec_tps": exec_tps,
            "adj_tps": exec_tps * (1 - r["pad_epoch"]) * target_share,
            "mfu_exec": r["exec_flops"] / r["elapsed_s"] / (mfu_peak * 1e9),
            "attention": r.get("attention"),
            "faults_per_step": r.get("faults_per_step"),
            "kernel_share": (r["kernel_s"] / r["elapsed_s"]) if "kernel_s" in r else None}
        for k in ("cuda_max_allocated", "cuda_estimate", "cuda_mem_ratio"):
            if k in r:
                rows[m][k] = r[k]
    print()
    if args.device == "cpu":
        print(f"{args.precision} matmul peak (best large torch.matmul, {args.threads} threads): "
              f"{peak:.1f} GFLOP/s")
    else:
        print(f"{gpu}: {args.precision} matmul peak measured {peak / 1e3:.1f} TFLOP/s; MFU "
              f"below against {mfu_peak / 1e3:.1f} TFLOP/s ("
              + ("dense bf16 datasheet peak)" if mfu_peak == spec else "the measured peak)"))
    hdr = (f"{'method':<42} {'target tok/s (min-max)':>24} {'step ms':>8} {'pad % win':>9} "
           f"{'pad % epoch':>11} {'real tok/s':>10} {'MFU exec':>8} {'epoch-adj tgt/s':>15}")
    print(hdr)
    print("-" * len(hdr))
    for m, r in rows.items():
        tp = f"{r['tps']:.1f} ({r['spread'][0]:.1f}-{r['spread'][1]:.1f})"
        print(f"{m + ' ' + LABEL[m]:<42} {tp:>24} {r['step_ms']:>8.0f} "
              f"{100 * r['pad_window']:>9.1f} {100 * r['pad_epoch']:>11.1f} "
              f"{r['real_tps']:>10.0f} {100 * r['mfu_exec']:>7.1f}% {r['adj_tps']:>15.1f}")
    if all(r["faults_per_step"] is not None for r in rows.values()):
        print(f"page faults (malloc {args.malloc}): " + "; ".join(
            f"{m} {r['faults_per_step'] / 1e3:.0f}k minor faults/step, kernel "
            f"{100 * r['kernel_share']:.0f} % of the window" for m, r in rows.items()))
    if any("cuda_max_allocated" in r for r in rows.values()):
        print("GPU memory (whole run): " + "; ".join(
            f"{m} max_memory_allocated {r['cuda_max_allocated'] / 2**30:.2f} GiB, estimate "
            f"{r['cuda_estimate'] / 2**30:.2f} GiB (ratio {r['cuda_mem_ratio']:.2f})"
            for m, r in rows.items() if "cuda_max_allocated" in r) +
            " (target 0.85-1.15; forgetkit.memory.estimate_for_config at the run's largest "
            "micro-batch)")
    print()
    fk = [m for m in rows if m.startswith("fk-")]
    hf = [m for m in rows if m.startswith("hf-")]
    summary: dict[str, Any] = {"n_examples": n_examples, "params": params, "dist": args.dist,
                               "model": args.model, "malloc": args.malloc, "rows": rows}
    if fk and hf:
        fk_best = max(fk, key=lambda m: rows[m]["tps"])
        hf_best = max(hf, key=lambda m: rows[m]["tps"])
        per = [a / b for a, b in zip(rows[fk_best]["all"], rows[hf_best]["all"], strict=True)]
        ratio = rows[fk_best]["tps"] / rows[hf_best]["tps"]
        adj = (max(rows[m]["adj_tps"] for m in fk) / max(rows[m]["adj_tps"] for m in hf))
        print(f"best forgetkit: {fk_best}; best HF: {hf_best} (by median target tokens/s)")
        print(f"forgetkit / best HF: {ratio:.2f}x ({min(per):.2f}-{max(per):.2f}) at "
              f"{n_examples} examples, {params / 1e6:.1f}M params")
        print(f"  epoch-adjusted (window processed tok/s x epoch non-padding share): {adj:.2f}x")
        if ratio < 1.0:
            print("  forgetkit is SLOWER than the best HF Trainer configuration here.")
        print(f"  target forgetkit >= 1.15x best HF: {'met' if ratio >= 1.15 else 'NOT met'}")
        summary.update({"ratio": ratio, "ratio_min": min(per), "ratio_max": max(per),
                        "ratio_epoch_adjusted": adj, "fk_best": fk_best, "hf_best": hf_best})
    win = args.warmup + args.steps
    if "hf-grouped" in rows and win < HF_MEGA_BATCHES:
        print(f"  note: the window ({args.warmup}+{args.steps} steps) is shorter than HF's "
              f"{HF_MEGA_BATCHES}-step length-grouping mega-batch: HF's window holds the long end "
              "of it; compare 'pad % win' with 'pad % epoch' and the epoch-adjusted ratio "
              f"(--steps {HF_MEGA_BATCHES - args.warmup} covers one mega-batch).")
    print("pad %: padding tokens / tokens computed, in the timed window and over one epoch's "
          "plan (HF's from transformers' get_length_grouped_indices). MFU exec: 6*N*T + "
          "12*L*d*T^2 per row computed (padding and the masked scores of a block-diagonal mask "
          "included; forgetkit's padding-free 'segments' attention: 12*L*d*n^2 per example; "
          "with logits at the target positions only, the LM head's 6*V*d on the other "
          "positions left out) / matmul peak.")
    forms = {m: r.get("attention") for m, r in summary["rows"].items() if r.get("attention")}
    if forms:
        print("forgetkit attention: " + ", ".join(f"{m} {f}" for m, f in forms.items()))
    return summary


if __name__ == "__main__":
    sys.exit(main())
