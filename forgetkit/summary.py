"""Tables from a results tree: ``summary.csv`` (one row per run), ``summary_agg.csv`` (per arm,
mean and 95 % CI over seeds) and ``columns.json`` (each metric's role, unit and direction).

Reads only result files (never a model), so the report tools can call it too.

Columns of summary.csv::

    arm, seed, status, <grid keys>, warnings (only when a run has any, e.g. collapsed training),
    error (failed runs: the one-line error; the traceback is in the run's run.log),
    <metric>_before, <metric>_after, <metric>_delta     for every task and general metric
        (delta = after - before in the metric's own unit)
    task_gain         improvement of the first task metric (positive = learned; sign flipped
                      for lower-is-better metrics such as NLL)
    mean_forgetting   mean over general metrics of the drop (positive = forgot), each in its
                      own unit (accuracy points, or nats for NLL)
    mean_rel_forgetting  the same with each drop divided by |before| (unit-free)
    retention_ratio   mean over general metrics of after/before (before/after when lower is
                      better): 1 = nothing lost
    train_time_s, tokens, target_tokens, steps
    memory_estimate_bytes  forgetkit.memory's per-device estimate of the training state
    peak_memory_bytes      measured: cuda max_memory_allocated, or the CPU process's peak RSS
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from forgetkit.eval.forgetting import forgetting, mean_ci, retention_ratio, task_gain
from forgetkit.results import SUMMARY, read_json, write_json, write_text


def _value(scores: dict[str, Any], name: str) -> float:
    v = scores.get(name, {}).get("value")
    return float(v) if v is not None else math.nan


def summary_row(s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """One CSV row and the column metadata from a run's summary.json."""
    row: dict[str, Any] = {"arm": s["arm"], "seed": s["seed"], "status": s["status"]}
    for k, v in (s.get("grid") or {}).items():
        row[f"grid:{k}"] = v
    meta: dict[str, dict[str, Any]] = {}
    if s.get("warnings"):  # e.g. a collapsed training: shown beside its numbers, not hidden
        row["warnings"] = "; ".join(s["warnings"])
    if s["status"] != "ok":
        row["error"] = s.get("error", "")
        return row, meta
    before, after = s["before"], s["after"]
    drops, rel, ret = [], [], []
    first_task = None
    for role in ("task", "general"):
        for name, b in before.get(role, {}).items():
            hib = bool(b.get("higher_is_better", True))
            vb, va = _value(before[role], name), _value(after[role], name)
            row[f"{name}_before"], row[f"{name}_after"] = vb, va
            row[f"{name}_delta"] = va - vb
            meta[name] = {"role": role, "higher_is_better": hib, "metric": b.get("metric"),
                          "kind": b.get("kind")}
            if role == "task" and first_task is None:
                first_task = (vb, va, hib)
            if role == "general":
                d = forgetting(vb, va, hib)
                drops.append(d)
                rel.append(d / abs(vb) if vb else math.nan)
                ret.append(retention_ratio(vb, va, hib))
    row["task_gain"] = task_gain(*first_task) if first_task else math.nan
    row["mean_forgetting"] = sum(drops) / len(drops) if drops else math.nan
    row["mean_rel_forgetting"] = sum(rel) / len(rel) if rel else math.nan
    row["retention_ratio"] = sum(ret) / len(ret) if ret else math.nan
    tr = s.get("train", {})
    row["train_time_s"] = tr.get("train_time_s")
    row["tokens"] = tr.get("tokens")
    row["target_tokens"] = tr.get("target_tokens")
    row["steps"] = tr.get("steps")
    row["memory_estimate_bytes"] = (tr.get("memory_estimate") or {}).get("total_bytes")
    row["peak_memory_bytes"] = (tr.get("memory") or {}).get("peak_bytes")
    return row, meta


def collect(root: Path) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    rows, meta = [], {}
    for p in sorted(Path(root).glob(f"*/seed-*/{SUMMARY}")):
        row, m = summary_row(read_json(p))
        rows.append(row)
        meta.update(m)
    rows.sort(key=lambda r: (str(r["arm"]), int(r["seed"])))
    return rows, meta


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm: n and, for every numeric column, mean and 95 % CI half-width over seeds."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            arms.setdefault(r["arm"], []).append(r)
    out = []
    for arm, rs in arms.items():
        agg: dict[str, Any] = {"arm": arm, "n_seeds": len(rs)}
        keys = [k for k in rs[0] if k not in ("arm", "seed", "status")]
        for k in keys:
            vals = [r.get(k) for r in rs]
            if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
                m, h = mean_ci([float(v) for v in vals])
                agg[f"{k}_mean"], agg[f"{k}_ci95"] = m, h
            elif k.startswith("grid:"):
                agg[k] = vals[0]
        out.append(agg)
    return out


def write_tables(root: Path) -> None:
    import pandas as pd

    rows, meta = collect(root)
    if not rows:
        return
    write_text(Path(root) / "summary.csv", pd.DataFrame(rows).to_csv(index=False))
    agg = aggregate(rows)
    if agg:
        write_text(Path(root) / "summary_agg.csv", pd.DataFrame(agg).to_csv(index=False))
    write_json(Path(root) / "columns.json", meta)
