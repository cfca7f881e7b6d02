"""Training curves of an experiment: mean/min/max over seeds from the runs' train logs,
downsampled and saved as ``train_curves.json`` (or read back from it when the logs are gone)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from forgetkit.report.loading import Results
from forgetkit.results import read_json, write_json

CURVE_POINTS = 200
CURVES_FILE = "train_curves.json"


def _read_log(path: Path) -> list[dict[str, Any]]:
    out = []
    for ln in path.read_text().splitlines():
        if ln.strip():
            try:
                out.append(json.loads(ln))
            except json.JSONDecodeError:
                continue  # a torn last line of a killed run
    return out


def _series_of(log: list[dict[str, Any]]) -> dict[str, dict[int, float]]:
    s: dict[str, dict[int, float]] = {}
    for r in log:
        step = r.get("step")
        if step is None:
            continue
        if "loss" in r:
            s.setdefault("task_loss", {})[int(step)] = float(r.get("loss/task", r["loss"]))
        for k in ("lr", "loss/replay", "val_loss"):
            if r.get(k) is not None:
                s.setdefault(k, {})[int(step)] = float(r[k])
        for k, v in r.items():
            if k.startswith("reg/") and v is not None:
                s.setdefault(k, {})[int(step)] = float(v)
    return s


def _downsample(n: int, k: int) -> list[int]:
    if n <= k:
        return list(range(n))
    return sorted({round(i * (n - 1) / (k - 1)) for i in range(k)})


def curves_from_logs(res: Results, points: int = CURVE_POINTS) -> dict[str, Any] | None:
    """Per arm and series: mean/min/max over the seeds at the steps every seed logged."""
    arms: dict[str, Any] = {}
    for arm in res.arms:
        ok = [int(r["seed"]) for r in res.rows if r["arm"] == arm and r["status"] == "ok"]
        logs = [res.root / arm / f"seed-{s}" / "train_log.jsonl" for s in ok]
        logs = [p for p in logs if p.exists()]
        if not logs:
            continue
        per_seed = [_series_of(_read_log(p)) for p in logs]
        series = {}
        for key in sorted(set().union(*per_seed)):
            have = [s[key] for s in per_seed if key in s]
            if len(have) != len(per_seed):
                continue
            steps = sorted(set.intersection(*(set(h) for h in have)))
            idx = _downsample(len(steps), points)
            steps = [steps[i] for i in idx]
            vals = [[h[st] for h in have] for st in steps]
            series[key] = {"step": steps, "mean": [sum(v) / len(v) for v in vals],
                           "min": [min(v) for v in vals], "max": [max(v) for v in vals]}
        if series:
            arms[arm] = {"n_seeds": len(logs), "series": series}
    if not arms:
        return None
    return {"format": 1, "statistic": "mean over seeds; band = min..max over seeds",
            "arms": arms}


def load_curves(res: Results, write: bool = True) -> dict[str, Any] | None:
    """Curves from the train logs (then also saved as train_curves.json) or, without logs, from a
    committed train_curves.json."""
    c = curves_from_logs(res)
    if c is not None:
        if write:
            write_json(res.root / CURVES_FILE, c)
        return c
    p = res.root / CURVES_FILE
    return read_json(p) if p.exists() else None

