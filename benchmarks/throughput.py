"""Training throughput: forgetkit's loop against two Hugging Face ``Trainer`` recipes.

One run measures, on the same random-init Llama, the same synthetic instruction data and the same
hyper-parameters, the *target tokens per second* (tokens that carry loss, i.e. response tokens)
of three ways to fully fine-tune a causal LM:

  (a) ``hf-maxlen``  HF ``Trainer``, every example padded to ``max_length`` (the tutorial recipe:
                     ``tokenizer(..., padding="max_length")`` + ``default_data_collator``);
  (b) ``hf-dynamic`` HF ``Trainer`` at its best: ``DataCollatorForSeq2Seq(pad_to_multiple_of=8)``
                     and ``train_sampling_strategy="group_by_length"`` (transformers 5 spelling of
                     ``group_by_length=True``);
  (c) ``forgetkit``  ``forgetkit.train.loop.train(cfg)`` (length-grouped batches, dynamic padding
                     to a multiple of 8, token-normalised loss).

Each method runs in its own fresh Python process (no shared allocator, thread-pool or accelerate
state) and trains ``warmup + steps`` optimizer steps over exactly one epoch of the same
``(warmup + steps) * global_batch`` examples. What is timed, identically for all three: wall
clock from the end of optimizer step ``warmup`` to the end of optimizer step ``warmup + steps``
(steady state; model building, tokenisation, optimizer-state allocation, the first shapes and the
final checkpoint are outside the window). Data loading/collation inside the steps is inside it.
Prompt tokens carry label -100 in all three, and all three normalise the loss by the number of
target tokens of the optimizer step, so they optimise the same objective on the same token ids.

Run ``.venv/bin/python benchmarks/throughput.py`` (full, a few minutes on 2 CPU cores) or with
``--quick`` (< 2 minutes). See benchmarks/README.md for the definitions of the columns.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
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

METHODS = ("hf-maxlen", "hf-dynamic", "forgetkit")
LABEL = {"hf-maxlen": "(a) HF Trainer, pad to max_length",
         "hf-dynamic": "(b) HF Trainer, dynamic pad + group_by_length",
         "forgetkit": "(c) forgetkit loop"}
IGNORE = -100


# ----------------------------------------------------------------------------- data

def _text(rng: np.random.Generator, n: int) -> str:
    """ASCII pseudo-words of exactly ``n`` characters (= ``n`` byte-level tokens)."""
    out: list[str] = []
    size = 0
    while size < n:
        w = "".join(chr(c) for c in rng.integers(97, 123, size=int(rng.integers(2, 10))))
        out.append(w)
        size += len(w) + 1
    return " ".join(out)[:n].ljust(n, "x")


# Overhead of the byte tokenizer's chat template in tokens:
# prompt "<|user|>\n{u}\n<|assistant|>\n" (23 + u), response "{o}<|endoftext|>\n" (o + 2).
_PROMPT_OVERHEAD, _RESPONSE_OVERHEAD = 23, 2


def make_records(n: int, seed: int, median: float, sigma: float, lo: int, hi: int
                 ) -> list[dict[str, str]]:
    """Alpaca-like records (instruction / input / output) whose total length in tokens is
    lognormal(median, sigma) clipped to [lo, hi]; the response is 30-85 % of it."""
    rng = np.random.default_rng(seed)
    total = np.clip(np.round(rng.lognormal(math.log(median), sigma, size=n)), lo, hi).astype(int)
    share = rng.uniform(0.30, 0.85, size=n)
    records = []
    for length, f in zip(total.tolist(), share.tolist(), strict=True):
        budget = length - _PROMPT_OVERHEAD - _RESPONSE_OVERHEAD
        out_len = max(1, round(budget * f))
        ins_len = max(1, budget - out_len)
        records.append({"instruction": _text(rng, ins_len), "input": "",
                        "output": _text(rng, out_len)})
    return records


def model_spec(args: argparse.Namespace) -> dict[str, Any]:
    return {"model_type": "llama", "hidden_size": args.hidden,
            "intermediate_size": args.intermediate or int(round(args.hidden * 8 / 3 / 8) * 8),
            "num_hidden_layers": args.layers, "num_attention_heads": args.heads,
            "num_key_value_heads": args.heads, "max_position_embeddings": args.max_length,
            "tie_word_embeddings": True}


def forgetkit_config(args: argparse.Namespace, work: Path) -> Any:
    from forgetkit.config import config_from_dict

    raw = {
        "name": "bench-forgetkit", "seed": args.seed,
        "model": {"random_init": model_spec(args), "tokenizer": "byte", "dtype": "float32",
                  "attn_implementation": "sdpa"},
        "data": {"train": {"path": str(work / "train.jsonl"), "format": "chat"},
                 "validation_fraction": 0.0, "max_length": args.max_length,
                 "batching": args.batching, "pad_to_multiple_of": 8},
        "training": {"micro_batch_size": args.batch_size,
                     "gradient_accumulation_steps": args.grad_accum,
                     "max_steps": args.warmup + args.steps, "lr": args.lr,
                     "scheduler": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                     "max_grad_norm": 1.0, "log_every": 1, "eval_every": 0,
                     "checkpoint_every": 0, "resume": False},
        "distributed": {"cpu": True},
        "output": {"dir": str(work / "forgetkit-run"), "save_model": False},
    }
    return config_from_dict(raw, "benchmarks/throughput.py")


def tokenized(args: argparse.Namespace, work: Path) -> tuple[list[Any], Any]:
    """forgetkit's own tokenisation of the records: the token ids all three methods train on."""
    from forgetkit.data.templates import tokenize_record
    from forgetkit.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    recs = [json.loads(line) for line in (work / "train.jsonl").read_text().splitlines()]
    exs = [tokenize_record(r, "chat", None, tok, args.max_length) for r in recs]
    assert all(e is not None for e in exs)
    return exs, tok


def hf_features(ex: Any, pad_to: int | None, pad_id: int) -> dict[str, list[int]]:
    """forgetkit's pre-shifted labels -> HF's unshifted labels (the model shifts them)."""
    ids = list(ex.input_ids)
    labels = [IGNORE] + list(ex.labels[:-1])  # labels_hf[t+1] == forgetkit labels[t]
    mask = [1] * len(ids)
    if pad_to is not None:  # padding="max_length"
        n = pad_to - len(ids)
        ids, labels, mask = ids + [pad_id] * n, labels + [IGNORE] * n, mask + [0] * n
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------- FLOPs

def model_dims(model: Any) -> dict[str, int]:
    import torch

    c = model.config
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    total = sum(p.numel() for p in model.parameters())
    return {"matmul_params": matmul, "params": total, "layers": c.num_hidden_layers,
            "attn_dim": c.num_attention_heads * getattr(c, "head_dim", c.hidden_size //
                                                        c.num_attention_heads)}


def seq_flops(dims: dict[str, int], T: int) -> float:
    """Training FLOPs of one sequence of length T: 6*N*T + 12*L*d_attn*T^2 (PaLM convention,
    no causal discount; N = weights of all Linear layers incl. the LM head)."""
    return 6.0 * dims["matmul_params"] * T + 12.0 * dims["layers"] * dims["attn_dim"] * T * T


def account(dims: dict[str, int], micro: list[tuple[int, list[int]]]) -> dict[str, float]:
    """Executed (padded T) and useful (real lengths) FLOPs/tokens of a list of micro-batches
    given as (padded length T, [real lengths])."""
    ex_f = use_f = ex_t = use_t = 0.0
    for T, lens in micro:
        ex_t += T * len(lens)
        use_t += sum(lens)
        ex_f += len(lens) * seq_flops(dims, T)
        use_f += sum(seq_flops(dims, n) for n in lens)
    return {"exec_tokens": ex_t, "useful_tokens": use_t, "exec_flops": ex_f,
            "useful_flops": use_f}


def matmul_peak(seconds: float = 6.0) -> float:
    """Best fp32 GFLOP/s of a large square torch.matmul (several sizes, best of many)."""
    import torch

    best = 0.0
    t_end = time.perf_counter() + seconds
    sizes = (2048, 3072, 4096)
    while True:
        for n in sizes:
            a, b = torch.randn(n, n), torch.randn(n, n)
            a @ b
            t = time.perf_counter()
            a @ b
            best = max(best, 2 * n ** 3 / (time.perf_counter() - t) / 1e9)
        if time.perf_counter() > t_end:
            return best


# ----------------------------------------------------------------------------- workers

def run_forgetkit(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from forgetkit.data.batching import collate
    from forgetkit.models import load_model
    from forgetkit.train.loop import StepPlan, build_data, train

    cfg = forgetkit_config(args, work)
    profiler = None
    if args.profile == "forgetkit":
        profiler = _start_profiler(args, work)
    res = train(cfg, progress=False)
    if profiler is not None:
        _stop_profiler(profiler, work, "forgetkit")
    log = [json.loads(ln) for ln in (res.out_dir / "train_log.jsonl").read_text().splitlines()]
    by_step = {r["step"]: r for r in log if "elapsed_s" in r}
    w, s = args.warmup, args.warmup + args.steps
    elapsed = by_step[s]["elapsed_s"] - by_step[w]["elapsed_s"]
    targets = by_step[s]["target_tokens"] - by_step[w]["target_tokens"]
    step_times = [by_step[k + 1]["elapsed_s"] - by_step[k]["elapsed_s"] for k in range(w, s)]

    # Shapes of the timed micro-batches, from the deterministic plan (recomputed after the run so
    # that nothing is recorded inside the timed loop).
    model, tok = load_model(cfg.model, seed=cfg.seed)
    data = build_data(cfg, tok)
    assert len(data.train) == args.n_examples, (len(data.train), args.n_examples)
    plan = StepPlan(data, cfg, 1)
    assert plan.total_steps == s and plan.steps_per_epoch == s
    micro = []
    chk = 0
    flat = cfg.data.batching == "padding_free"
    for k in range(w, s):
        mbs, n_t, _ = plan.step(k, 0)
        chk += n_t
        for mb in mbs:
            T = (sum(len(e.input_ids) for e in mb) if flat else
                 collate(mb, tok.pad_token_id, cfg.data.pad_to_multiple_of)["input_ids"].shape[1])
            micro.append((T, [len(e.input_ids) for e in mb]))
    assert chk == targets
    acc = account(model_dims(model), micro)
    if flat:  # one row of sum(lens) tokens: no padding token; attention over the whole row
        # (sdpa/eager with a block-diagonal mask compute every score of the row, then mask)
        acc = account(model_dims(model), [(T, [T]) for T, _ in micro])
        acc.update({k: v for k, v in account(model_dims(model), [(n, [n]) for _, lens in micro
                                                                 for n in lens]).items()
                    if k.startswith("useful")})
    return {"elapsed_s": elapsed, "target_tokens": targets, "step_times": step_times,
            "final_loss": log[-2]["loss"] if len(log) > 1 else None,
            **acc}


def run_hf(args: argparse.Namespace, work: Path, method: str) -> dict[str, Any]:
    from transformers import (
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
        default_data_collator,
    )

    from forgetkit.models import load_model

    cfg = forgetkit_config(args, work)
    exs, tok = tokenized(args, work)
    model, _ = load_model(cfg.model, tokenizer=tok, seed=cfg.seed)  # same weights as forgetkit
    pad_to = args.max_length if method == "hf-maxlen" else None
    train_ds = [hf_features(e, pad_to, tok.pad_token_id) for e in exs]
    if method == "hf-maxlen":
        collator = default_data_collator
        sampling = "random"
    else:
        collator = DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8,
                                          label_pad_token_id=IGNORE, return_tensors="pt")
        sampling = "group_by_length"

    targs = TrainingArguments(
        output_dir=str(work / f"{method}-run"), per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.warmup + args.steps,
        learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch_fused", use_cpu=True, seed=args.seed,
        train_sampling_strategy=sampling, dataloader_drop_last=True,
        dataloader_num_workers=0, remove_unused_columns=False, logging_steps=10 ** 6,
        save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True)

    stamps: list[float] = []
    micro: list[tuple[int, list[int], int]] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, a, state, control, **kw):  # after optimizer.step + zero_grad
            stamps.append(time.perf_counter())

    class BenchTrainer(Trainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            lab, am = inputs["labels"], inputs["attention_mask"]
            micro.append((lab.shape[1], am.sum(1).tolist(), int((lab[:, 1:] != IGNORE).sum())))
            return super().training_step(model, inputs, num_items_in_batch)

    trainer = BenchTrainer(model=model, args=targs, train_dataset=train_ds,
                           data_collator=collator, processing_class=tok, callbacks=[Stamp()])
    profiler = None
    if args.profile == method:
        profiler = _start_profiler(args, work)
    out = trainer.train()
    if profiler is not None:
        _stop_profiler(profiler, work, method)
    w, s, A = args.warmup, args.warmup + args.steps, args.grad_accum
    assert len(stamps) == s, (len(stamps), s)
    timed = micro[w * A:s * A]
    return {"elapsed_s": stamps[s - 1] - stamps[w - 1],
            "target_tokens": sum(m[2] for m in timed),
            "step_times": [stamps[k] - stamps[k - 1] for k in range(w, s)],
            "final_loss": out.training_loss,
            **account(model_dims(model), [(T, lens) for T, lens, _ in timed])}


def _start_profiler(args: argparse.Namespace, work: Path) -> Any:
    import torch

    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                  record_shapes=False, with_stack=False)
    prof.__enter__()
    return prof


def _stop_profiler(prof: Any, work: Path, method: str) -> None:
    prof.__exit__(None, None, None)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (work / f"profile-{method}.txt").write_text(table)
    print(table, file=sys.stderr)


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    work = Path(args.workdir)
    if args.worker == "forgetkit":
        res = run_forgetkit(args, work)
    else:
        res = run_hf(args, work, args.worker)
    res["threads"] = torch.get_num_threads()
    (work / f"result-{args.worker}-{args.repeat}.json").write_text(json.dumps(res))


def check_same_objective(args: argparse.Namespace, work: Path) -> float:
    """|forgetkit loss - HF loss| on one batch of the real data: same targets, same weights."""
    import torch

    from forgetkit.data.batching import collate
    from forgetkit.models import load_model
    from forgetkit.train.loop import token_losses

    cfg = forgetkit_config(args, work)
    exs, tok = tokenized(args, work)
    model, _ = load_model(cfg.model, tokenizer=tok, seed=cfg.seed)
    batch = exs[:4]
    fk = collate(batch, tok.pad_token_id, 8)
    with torch.no_grad():
        out = model(input_ids=fk["input_ids"], attention_mask=fk["attention_mask"])
        ce = token_losses(out, fk["labels"])
        l_fk = float(ce.sum() / (fk["labels"] != IGNORE).sum())
        from transformers import DataCollatorForSeq2Seq

        hf = DataCollatorForSeq2Seq(tok, padding=True, pad_to_multiple_of=8,
                                    label_pad_token_id=IGNORE, return_tensors="pt")(
            [hf_features(e, None, tok.pad_token_id) for e in batch])
        n = (hf["labels"][:, 1:] != IGNORE).sum()
        l_hf = float(model(**hf, num_items_in_batch=n).loss)
    return abs(l_fk - l_hf)


# ----------------------------------------------------------------------------- driver

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="small model, few steps: the whole run in under 2 minutes")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per method "
                   "(default 24, quick 8)")
    p.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps before them")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 256, quick 128)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 4, quick 2)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (default hidden/64)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 8/3*hidden)")
    p.add_argument("--batch-size", type=int, default=8, help="micro-batch size")
    p.add_argument("--grad-accum", type=int, default=1, help="gradient accumulation steps")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batching", choices=("length_grouped", "padding_free"),
                   default="length_grouped", help="forgetkit's data.batching")
    p.add_argument("--median-len", type=float, default=120.0,
                   help="median example length in tokens (lognormal)")
    p.add_argument("--sigma", type=float, default=0.75, help="lognormal sigma of the lengths")
    p.add_argument("--min-len", type=int, default=30)
    p.add_argument("--max-len", type=int, default=500)
    p.add_argument("--methods", default=",".join(METHODS),
                   help=f"comma-separated subset of {','.join(METHODS)}")
    p.add_argument("--repeats", type=int, default=1,
                   help="run every method this many times (round-robin); report the median")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", choices=METHODS, default=None,
                   help="run torch.profiler around this method's training (slower; table on "
                   "stderr and in the work dir)")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--n-examples", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.steps = a.steps if a.steps is not None else (8 if a.quick else 24)
    a.hidden = a.hidden if a.hidden is not None else (128 if a.quick else 256)
    a.layers = a.layers if a.layers is not None else (2 if a.quick else 4)
    a.heads = a.heads if a.heads is not None else max(1, a.hidden // 64)
    if a.warmup < 1:
        p.error("--warmup must be >= 1 (the timed window starts at the end of a step)")
    a.n_examples = (a.warmup + a.steps) * a.batch_size * a.grad_accum
    return a


def _worker_argv(args: argparse.Namespace, method: str, work: Path, repeat: int) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--worker", method,
            "--workdir", str(work), "--repeat", str(repeat)]
    for k in ("steps", "warmup", "hidden", "layers", "heads", "intermediate", "batch_size",
              "grad_accum", "max_length", "lr", "threads", "seed", "batching"):
        v = getattr(args, k)
        if v is not None:
            argv += [f"--{k.replace('_', '-')}", str(v)]
    if args.profile:
        argv += ["--profile", args.profile]
    return argv


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
    with tempfile.TemporaryDirectory(prefix="forgetkit-bench-") as tmp:
        work = Path(tmp)
        records = make_records(args.n_examples, args.seed, args.median_len, args.sigma,
                               args.min_len, args.max_len)
        with (work / "train.jsonl").open("w") as fh:
            for r in records:
                fh.write(json.dumps(r) + "\n")
        exs, _ = tokenized(args, work)
        lens = np.array([len(e.input_ids) for e in exs])
        tgts = np.array([e.n_targets for e in exs])
        spec = model_spec(args)
        from forgetkit.models import load_model

        model, _ = load_model(forgetkit_config(args, work).model, seed=args.seed)
        dims = model_dims(model)
        del model
        diff = check_same_objective(args, work)
        print(f"model: random-init llama hidden={spec['hidden_size']} layers={args.layers} "
              f"heads={args.heads} mlp={spec['intermediate_size']} vocab=259 (byte), "
              f"{dims['params'] / 1e6:.2f}M params ({dims['matmul_params'] / 1e6:.2f}M in "
              f"Linear layers incl. tied LM head), fp32, sdpa attention, {args.threads} threads")
        print(f"data: {len(exs)} chat-template examples, length (tokens) mean {lens.mean():.0f} "
              f"median {np.median(lens):.0f} p90 {np.percentile(lens, 90):.0f} max {lens.max()}; "
              f"targets/example mean {tgts.mean():.0f} ({tgts.sum() / lens.sum():.0%} of tokens)")
        print(f"run: micro-batch {args.batch_size} x accum {args.grad_accum}, AdamW (fused) lr "
              f"{args.lr:g} constant, clip 1.0, {args.warmup} warm-up + {args.steps} timed "
              f"optimizer steps per method, one epoch, max_length {args.max_length}, forgetkit "
              f"data.batching {args.batching}")
        print(f"objective check: |loss_forgetkit - loss_HF| on one batch = {diff:.2e}")
        peak = matmul_peak(4.0 if args.quick else 8.0)
        results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
        for rep in range(args.repeats):
            for m in methods:
                t = time.perf_counter()
                proc = subprocess.run(_worker_argv(args, m, work, rep), cwd=str(ROOT),
                                      capture_output=True, text=True)
                if proc.returncode != 0:
                    sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
                    raise SystemExit(f"worker {m} failed (exit {proc.returncode})")
                if args.profile == m:
                    sys.stderr.write(proc.stderr[-12000:])
                res = json.loads((work / f"result-{m}-{rep}.json").read_text())
                results[m].append(res)
                print(f"  {m:<10} repeat {rep}: {res['target_tokens'] / res['elapsed_s']:8.1f} "
                      f"target tok/s ({time.perf_counter() - t:.0f}s incl. set-up)", flush=True)
                if args.profile == m:
                    prof = work / f"profile-{m}.txt"
                    if prof.exists():
                        (ROOT / "benchmarks" / f"profile-{m}.txt").write_text(prof.read_text())
        peak = max(peak, matmul_peak(2.0))
    report(args, results, peak)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v)
                                                  for k, v in vars(args).items()},
                                         "peak_gflops": peak, "results": results}, indent=1))
    print(f"total wall time {time.perf_counter() - t0:.0f}s")
    return 0


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]], peak: float
           ) -> None:
    rows = {}
    for m, runs in results.items():
        tps = [r["target_tokens"] / r["elapsed_s"] for r in runs]
        r = sorted(runs, key=lambda r: r["target_tokens"] / r["elapsed_s"])[len(runs) // 2]
        rows[m] = {
            "tps": statistics.median(tps), "spread": (min(tps), max(tps)),
            "step_ms": 1000 * statistics.median(r["step_times"]),
            "pad": 1 - r["useful_tokens"] / r["exec_tokens"],
            "exec_tps": r["exec_tokens"] / r["elapsed_s"],
            "mfu_exec": r["exec_flops"] / r["elapsed_s"] / (peak * 1e9),
            "mfu_useful": r["useful_flops"] / r["elapsed_s"] / (peak * 1e9),
            "targets": r["target_tokens"], "time": r["elapsed_s"]}
    print()
    print(f"fp32 matmul peak (best large torch.matmul): {peak:.1f} GFLOP/s")
    hdr = (f"{'method':<46} {'target tok/s':>12} {'step ms':>8} {'pad %':>6} "
           f"{'proc tok/s':>10} {'MFU exec':>8} {'MFU useful':>10}")
    print(hdr)
    print("-" * len(hdr))
    for m, r in rows.items():
        print(f"{LABEL[m]:<46} {r['tps']:>12.1f} {r['step_ms']:>8.0f} {100 * r['pad']:>6.1f} "
              f"{r['exec_tps']:>10.0f} {100 * r['mfu_exec']:>7.1f}% {100 * r['mfu_useful']:>9.1f}%")
    if args.repeats > 1:
        for m, r in rows.items():
            print(f"  {m}: target tok/s over {args.repeats} repeats: "
                  f"min {r['spread'][0]:.1f} max {r['spread'][1]:.1f}")
    print()
    fk = rows.get("forgetkit")
    if fk:
        for m in ("hf-maxlen", "hf-dynamic"):
            if m in rows:
                tag = "(c)/(a)" if m == "hf-maxlen" else "(c)/(b)"
                print(f"{tag} target tokens/s: {fk['tps'] / rows[m]['tps']:.2f}x")
        if "hf-dynamic" in rows:
            ok = fk["tps"] >= 1.15 * rows["hf-dynamic"]["tps"]
            print(f"target forgetkit >= 1.15x (b): {'met' if ok else 'NOT met'}")
    print("MFU exec: 6*N*T_padded + 12*L*d*T_padded^2 per sequence (FLOPs executed, padding "
          "included); MFU useful: same with each example's real length (padding excluded).")


if __name__ == "__main__":
    sys.exit(main())
