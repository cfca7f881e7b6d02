"""The experiment runner: arms x seeds -> evaluate before, train, evaluate after, summarise.

Stages per run, each reading the previous one's files:

1. ``eval_before.json``: the base model scored once per (base model, evaluation settings) and
   reused by every arm and seed that shares them (cache under ``_cache/``);
2. training in its own process (``python -m forgetkit.train`` or the configured launcher, e.g.
   torchrun), resuming from its newest checkpoint if an earlier attempt was killed;
3. ``eval_after.json``: the saved checkpoint scored in this (non-distributed) process, plus
   optional WiSE-FT interpolations;
4. ``summary.json`` (status ok / failed with the error) and the experiment's ``summary.csv``.

A finished run (``summary.json`` with status ok) is skipped on a rerun unless ``force``.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetkit.config import (
    ArmSpec,
    Config,
    ConfigError,
    apply_overrides,
    config_from_dict,
    config_to_dict,
    dump_config,
)
from forgetkit.results import (
    SUMMARY,
    environment,
    is_finished,
    read_json,
    run_dir,
    write_json,
    write_text,
)

EVAL_SEED = 0

log = logging.getLogger("forgetkit")


@dataclass
class RunSpec:
    arm: str
    seed: int
    grid: dict[str, Any]
    cfg: Config
    dir: Path


# ----------------------------------------------------------------------------- planning

def _leaf(key: str) -> str:
    parts = [p for p in key.split(".") if not p.isdigit()]
    return parts[-1] if parts else key


def expand_arms(arms: list[ArmSpec]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, overrides, grid values) per arm; an arm with a grid becomes one arm per point."""
    out = []
    for arm in arms or [ArmSpec(name="default")]:
        if not arm.grid:
            out.append((arm.name, dict(arm.overrides), {}))
            continue
        keys = list(arm.grid)
        for values in itertools.product(*(arm.grid[k] for k in keys)):
            point = dict(zip(keys, values, strict=True))
            name = arm.name + "".join(f"@{_leaf(k)}={v}" for k, v in point.items())
            out.append((name, {**arm.overrides, **point}, point))
    return out


def plan_runs(raw: dict[str, Any], src: str, arms: list[str] | None = None,
              seeds: list[int] | None = None) -> tuple[Config, list[RunSpec]]:
    """Validate the experiment and every arm's resolved config; nothing is written.

    Raises ConfigError (file, arm, dotted key, did-you-mean) on any problem.
    """
    base = config_from_dict(copy.deepcopy(raw), src)
    opts = base.experiment
    expanded = expand_arms(opts.arms)
    names = [n for n, _, _ in expanded]
    dup = {n for n in names if names.count(n) > 1}
    if dup or any(not n for n in names):
        raise ConfigError(f"{src}: experiment.arms: arm names must be unique and non-empty "
                          f"(duplicates: {sorted(dup)})")
    if arms:
        for a in arms:
            if a not in names:
                near = difflib.get_close_matches(a, names, n=1, cutoff=0.4)
                hint = f"; did you mean '{near[0]}'?" if near else f"; arms are {names}"
                raise ConfigError(f"--arms: unknown arm '{a}'{hint}")
        expanded = [e for e in expanded if e[0] in arms]
    seed_list = seeds if seeds else opts.seeds
    root = Path(opts.results_dir.format(name=base.name))
    runs = []
    # Seed-major order: every arm's seed 0 first, so an interrupted experiment still has
    # comparable arms.
    for seed, (name, overrides, point) in itertools.product(seed_list, expanded):
        r = copy.deepcopy(raw)
        try:
            apply_overrides(r, overrides)
        except ConfigError as e:
            raise ConfigError(f"{src} (arm '{name}'): {e}") from None
        r["seed"] = seed
        d = run_dir(root, name, seed)
        r.setdefault("output", {})
        r["output"] = {**(r["output"] or {}), "dir": str(d), "save_model": True}
        cfg = config_from_dict(r, f"{src} (arm '{name}')")
        share_fisher(cfg, root)
        runs.append(RunSpec(name, seed, point, cfg, d))
    return base, runs


# ----------------------------------------------------------------------------- base model

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def base_model_identity(cfg: Config) -> dict[str, Any]:
    m = config_to_dict(cfg.model)
    for k in ("gradient_checkpointing", "attn_implementation"):
        m.pop(k, None)  # training-time options: same weights
    return m


def share_fisher(cfg: Config, root: Path) -> None:
    """Point every EWC regularizer without a ``fisher_path`` at a shared cache file.

    The file name hashes everything the estimate depends on (base model, Fisher data and
    settings, max length, seed), so arms that differ only in lambda (a sweep) or in other
    regularizers estimate the Fisher once and reuse it. Online EWC keeps its own chain.
    """
    for rc in cfg.regularizers:
        if rc.type != "ewc" or rc.fisher_path or rc.online_gamma is not None:
            continue
        key = _hash({"model": base_model_identity(cfg),
                     "fisher": {k: v for k, v in config_to_dict(rc).items()
                                if k in ("fisher_data", "fisher_examples", "fisher_batch_size",
                                         "estimator", "fisher_samples", "include", "exclude")},
                     "max_length": cfg.data.max_length, "train_on_prompt":
                     cfg.data.train_on_prompt, "seed": cfg.seed})
        rc.fisher_path = str(root / "_cache" / f"fisher-{key}.safetensors")


def base_checkpoint(cfg: Config, root: Path) -> str:
    """A path (or hub id) of the base model that evaluation can load.

    Random-init and GGUF models are materialised once as an HF checkpoint under ``_base/``.
    """
    from forgetkit.models import resolve_model_path

    m = cfg.model
    if m.random_init is None and m.gguf_file is None:
        path, gguf = resolve_model_path(m.name_or_path)  # aliases convert and cache themselves
        if gguf is None:
            return path
    out = root / "_base" / _hash(base_model_identity(cfg))
    if (out / "config.json").exists():
        return str(out)
    from forgetkit.models import load_model, save_hf_checkpoint

    log.info("materialising the base model as an HF checkpoint in %s", out)
    model, tok = load_model(m)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_checkpoint(model, tok, tmp)
    os.replace(tmp, out)
    return str(out)


def eval_cache_key(cfg: Config) -> str:
    ev = config_to_dict(cfg.evaluation)
    ev.pop("wise_alphas", None)
    return _hash({"model": base_model_identity(cfg), "evaluation": ev,
                  "format": 1})


# ----------------------------------------------------------------------------- stages

def evaluate(model_dir: str | Path, cfg: Config) -> dict[str, Any]:
    """Score a saved checkpoint on the task and general metrics of ``cfg.evaluation``."""
    from forgetkit.eval.harness import evaluate_checkpoint

    ev = cfg.evaluation
    specs = list(ev.task) + list(ev.general)
    if not specs:
        return {"task": {}, "general": {}}
    # A fixed evaluation seed (not the run's): every arm and seed is scored on the same items,
    # so the cached before-scores pair with every after-score.
    scores = evaluate_checkpoint(str(model_dir), specs, batch_size=ev.batch_size,
                                 device=ev.device, seed=EVAL_SEED)
    return {"task": {s.name: scores[s.name] for s in ev.task},
            "general": {s.name: scores[s.name] for s in ev.general}}


def before_scores(cfg: Config, root: Path) -> tuple[dict[str, Any], bool]:
    """(scores, cache hit). Computed once per base model + evaluation settings."""
    key = eval_cache_key(cfg)
    path = root / "_cache" / f"eval_before-{key}.json"
    if path.exists():
        return read_json(path), True
    base = base_checkpoint(cfg, root)
    t0 = time.perf_counter()
    scores = evaluate(base, cfg)
    scores["model"] = base
    scores["seconds"] = time.perf_counter() - t0
    write_json(path, scores)
    return scores, False


def train_stage(run: RunSpec, launcher: list[str]) -> dict[str, Any]:
    """Run the training stage in its own process; return its train_result.json."""
    cfg_path = run.dir / "config.yaml"
    cmd = (launcher or [sys.executable]) + ["-m", "forgetkit.train", str(cfg_path)]
    log.info("training: %s", " ".join(cmd))
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
    tail: deque[bytes] = deque(maxlen=64)
    assert proc.stdout is not None
    with (run.dir / "train_output.log").open("ab") as fh:
        for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            fh.write(chunk)
            tail.append(chunk)
    rc = proc.wait()
    if rc != 0:
        text = b"".join(tail).decode(errors="replace").replace("\r", "\n")
        last = [ln for ln in text.splitlines() if ln.strip()][-12:]
        raise RuntimeError(f"training exited with status {rc}:\n" + "\n".join(last))
    return read_json(run.dir / "train_result.json")


def wise_scores(run: RunSpec, base: str, alphas: list[float]) -> dict[str, Any]:
    """WiSE-FT: score θ0 + α(θ* − θ0) for each α without retraining."""
    from forgetkit.regularizers.wise import write_interpolated_checkpoint

    out: dict[str, Any] = {}
    for a in alphas:
        d = run.dir / f"wise-{a}"
        write_interpolated_checkpoint(base, run.dir / "model", a, d)
        try:
            out[str(a)] = evaluate(d, run.cfg)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return out


def _weights(model_dir: str | Path) -> dict[str, Any] | None:
    """Every tensor of a local safetensors checkpoint (all shards); None for a hub id."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def layer_summaries(run: RunSpec, base: str) -> None:
    """Small per-layer files for the report: ``drift.json`` (relative drift ||θ−θ0||/||θ0|| of
    each layer) and, for EWC runs, ``fisher_summary.json`` (Fisher magnitude per layer)."""
    from forgetkit.drift import drift_record, fisher_record

    theta0, theta = _weights(base), _weights(run.dir / "model")
    if theta0 is not None and theta is not None:
        write_json(run.dir / "drift.json", drift_record(theta0, theta))
    del theta0, theta
    for rc in run.cfg.regularizers:
        if rc.type == "ewc" and rc.fisher_path and Path(rc.fisher_path).exists():
            from forgetkit.regularizers.fisher import load_fisher

            write_json(run.dir / "fisher_summary.json",
                       fisher_record(load_fisher(rc.fisher_path)[0]))
            break


def run_one(run: RunSpec, root: Path, launcher: list[str]) -> dict[str, Any]:
    run.dir.mkdir(parents=True, exist_ok=True)
    write_text(run.dir / "config.yaml", dump_config(run.cfg))
    write_json(run.dir / "env.json", environment())
    t0 = time.perf_counter()
    before, hit = before_scores(run.cfg, root)
    log.info("before-evaluation %s", "reused from the cache" if hit else "computed")
    write_json(run.dir / "eval_before.json", before)
    train = train_stage(run, launcher)
    if train.get("memory_estimate") and train.get("memory"):
        log.info("memory: estimated %.2f GiB per device, measured peak %.2f GiB (%s)",
                 train["memory_estimate"]["total_bytes"] / 2**30,
                 train["memory"]["peak_bytes"] / 2**30, train["memory"]["device"])
    base = before.get("model") or base_checkpoint(run.cfg, root)
    layer_summaries(run, base)
    t1 = time.perf_counter()
    after = evaluate(run.dir / "model", run.cfg)
    after["seconds"] = time.perf_counter() - t1
    if run.cfg.evaluation.wise_alphas:
        after["wise"] = wise_scores(run, base, run.cfg.evaluation.wise_alphas)
    write_json(run.dir / "eval_after.json", after)
    sources = {"train": run.cfg.data.train.path or run.cfg.data.train.name,
               "replay": [r.data.path or r.data.name for r in run.cfg.regularizers
                          if r.type == "replay" and r.data is not None],
               "fisher": [(r.fisher_data.path or r.fisher_data.name) if r.fisher_data else None
                          for r in run.cfg.regularizers if r.type == "ewc"]}
    return {"status": "ok", "arm": run.arm, "seed": run.seed, "grid": run.grid,
            "before_cache_hit": hit, "before": before, "after": after, "train": train,
            "regularizers": [config_to_dict(r) for r in run.cfg.regularizers],
            "data_sources": sources, "wall_time_s": time.perf_counter() - t0}


def run_experiment(base: Config, runs: list[RunSpec], force: bool = False) -> Path:
    """Execute (or resume) every run; one run's failure is recorded and the others continue."""
    from forgetkit.summary import write_tables

    opts = base.experiment
    root = Path(opts.results_dir.format(name=base.name))
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "plan.json", {"experiment": base.name,
                                    "runs": [{"arm": r.arm, "seed": r.seed, "grid": r.grid,
                                              "dir": str(r.dir)} for r in runs]})
    for i, run in enumerate(runs, 1):
        head = f"[run {i}/{len(runs)}] arm={run.arm} seed={run.seed}"
        if is_finished(run.dir) and not force:
            log.info("%s: finished earlier, skipped (--force recomputes)", head)
            continue
        if force and run.dir.exists():
            shutil.rmtree(run.dir)
        log.info("%s: starting", head)
        try:
            summary = run_one(run, root, opts.launcher)
            log.info("%s: done in %.0fs", head, summary["wall_time_s"])
        except KeyboardInterrupt:
            raise
        except Exception as e:  # recorded, and the other arms continue
            log.error("%s: failed: %s", head, str(e).splitlines()[0] if str(e) else repr(e))
            summary = {"status": "failed", "arm": run.arm, "seed": run.seed, "grid": run.grid,
                       "error": f"{type(e).__name__}: {e}",
                       "traceback": traceback.format_exc(limit=8)}
        write_json(run.dir / SUMMARY, summary)
        if summary["status"] == "ok" and not opts.keep_checkpoints:
            for sub in ("model", "checkpoints"):
                shutil.rmtree(run.dir / sub, ignore_errors=True)
        write_tables(root)
    write_tables(root)
    return root


# Effective FLOP/s used for the plan's time estimate: measured here for fp32 on a 2-core CPU
# (full FT of a 135M model ~90 tokens/s = 6 N tok/s ~ 7e10; a forward ~300 tok/s =
# 2 N tok/s ~ 8e10). On a GPU a conservative 1e14 (bf16, ~30 % MFU of an A100). Override with
# FORGETKIT_FLOPS.
CPU_FLOPS, GPU_FLOPS = 7.5e10, 1.0e14
LM_EVAL_TOKENS_PER_ITEM = 250  # rough: context x choices, for tasks whose data is not read here


def _model_params(cfg: Config) -> int | None:
    """Parameter count from the model config alone (meta device: no weights loaded)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from forgetkit.models import resolve_model_path

        if cfg.model.random_init is not None:
            spec = dict(cfg.model.random_init)
            conf = AutoConfig.for_model(spec.pop("model_type"), **spec)
        else:
            path, gguf = resolve_model_path(cfg.model.name_or_path)
            conf = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(conf)
        return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    except Exception:  # an estimate only: never fail the plan over it
        return None


def _mean_tokens(spec: Any, tok: Any, fmt_max: int, seed: int, limit: int | None = None
                 ) -> tuple[float, int]:
    from forgetkit.data.sources import load_records, select
    from forgetkit.data.templates import tokenize_record

    recs = select(load_records(spec), spec, seed)
    if limit is not None:
        recs = recs[:limit]
    lens = []
    for r in recs[:512]:
        ex = tokenize_record(r, spec.format, spec.fields, tok, fmt_max)
        if ex is not None:
            lens.append(len(ex.input_ids))
    return (sum(lens) / len(lens) if lens else 0.0), len(recs)


def estimate_seconds(base: Config, runs: list[RunSpec], steps: list[int] | None = None
                     ) -> dict[str, float] | None:
    """Rough wall-clock estimate of the plan: training (6N/token), Fisher (6N/token) and
    evaluation (2N/token) at an effective FLOP rate (see CPU_FLOPS). None if unknown."""
    import torch

    from forgetkit.models import load_tokenizer

    n = _model_params(base)
    if n is None:
        return None
    rate = float(os.environ.get("FORGETKIT_FLOPS") or
                 (GPU_FLOPS if torch.cuda.is_available() else CPU_FLOPS))
    try:
        tok = load_tokenizer(base.model)
        d = base.data
        train_len, _ = _mean_tokens(d.train, tok, d.max_length, base.seed)
        eval_tokens = 0.0
        for spec in list(base.evaluation.task) + list(base.evaluation.general):
            if spec.kind == "lm_eval" or spec.data is None:
                eval_tokens += (spec.limit or 500) * LM_EVAL_TOKENS_PER_ITEM
            else:
                mean, count = _mean_tokens(spec.data, tok, spec.max_length, EVAL_SEED, spec.limit)
                eval_tokens += mean * count
    except Exception:
        return None
    train = fisher = 0.0
    fisher_keys = set()
    for i, r in enumerate(runs):
        t = r.cfg.training
        n_steps = steps[i] if steps else (t.max_steps or 0)
        train += n_steps * t.micro_batch_size * t.gradient_accumulation_steps * train_len
        for rc in r.cfg.regularizers:
            if rc.type == "ewc" and rc.fisher_data is not None and rc.fisher_path not in fisher_keys:
                fisher_keys.add(rc.fisher_path)
                try:
                    fl, _ = _mean_tokens(rc.fisher_data, tok, d.max_length, r.seed,
                                         rc.fisher_examples)
                except Exception:  # unreadable data fails in its own run, not in the plan
                    continue
                fisher += rc.fisher_examples * fl
    n_evals = len({eval_cache_key(r.cfg) for r in runs}) + len(runs) * (
        1 + len(base.evaluation.wise_alphas))
    return {"train_s": 6 * n * train / rate, "fisher_s": 6 * n * fisher / rate,
            "eval_s": 2 * n * eval_tokens * n_evals / rate, "params": n, "flops": rate}


def describe_plan(base: Config, runs: list[RunSpec]) -> str:
    """The --dry-run text: runs, optimizer steps and evaluations, without loading a model."""
    from forgetkit.data.sources import load_records, select

    lines = [f"experiment '{base.name}': {len(runs)} runs "
             f"({len({r.arm for r in runs})} arms x {len({r.seed for r in runs})} seeds)"]
    n_eval_items = 0
    for spec in list(base.evaluation.task) + list(base.evaluation.general):
        n_eval_items += spec.limit or 0
    keys = {eval_cache_key(r.cfg) for r in runs}
    n_steps: list[int] = []
    for r in runs:
        t = r.cfg.training
        gb = t.micro_batch_size * t.gradient_accumulation_steps
        n_steps.append(t.max_steps or 0)
        if t.max_steps:
            steps = str(t.max_steps)
        else:
            try:
                n = len(select(load_records(r.cfg.data.train), r.cfg.data.train, r.seed))
                n_train = n - (round(r.cfg.data.validation_fraction * n)
                               if r.cfg.data.validation is None else 0)
                n_steps[-1] = t.epochs * (n_train // gb)
                steps = f"~{n_steps[-1]}"
            except (ConfigError, OSError) as e:
                steps = f"? ({e})"
        regs = ", ".join(x.type for x in r.cfg.regularizers) or "none"
        done = " [finished]" if is_finished(r.dir) else ""
        lines.append(f"  {r.arm:<24} seed {r.seed:<4} steps {steps:<8} global batch/process "
                     f"{gb:<4} regularizers: {regs}{done}")
    n_specs = len(base.evaluation.task) + len(base.evaluation.general)
    lines.append(f"evaluations: {len(keys)} before (cached per base model) + {len(runs)} after, "
                 f"{n_specs} metrics each"
                 + (f", +{len(base.evaluation.wise_alphas)} WiSE-FT points per run"
                    if base.evaluation.wise_alphas else "")
                 + (f"; items with an explicit limit: {n_eval_items}" if n_eval_items else ""))
    est = estimate_seconds(base, runs, n_steps)
    if est is not None:
        total = est["train_s"] + est["fisher_s"] + est["eval_s"]
        lines.append(f"estimated time (rough, {est['params'] / 1e6:.0f}M parameters at "
                     f"{est['flops'] / 1e9:.1f} effective GFLOP/s; FORGETKIT_FLOPS overrides): "
                     f"training {est['train_s'] / 60:.0f} min, Fisher {est['fisher_s'] / 60:.0f} "
                     f"min, evaluation {est['eval_s'] / 60:.0f} min, total ~{total / 60:.0f} min "
                     "(+ model loading and process start-up)")
    return "\n".join(lines)

