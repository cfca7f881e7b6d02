"""Validate forgetkit.memory: measured peak memory of real forgetkit training steps vs estimate.

For each configuration (model size x EWC on/off x gradient checkpointing on/off, fp32, AdamW)
a fresh Python process:

1. imports torch/transformers/forgetkit, builds the byte tokenizer, the config and a fixed batch
   of ``b`` sequences of exactly ``s`` tokens (random ids, loss on every position but the first
   quarter), creates the backend; then takes the **baseline**: the current RSS (psutil);
2. builds the random-init Llama, the optimizer, the regularizer (EWC: theta0 snapshot + a Fisher;
   the Fisher *estimate* is replaced by a constant tensor of the same shape, so that what is
   measured is the training step, not the estimation, whose memory is a separate budget) and runs
   ``--steps`` optimizer steps exactly as ``forgetkit.train.loop.train`` does (backend.forward,
   ``token_losses``, token-normalised loss, ``backend.backward``, ``reg.grad_term``, foreach clip,
   ``set_lr``, ``backend.optimizer_step``: fused AdamW, ``zero_grad(set_to_none=True)``);
3. reports ``measured = peak RSS - baseline``, where peak RSS is the larger of
   ``getrusage(RUSAGE_SELF).ru_maxrss`` (exact kernel high-water mark) and a 1 ms psutil sampler.
   If ``ru_maxrss`` at the baseline is already above the final peak (an import-time spike),
   the sampler's value is used and flagged.

glibc: by default its heap keeps freed chunks (adaptive mmap threshold), so RSS is a high-water
mark of the heap, ~25-40 % above the live tensors here (``--malloc default`` shows it). With
``--malloc mmap`` (the default of this script) the workers run with
``MALLOC_MMAP_THRESHOLD_=65536``: every tensor >= 64 KiB is its own mapping, returned to the OS
when freed, so RSS follows the live tensors -- the CPU analogue of
``torch.cuda.max_memory_allocated``, which is what the estimator models. Before the baseline the
worker runs the same code once on a 1-layer, 32-wide model (imports, shared-library code pages,
thread pools, autograd engine). On CUDA
(if present) the worker runs on the GPU and reports ``torch.cuda.max_memory_allocated()``
(tensors only), baseline 0.

The estimate is ``forgetkit.memory.estimate_for_config(cfg, model=model, seq_len=s,
logit_positions=<the batch's target positions>)``; the measured step computes logits where
``--logits`` says (default ``targets``, the loop's default: the target positions only; ``all``:
every position, as before 2026-12-02's numerics version 3).
Target: measured / estimated within 0.85-1.15.

    .venv/bin/python benchmarks/memory.py            # 3 sizes x {plain, ewc} x {ckpt off, on}
    .venv/bin/python benchmarks/memory.py --quick    # 2 sizes, 2 steps
    .venv/bin/python benchmarks/memory.py --sizes '' --no-vocab-rows --smol   # 135M rows only

Besides the byte-vocabulary sizes it runs, by default, a 49152-token vocabulary (SmolLM2's) on a
small body (``v49k``), unpadded and padded (lengths s/4..s right-padded to s, attention mask 0
and label -100 on pads: 37.5 % padding at b=4), with and without checkpointing: there the
logits/loss term is the largest part of the peak. ``--smol`` adds SmolLM2-135M's shape (random
init, padded batch).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (hidden, layers, heads, intermediate, kv heads, vocab, tied embeddings).
# 5M/20M/60M: the byte tokenizer's 259-token vocabulary (the layers dominate). v49k: SmolLM2's
# 49152-token vocabulary on a small body, so that the logits/loss term (s*b*V*16 bytes in fp32:
# 805 MB at s=256, b=4) is the largest part of the peak. smol135m: SmolLM2-135M's shape
# (d 576, 30 layers, GQA 9/3, MLP 1536, V 49152, tied), random init.
SIZES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "5M": (256, 6, 4, 688, 4, 259, False),
    "20M": (512, 6, 8, 1376, 8, 259, False),
    "60M": (768, 8, 12, 2048, 12, 259, False),
    "v49k": (256, 4, 4, 688, 4, 49152, False),
    "smol135m": (576, 30, 9, 1536, 3, 49152, True),
    # Llama-3.2-1B's body with SmolLM2's vocabulary (1.07 B parameters): the GPU check's size
    "llama1b": (2048, 16, 32, 8192, 8, 49152, True),
}
# the real-vocabulary rows: (size, padded) x ckpt, no EWC
VOCAB_ROWS: tuple[str, ...] = ("v49k",)


def config(size: str, ewc: bool, ckpt: bool, s: int, b: int, out: Path,
           logits: str = "targets", precision: str = "fp32") -> Any:
    from forgetkit.config import config_from_dict

    d, L, h, i, kv, V, tied = SIZES[size]
    raw: dict[str, Any] = {
        "name": "mem", "seed": 0,
        "model": {"random_init": {"model_type": "llama", "hidden_size": d, "intermediate_size": i,
                                  "num_hidden_layers": L, "num_attention_heads": h,
                                  "num_key_value_heads": kv, "max_position_embeddings": s,
                                  "vocab_size": V, "tie_word_embeddings": tied},
                  "tokenizer": "byte", "dtype": "float32", "attn_implementation": "sdpa",
                  "gradient_checkpointing": ckpt},
        "data": {"train": {"path": "unused.jsonl"}, "max_length": s},
        "training": {"micro_batch_size": b, "lr": 1e-4, "max_grad_norm": 1.0,
                     "logits": logits,
                     "mixed_precision": "bf16" if precision == "bf16" else "no"},
        "distributed": {"cpu": True},
        "output": {"dir": str(out)},
        "regularizers": ([{"type": "ewc", "lambda": 1.0, "fisher_data": {"path": "unused"}}]
                         if ewc else []),
    }
    return config_from_dict(raw, "benchmarks/memory.py")


def make_batch(b: int, s: int, vocab: int, padded: bool) -> dict[str, Any]:
    """``b`` sequences padded to ``s`` tokens: all of length ``s`` (``padded=False``) or of
    lengths spread evenly from s/4 to s (right padding with id 0, attention mask 0 and label
    -100 on the pads: the shape of a dynamically padded batch); loss on every real position but
    the first quarter of each sequence."""
    import torch

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (b, s), generator=g)
    labels = torch.roll(ids, -1, dims=1)
    am = torch.ones_like(ids)
    lengths = [s] * b
    if padded:
        lengths = [s if b == 1 else int(s // 4 + (s - s // 4) * j / (b - 1)) for j in range(b)]
    for j, n in enumerate(lengths):
        labels[j, : n // 4] = -100
        labels[j, n - 1:] = -100
        ids[j, n:] = 0
        am[j, n:] = 0
    return {"input_ids": ids, "attention_mask": am, "labels": labels}


class Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        import psutil

        self.proc = psutil.Process()
        self.peak = 0
        self.stop = False

    def run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.001)


def run_steps(a: argparse.Namespace, cfg: Any, tok: Any, backend: Any,
              batch: dict[str, Any], n_targets: int, steps: int) -> Any:
    """Build model/optimizer/regularizer and run ``steps`` steps of the forgetkit loop."""
    import torch

    from forgetkit.models import load_model
    from forgetkit.regularizers.ewc import EWC
    from forgetkit.train.loop import model_inputs, reg_context, target_losses, target_mask
    from forgetkit.train.optim import build_optimizer, param_groups, set_lr

    dev = backend.device
    # --- the training step of forgetkit.train.loop.train, unchanged
    model, _ = load_model(cfg.model, tokenizer=tok)
    model = backend.shard(model)
    model.train()
    backend.model = model
    t = cfg.training
    optimizer = build_optimizer(param_groups(list(backend.local_params()), t), t, dev)
    ctx = reg_context(backend, model, optimizer)
    regs: list[Any] = []
    if a.ewc:
        reg = EWC(1.0)
        reg._obtain = lambda ctx: [torch.full_like(x, 1e-3) for x in reg.anchor]  # type: ignore
        reg.prepare(ctx)
        regs.append(reg)
    model, optimizer = backend.wrap(model, optimizer)
    ctx.model = model
    keep = target_mask(batch, t.logits == "targets")  # as the loop (training.logits)
    for _ in range(steps):
        with backend.autocast():
            out = backend.forward(**model_inputs(batch, None, keep))
        ce = target_losses(out, batch["labels"], keep)
        loss = ce.sum() * (1.0 / n_targets)
        # ``out`` (the logits) stays referenced through the backward pass, as in the loop
        backend.backward(loss)
        del out
        for r in regs:
            r.grad_term(ctx)
        backend.clip_grad_norm(t.max_grad_norm)
        set_lr(optimizer, t.lr, 1.0)
        backend.optimizer_step()
        del ce, loss
    return backend.unwrap()


def worker(a: argparse.Namespace) -> dict[str, Any]:
    import gc
    import resource

    import psutil
    import torch

    from forgetkit.memory import estimate_for_config
    from forgetkit.models import build_byte_tokenizer
    from forgetkit.train.distributed import make_backend

    torch.set_num_threads(a.threads)
    cuda = torch.cuda.is_available()
    cfg = config(a.size, a.ewc, a.ckpt, a.seq, a.batch, Path(a.workdir) / "run", a.logits,
                 a.precision)
    if cuda:
        cfg.distributed.cpu = False
    tok = build_byte_tokenizer()
    backend = make_backend(cfg.distributed, cfg.training)
    dev = backend.device
    batch = {k: v.to(dev) for k, v in
             make_batch(a.batch, a.seq, SIZES[a.size][5], a.padded).items()}
    n_targets = int((batch["labels"] != -100).sum())
    # Warm-up: the same code path once on a tiny model, so that lazily imported modules, code
    # pages of the shared libraries, thread pools and autograd's engine are in the baseline.
    tiny = config(a.size, a.ewc, a.ckpt, a.seq, 1, Path(a.workdir) / "run", a.logits,
                  a.precision)
    tiny.model.random_init.update(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                  num_attention_heads=2, num_key_value_heads=2, vocab_size=259)
    tiny_batch = {k: v[:1].clamp(max=258) if k != "attention_mask" else v[:1]
                  for k, v in batch.items()}
    run_steps(a, tiny, tok, backend, tiny_batch, n_targets, 1)
    backend.model = backend.optimizer = None
    gc.collect()
    proc = psutil.Process()
    base_rss = proc.memory_info().rss
    base_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = Sampler()
    sampler.start()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base_cuda = torch.cuda.memory_allocated()

    model = run_steps(a, cfg, tok, backend, batch, n_targets, a.steps)
    sampler.stop = True
    sampler.join()
    peak_max = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    est = estimate_for_config(cfg, model=model, seq_len=a.seq, logit_positions=n_targets)
    res: dict[str, Any] = {
        "params": est.details["params"], "base_rss": base_rss, "base_maxrss": base_max,
        "peak_maxrss": peak_max, "peak_sampled": sampler.peak,
        "masked": base_max >= peak_max,
        "estimate": {k: getattr(est, k) for k in ("weights_bytes", "gradients_bytes",
                                                  "optimizer_bytes", "regularizer_bytes",
                                                  "activations_bytes", "total_bytes")},
        "k": est.details["k"], "device": "cuda" if cuda else "cpu",
        "logits_bytes": est.details["logits_bytes"],
        "pad_fraction": float((batch["attention_mask"] == 0).float().mean()),
    }
    peak = sampler.peak if res["masked"] else max(peak_max, sampler.peak)
    res["measured"] = peak - base_rss
    if cuda:
        res["measured"] = torch.cuda.max_memory_allocated() - base_cuda
    return res


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="sizes 5M and 20M only")
    p.add_argument("--sizes", default=None, help=f"comma list of {','.join(SIZES)}")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=2, help="optimizer steps (>= 2: state + acts)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    p.add_argument("--malloc", choices=("mmap", "default"), default="mmap",
                   help="mmap: MALLOC_MMAP_THRESHOLD_=65536 in the workers, so that freed tensors "
                   "go back to the OS and RSS tracks live tensors (like cuda "
                   "max_memory_allocated); default: glibc's adaptive heap (process RSS as the "
                   "OOM killer sees it, incl. heap fragmentation)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--size", default="5M", help=argparse.SUPPRESS)
    p.add_argument("--ewc", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--padded", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-vocab-rows", action="store_true",
                   help="skip the real-vocabulary (49152) rows, unpadded and padded")
    p.add_argument("--smol", action="store_true",
                   help="add SmolLM2-135M-shaped rows (random init; ~3 GB, minutes on CPU)")
    p.add_argument("--workdir", default="/tmp", help=argparse.SUPPRESS)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="bf16: training.mixed_precision bf16 (autocast over fp32 master "
                        "weights), the GPU check's setting")
    p.add_argument("--logits", choices=("targets", "all"), default="targets",
                   help="training.logits of the measured step (default targets, the loop's "
                        "default: logits at the target positions only)")
    a = p.parse_args(argv)
    if a.worker:
        print("RESULT " + json.dumps(worker(a)))
        return 0
    sizes = ([x for x in a.sizes.split(",") if x] if a.sizes is not None else
             (["5M", "20M"] if a.quick else ["5M", "20M", "60M"]))  # --sizes '': none
    # (size, ewc, ckpt, padded)
    plan = [(sz, ewc, ckpt, False) for sz in sizes for ewc in (False, True)
            for ckpt in (False, True)]
    if not a.no_vocab_rows:
        plan += [(sz, False, ckpt, padded) for sz in VOCAB_ROWS for padded in (False, True)
                 for ckpt in (False, True)]
    if a.smol:
        plan += [("smol135m", False, ckpt, True) for ckpt in (False, True)]
    rows = []
    print(f"{a.precision} AdamW, s={a.seq} b={a.batch}, {a.steps} optimizer steps, "
          f"{a.threads} threads, "
          f"training.logits {a.logits}; "
          + ("measured = torch.cuda.max_memory_allocated over the post-warm-up baseline "
             "(tensors; fresh process per row)" if _cuda() else
             f"measured = peak RSS - baseline RSS (fresh process per row, malloc={a.malloc})"))
    hdr = (f"{'size':>8} {'params':>7} {'V':>6} {'pad%':>5} {'ewc':>4} {'ckpt':>5} {'k':>5} "
           f"{'est W+G+O+R':>11} {'est act':>8} {'(logits)':>8} {'est peak':>9} "
           f"{'measured':>9} {'ratio':>6}")
    print(hdr)
    print("-" * len(hdr))
    import tempfile

    with tempfile.TemporaryDirectory(prefix="forgetkit-mem-") as work:
        for size, ewc, ckpt, padded in plan:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
                   "--size", size, "--seq", str(a.seq), "--batch", str(a.batch),
                   "--steps", str(a.steps), "--threads", str(a.threads),
                   "--workdir", work, "--logits", a.logits, "--precision", a.precision] + (
                       ["--ewc"] if ewc else []) + (
                       ["--ckpt"] if ckpt else []) + (["--padded"] if padded else [])
            env = dict(os.environ)
            if a.malloc == "mmap":
                env["MALLOC_MMAP_THRESHOLD_"] = "65536"
            proc = subprocess.run(cmd, cwd=str(ROOT), capture_output=True, text=True, env=env)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-6000:])
                raise SystemExit(f"worker {size} ewc={ewc} ckpt={ckpt} padded={padded} failed")
            r = json.loads(line[0][7:])
            e = r["estimate"]
            state = (e["weights_bytes"] + e["gradients_bytes"] + e["optimizer_bytes"]
                     + e["regularizer_bytes"])
            ratio = r["measured"] / e["total_bytes"]
            r.update(size=size, ewc=ewc, ckpt=ckpt, padded=padded, ratio=ratio,
                     vocab=SIZES[size][5])
            rows.append(r)
            mb = 1e6
            print(f"{size:>8} {r['params'] / 1e6:6.1f}M {SIZES[size][5]:>6} "
                  f"{100 * r['pad_fraction']:5.1f} {'yes' if ewc else 'no':>4} "
                  f"{'yes' if ckpt else 'no':>5} {r['k']:5.1f} {state / mb:9.0f}MB "
                  f"{e['activations_bytes'] / mb:6.0f}MB {r['logits_bytes'] / mb:6.0f}MB "
                  f"{e['total_bytes'] / mb:7.0f}MB {r['measured'] / mb:7.0f}MB {ratio:6.2f}"
                  + ("  (baseline masked: sampled)" if r["masked"] else ""), flush=True)
    ok = all(0.85 <= r["ratio"] <= 1.15 for r in rows)
    print(f"target 0.85 <= measured/estimated <= 1.15: {'met' if ok else 'NOT met'} "
          f"(range {min(r['ratio'] for r in rows):.2f}-{max(r['ratio'] for r in rows):.2f})")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
