"""Run every benchmark and print their headline ratios.

    .venv/bin/python benchmarks/run_all.py [--quick]     # `make bench` entry point

Runs, one after the other (never concurrently: they would steal each other's cores),
``benchmarks/throughput.py`` (forgetkit vs HF Trainer's best configuration: MedMCQA's 3,087
examples and a long-tailed 3,000 on a 29.5 M model, and the 135M model's shape on MedMCQA),
``benchmarks/regularizers.py``
(regularizer overheads, Fisher cost, eval throughput, MFU) and ``benchmarks/memory.py``
(measured / estimated peak memory), each with ``--json``, then prints a summary of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run(script: str, args: list[str], out: Path, threads: int | None = None
        ) -> dict | list | None:
    cmd = [sys.executable, str(HERE / script), *args, "--json", str(out)]
    env = dict(os.environ)
    if threads:  # the same thread count for torch and OpenMP in every script
        cmd += ["--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    print(f"\n=== {' '.join(cmd[1:])}", flush=True)
    rc = subprocess.run(cmd, cwd=str(HERE.parent), env=env).returncode
    if rc != 0 or not out.exists():
        print(f"!!! {script} failed (exit {rc})")
        return None
    return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--skip", default="", help="comma list of throughput,regularizers,memory,eval_speed")
    p.add_argument("--threads", type=int, default=None,
                   help="torch and OpenMP threads for every script (default: each script's own; "
                        "1 on a machine shared with other jobs, see benchmarks/README.md)")
    p.add_argument("--out", type=Path, default=None,
                   help="also keep every script's JSON in this directory")
    a = p.parse_args(argv)
    q = ["--quick"] if a.quick else []
    skip = set(a.skip.split(","))
    lines: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        # the settings users run: MedMCQA's 3,087 examples and a long-tailed 3,000 on the
        # mid-size model, and the embedded 135M model's shape; --quick: tiny. Every window is
        # throughput.py's default, one whole HF length-grouping mega-batch (2 + 48 steps): a
        # shorter one holds the long end of HF's sorted mega-batch and is no sample of HF's
        # epoch (it read 0.97x for the 135M shape and 1.10x on the long tail, against 1.23x and
        # 1.26x over the mega-batch: benchmarks/README.md). The 'logits: all' diagnostic row
        # runs on MedMCQA only, to fit the run in ~100 minutes.
        settings = ([("tiny", q)] if a.quick else
                    [("mid medmcqa", []),
                     ("mid longtail", ["--dist", "longtail",
                                       "--methods", "hf-grouped,hf-flat,fk-grouped,fk-flat"]),
                     ("smol135m medmcqa", ["--model", "smol135m",
                                           "--methods", "hf-grouped,hf-flat,fk-flat"])])
        for k, (name, extra) in enumerate(settings if "throughput" not in skip else []):
            r = run("throughput.py", extra, t / f"tp{k}.json", a.threads)
            if isinstance(r, dict) and "ratio" in r.get("summary", {}):
                sm = r["summary"]
                lines.append(f"throughput [{name}] forgetkit / best HF: {sm['ratio']:.2f}x "
                             f"({sm['ratio_min']:.2f}-{sm['ratio_max']:.2f}) at "
                             f"{sm['n_examples']} examples, {sm['params'] / 1e6:.1f}M params "
                             f"({sm['fk_best']} vs {sm['hf_best']}, {sm['dist']}; epoch-adjusted "
                             f"{sm['ratio_epoch_adjusted']:.2f}x; target >= 1.15x)")
                for m, row in sm["rows"].items():
                    lines.append(f"throughput [{name}] {m}: {row['tps']:.1f} target tok/s, pad "
                                 f"{100 * row['pad_window']:.1f} % (window) "
                                 f"{100 * row['pad_epoch']:.1f} % (epoch)")
        if "regularizers" not in skip:
            r = run("regularizers.py", q, t / "reg.json", a.threads)
            if isinstance(r, dict):
                for k, v in r["step_ratio_direct"].items():
                    lines.append(f"step time {k} / plain: {v:.4f} direct, "
                                 f"{r['step_ratio_min'][k]:.3f} measured (target <= 1.05)")
                if "kl" in r["step_ratio_min"]:
                    lines.append(f"step time kl / plain: {r['step_ratio_min']['kl']:.2f} (min), "
                                 f"{r['step_ratio_median']['kl']:.2f} (median)")
                for k, v in r["fisher_ratio"].items():
                    lines.append(f"Fisher {k} per example / train step per example: {v:.2f} "
                                 "(target <= 1.5)")
                lines.append(f"eval: {max(r['eval_examples_per_s'].values()):.1f} examples/s "
                             f"at batch {r['eval_best_batch']}")
                lines.append(f"MFU (fp32, 6N tokens/s over matmul peak): {100 * r['mfu']:.1f} %")
                if "matmul_gflops" in r:
                    mm = r["matmul_gflops"]
                    lines.append(f"CPU matmul fp32 {mm['fp32']:.0f} GFLOP/s, bf16 {mm['bf16']:.0f} "
                                 f"GFLOP/s ({mm['bf16'] / mm['fp32']:.2f}x): mixed_precision auto "
                                 f"-> {r['mixed_precision_auto']}")
        if "memory" not in skip:
            r = run("memory.py", q or ["--smol"], t / "mem.json", a.threads)
            if isinstance(r, list):
                for x in r:
                    lines.append(f"memory {x['size']} ewc={x['ewc']!s:<5} ckpt={x['ckpt']!s:<5} "
                                 f"pad={x.get('padded', False)!s:<5} "
                                 f"measured/estimated {x['ratio']:.2f} (target 0.85-1.15)")
        if "eval_speed" not in skip:
            r = run("eval_speed.py", ["--tiny"] if a.quick else ["--limit", "30"], t / "evs.json",
                    a.threads)
            if isinstance(r, dict):
                sm = r["summary"]
                for k, v in sm["ratios"].items():
                    lines.append(f"eval speed {k}: {v:.2f}x")
                lines.append("eval acc/acc_norm identical (CLI, HFLM, SharedContextHFLM): "
                             f"{sm['acc_identical']}")
        if a.out is not None:
            a.out.mkdir(parents=True, exist_ok=True)
            for f in t.glob("*.json"):
                shutil.copy(f, a.out / f.name)
    print("\n=== summary")
    for ln in lines:
        print(ln)
    return 0


if __name__ == "__main__":
    sys.exit(main())
