"""Reading an experiment's results tree for the report: :class:`Results`, arm ordering, units
and number formatting."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetkit.config import ConfigError
from forgetkit.results import read_json

NAIVE = "naive"
_COUNT_COLS = {"n_seeds", "steps", "tokens", "target_tokens", "train_time_s"}


@dataclass
class Results:
    """One experiment's tables, read from its results tree."""

    name: str
    root: Path
    rows: list[dict[str, Any]]                 # summary.csv, every run (failed ones too)
    agg: dict[str, dict[str, Any]]             # arm -> summary_agg.csv row, in display order
    columns: dict[str, dict[str, Any]]         # columns.json
    grid: dict[str, dict[str, Any]] = field(default_factory=dict)  # arm -> {grid key: value}
    headline: list[str] = field(default_factory=list)  # analysis.headline (general metrics)
    reference: str | None = None                # analysis.reference_arm (matched gain)
    excluded: list[str] = field(default_factory=list)  # analysis.aggregate_exclude
    baseline: str | None = None                 # analysis.baseline_arm (paired differences)
    confidence: float = 0.95                    # analysis.confidence (the bootstrap CIs)

    @property
    def conf_pct(self) -> str:
        return f"{100 * self.confidence:g} %"
    points: list[dict[str, Any]] = field(default_factory=list)  # points_agg.csv rows

    @property
    def arms(self) -> list[str]:
        return list(self.agg)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r.get("status") != "ok"]

    def metrics(self, role: str | None = None) -> list[str]:
        return [m for m, c in self.columns.items() if role is None or c.get("role") == role]


def _num(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return math.nan
    return v


def _records(path: Path) -> list[dict[str, Any]]:
    import pandas as pd

    df = pd.read_csv(path)
    return [{k: _num(v) for k, v in r.items()} for r in df.to_dict("records")]


def arm_base(arm: str) -> str:
    """``ewc@lam=10`` -> ``ewc``."""
    return arm.split("@", 1)[0]


def _as_float(v: Any) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def order_arms(arms: list[str], grid: dict[str, dict[str, Any]]) -> list[str]:
    """naive first, then by base name, grid arms of one base by their (numeric) grid values."""
    def key(a: str) -> tuple[Any, ...]:
        vals = tuple((_as_float(v) if _as_float(v) is not None else math.inf, str(v))
                     for v in grid.get(a, {}).values())
        return (a != NAIVE, arm_base(a), vals, a)
    return sorted(arms, key=key)


def load_results(root: Path | str) -> Results:
    """Read an experiment's tables; the CSVs are rebuilt from summary.json files if absent."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root}: no such results directory")
    if (root / "summary.csv").exists():
        rows = _records(root / "summary.csv")
        agg_rows = (_records(root / "summary_agg.csv") if (root / "summary_agg.csv").exists()
                    else [])
        columns = read_json(root / "columns.json") if (root / "columns.json").exists() else {}
        if isinstance(columns.get("metrics"), dict) and isinstance(columns.get("columns"), dict):
            columns = columns["metrics"]  # columns.json since 2026-12-02: metrics + column docs
    else:
        from forgetkit.results.summary import aggregate, collect

        rows, columns = collect(root)
        if not rows:
            raise ConfigError(f"{root}: no summary.csv and no <arm>/seed-*/summary.json")
        agg_rows = aggregate(rows)
    for r in rows:
        r["status"] = str(r.get("status"))
        r["arm"] = str(r["arm"])
    grid: dict[str, dict[str, Any]] = {}
    for r in rows:
        g = {k[5:]: v for k, v in r.items() if k.startswith("grid:") and not
             (isinstance(v, float) and math.isnan(v))}
        if g:
            grid.setdefault(r["arm"], g)
    for a in agg_rows:  # arms whose summary.csv rows lack the grid columns
        g = {k[5:-5]: v for k, v in a.items() if k.startswith("grid:") and k.endswith("_mean")}
        if g:
            grid.setdefault(str(a["arm"]), g)
    by_arm = {str(a["arm"]): a for a in agg_rows}
    agg = {a: by_arm[a] for a in order_arms(list(by_arm), grid)}
    from forgetkit.results.summary import load_analysis

    analysis = load_analysis(root)
    points = (_records(root / "points_agg.csv") if (root / "points_agg.csv").exists() else [])
    return Results(root.name, root, rows, agg, columns, grid,
                   headline=[m for m in analysis.headline if m in columns],
                   reference=analysis.reference_arm, points=points,
                   excluded=list(analysis.aggregate_exclude),
                   baseline=analysis.baseline_arm, confidence=analysis.confidence)


# ----------------------------------------------------------------------------- units, format

_FRACTION_METRICS = {"acc", "acc_norm", "exact_match", "em", "mc1", "mc2", "f1", "token_f1",
                     "rouge_l", "rougeL", "bleu"}


def metric_unit(meta: dict[str, Any]) -> str:
    """A short unit for a metric from columns.json."""
    m = str(meta.get("metric") or "")
    if m == "nll":
        return "nats/token"
    if m in ("acc", "acc_norm") or m.startswith("acc"):
        return "accuracy, 0-1"
    if m in _FRACTION_METRICS:
        return f"{m}, 0-1"
    if m in ("ppl", "perplexity"):
        return "perplexity"
    return m or "score"


def precision(col: str) -> int:
    """Decimals printed for a column (its mean and its CI)."""
    base = re.sub(r"_(mean|ci95)$", "", col)
    return 0 if base in _COUNT_COLS else 3


def fmt(v: Any, decimals: int) -> str:
    f = _as_float(v)
    if f is None:
        return "n/a"
    s = f"{f:.{decimals}f}"
    return "0" + s[2:] if s.startswith("-0") and float(s) == 0 else s  # no "-0.000"



def _has(res: Results, col: str) -> bool:
    return any(_as_float(_mean(a, col)) is not None for a in res.agg.values())


def _mean(a: dict[str, Any], col: str) -> Any:
    """An arm's value of a column: its mean over seeds, or the column itself (the matched-gain
    columns are computed once per arm)."""
    return a.get(f"{col}_mean", a.get(col))

