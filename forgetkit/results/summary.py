"""Tables from a results tree: ``summary.csv`` (one row per run), ``summary_agg.csv`` (per arm,
over seeds), ``points.csv`` / ``points_agg.csv`` (every scored point of a run: the fine-tuned
model, each WiSE-FT alpha, each merge) and ``columns.json`` (each metric's role, unit and
direction, and what every column means).

Reads only result files (never a model), so the report tools call it too. The statistics are
those of :mod:`forgetkit.results.stats` (paired over items; crossed over seeds x items), with
the settings of the experiment's ``analysis:`` section (kept in ``analysis.json`` at the root
of the results tree; defaults when absent).

Runs made before per-item scores were recorded (no ``items`` in their eval files) get the
unpaired columns only; their paired columns are empty, never approximated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from forgetkit.results import SUMMARY, read_json, write_json, write_text
from forgetkit.results.forgetting import mean_ci, retention_ratio, task_gain
from forgetkit.results.stats import Resampler, interpolate_at, paired_delta, percentile_ci

log = logging.getLogger("forgetkit")

ANALYSIS_FILE = "analysis.json"
FINAL = "final"

# What every column means (columns.json "columns"); <m> is a metric's name.
COLUMN_DOCS: dict[str, str] = {
    "arm": "the arm (one mitigation setting) of the experiment",
    "seed": "the training seed of the run",
    "point": "which scored model: 'final' (the fine-tuned model), 'wise:<alpha>' (WiSE-FT "
             "theta0 + alpha (theta - theta0)), 'merge:<name>' (evaluation.merge)",
    "status": "ok, or failed (then 'error' holds the one-line error)",
    "<m>_before": "the base model's score on metric <m> (its unit: columns.json metrics)",
    "<m>_after": "the fine-tuned model's score on <m>",
    "<m>_delta": "after - before on <m>, in its unit (mean over seeds in the _agg tables)",
    "<m>_delta_lo": "lower end of the paired 95 % bootstrap CI of <m>_delta (resampling items; "
                    "in the _agg tables the crossed bootstrap over seeds x items)",
    "<m>_delta_hi": "upper end of that CI",
    "<m>_effect": "standardised paired effect: <m>_delta / the base model's per-item SD "
                  "(unit-free; sign as <m>_delta)",
    "<m>_lost": "accuracy-type <m>: items right before and wrong after (one run)",
    "<m>_gained": "accuracy-type <m>: items wrong before and right after (one run)",
    "<m>_mcnemar_p": "exact two-sided McNemar p-value of lost vs gained (one run; in the _agg "
                     "tables only for an arm of one seed, as <m>_mcnemar_p_mean)",
    "task_gain": "improvement of the first task metric, in its unit (positive = learned; the "
                 "sign is flipped for lower-is-better metrics such as NLL)",
    "task_gain_lo": "lower end of the 95 % CI of task_gain (paired / crossed bootstrap)",
    "task_gain_hi": "upper end of that CI",
    "std_forgetting": "the unit-free headline aggregate: the mean over the general metrics "
                      "(minus analysis.aggregate_exclude) of forgetting / the base model's "
                      "per-item SD; positive = forgot",
    "std_forgetting_lo": "lower end of the 95 % CI of std_forgetting",
    "std_forgetting_hi": "upper end of that CI",
    "std_forgetting_n": "how many general metrics std_forgetting averages",
    "<m>_forgetting": "forgetting on headline metric <m>: -<m>_delta when higher is better, "
                      "<m>_delta when lower is better (positive = forgot), in <m>'s unit",
    "<m>_forgetting_lo": "lower end of its 95 % CI",
    "<m>_forgetting_hi": "upper end of its 95 % CI",
    "mean_rel_forgetting": "mean over general metrics of drop / |before| (unit-free; unpaired)",
    "retention_ratio": "mean over general metrics of after/before (before/after when lower is "
                       "better): 1 = nothing lost (unpaired)",
    "ref_<f>": "the reference arm's <f> (std_forgetting or a headline forgetting) at this "
               "arm's task gain, interpolated along its curve (base, WiSE-FT alphas, final)",
    "excess_<f>": "<f> minus ref_<f>: forgetting beyond the reference at matched task gain "
                  "(negative = forgot less than the reference would at the same gain)",
    "excess_<f>_lo": "lower end of the 95 % CI of excess_<f> (same bootstrap replicates; empty "
                     "when fewer than 95 % of them put the arm's gain on the curve)",
    "excess_<f>_hi": "upper end of that CI",
    "vs_<b>_<f>": "this arm's <f> (task_gain, std_forgetting or a headline forgetting) minus "
                  "that of the baseline arm <b> (analysis.baseline_arm), paired: the same item "
                  "(and seed) resamples for both",
    "vs_<b>_<f>_lo": "lower end of the 95 % CI of that difference",
    "vs_<b>_<f>_hi": "upper end of that CI",
    "matched_in_range": "fraction of bootstrap replicates in which the arm's task gain lies "
                        "on the reference curve (excess is undefined outside it)",
    "n_seeds": "number of finished seeds of the arm",
    "<col>_mean": "mean over seeds of a per-run column",
    "<col>_ci95": "95 % t-interval half-width of <col>_mean over seeds (NaN with one seed)",
    "train_time_s": "training wall time (s)",
    "tokens": "tokens processed in training",
    "target_tokens": "loss (response) tokens in training",
    "steps": "optimizer steps",
    "memory_estimate_bytes": "forgetkit.memory's per-device estimate of the training state",
    "peak_memory_bytes": "measured: cuda max_memory_allocated, or the CPU process's peak RSS",
    "warnings": "warnings the run reported about itself (e.g. collapsed training)",
    "error": "failed runs: the one-line error (the traceback is in the run's run.log)",
}

# The matched-gain CI is given only when at least this fraction of the bootstrap replicates puts
# the arm's task gain on the reference curve (else the CI would be conditional on being there).
MATCHED_MIN_IN_RANGE = 0.95

# Per-run columns that are not averaged over seeds (a CI bound or a p-value of one run).
_PER_RUN_ONLY = ("_lo", "_hi", "_mcnemar_p")


def load_analysis(root: Path, analysis: Any = None) -> Any:
    """The analysis settings: ``analysis`` if given, else ``<root>/analysis.json``, else the
    defaults of :class:`forgetkit.config.AnalysisConfig`."""
    from forgetkit.config import AnalysisConfig, _build

    if analysis is not None:
        return analysis
    p = Path(root) / ANALYSIS_FILE
    if p.exists():  # typed like the config section (unknown keys and bad values refused)
        return _build(AnalysisConfig, read_json(p), "analysis", str(p))
    return AnalysisConfig()


def _value(scores: dict[str, Any], name: str) -> float:
    v = scores.get(name, {}).get("value")
    return float(v) if v is not None else math.nan


@dataclass
class RunRecord:
    """One finished run: its summary and, where recorded, the per-item scores of every point."""

    summary: dict[str, Any]
    before_items: dict[str, dict[str, Any]] = field(default_factory=dict)
    # point -> metric -> items (point: 'final', 'wise:<a>', 'merge:<name>')
    after_items: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    @property
    def arm(self) -> str:
        return str(self.summary["arm"])

    @property
    def seed(self) -> int:
        return int(self.summary["seed"])


def _items_of(scores: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for role in ("task", "general"):
        for name, rec in (scores.get(role) or {}).items():
            it = rec.get("items") if isinstance(rec, dict) else None
            if it and it.get("id") and it.get("mean_equals_value", True):
                out[name] = it
    return out


def _points(after: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """point name -> its scores tree ({task, general}) from an eval_after tree."""
    pts = {FINAL: after}
    for a, sc in sorted((after.get("wise") or {}).items(), key=lambda kv: float(kv[0])):
        pts[f"wise:{a}"] = sc
    for name, sc in (after.get("merge") or {}).items():
        pts[f"merge:{name}"] = sc
    return pts


def load_run(rdir: Path) -> RunRecord:
    """A run's summary.json plus the per-item scores of its eval_before/eval_after.json."""
    s = read_json(rdir / SUMMARY)
    rec = RunRecord(s)
    if s.get("status") != "ok":
        return rec
    b, a = rdir / "eval_before.json", rdir / "eval_after.json"
    if b.exists() and a.exists():
        rec.before_items = _items_of(read_json(b))
        rec.after_items = {p: _items_of(sc) for p, sc in _points(read_json(a)).items()}
    return rec


def metric_meta(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each metric's role, direction, lm-eval metric and kind, from a run's before-scores."""
    meta: dict[str, dict[str, Any]] = {}
    for role in ("task", "general"):
        for name, b in (s.get("before") or {}).get(role, {}).items():
            meta[name] = {"role": role, "higher_is_better": bool(b.get("higher_is_better", True)),
                          "metric": b.get("metric"), "kind": b.get("kind"),
                          "unit": b.get("unit")}
    return meta


# ----------------------------------------------------------------------------- statistics

def _improve(delta: Any, hib: bool) -> Any:
    return delta if hib else -delta


@dataclass
class PointStats:
    """The paired statistics of one point (of one run, or of an arm over its seeds)."""

    columns: dict[str, Any]
    gain_reps: np.ndarray | None = None
    forgetting_reps: dict[str, np.ndarray] = field(default_factory=dict)  # measure -> reps
    forgetting: dict[str, float] = field(default_factory=dict)
    gain: float = math.nan
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it has no paired stats


def point_stats(before: dict[str, dict[str, Any]], afters: Sequence[dict[str, dict[str, Any]]],
                seeds: Sequence[int], meta: dict[str, dict[str, Any]], analysis: Any,
                rs: Resampler) -> PointStats:
    """Paired columns of one point: every metric's Δ with CI (and McNemar for one binary run),
    the task gain, the headline forgettings and std_forgetting, each with CI; replicates kept
    for the matched-gain comparison. Metrics without per-item scores in every run are left out."""
    conf = analysis.confidence
    cols: dict[str, Any] = {}
    ps = PointStats(cols)
    first_task = next((m for m, c in meta.items() if c["role"] == "task"), None)
    std_parts: list[np.ndarray] = []
    std_points: list[float] = []
    headline = set(analysis.headline)
    excluded = set(analysis.aggregate_exclude)
    for m, c in meta.items():
        if m not in before or any(m not in a for a in afters):
            continue
        try:
            d = paired_delta(before[m], [a[m] for a in afters], rs, m, seeds=seeds,
                             confidence=conf)
        except ValueError as e:  # e.g. before and after scored on different items
            log.warning("%s: no paired statistics (%s)", m, e)
            ps.skipped[m] = str(e)
            continue
        hib = c["higher_is_better"]
        cols[f"{m}_delta"] = d["delta"]
        cols[f"{m}_delta_lo"], cols[f"{m}_delta_hi"] = d["lo"], d["hi"]
        cols[f"{m}_effect"] = d["effect"]
        if "mcnemar_p" in d:
            cols[f"{m}_lost"], cols[f"{m}_gained"] = d["lost"], d["gained"]
            cols[f"{m}_mcnemar_p"] = d["mcnemar_p"]
        if m == first_task:
            ps.gain = _improve(d["delta"], hib)
            ps.gain_reps = _improve(d["reps"], hib)
            cols["task_gain"] = ps.gain
            cols["task_gain_lo"], cols["task_gain_hi"] = percentile_ci(ps.gain_reps, conf)
        if c["role"] != "general":
            continue
        f_point, f_reps = -_improve(d["delta"], hib), -_improve(d["reps"], hib)
        if m in headline:
            cols[f"{m}_forgetting"] = f_point
            cols[f"{m}_forgetting_lo"], cols[f"{m}_forgetting_hi"] = percentile_ci(f_reps, conf)
            ps.forgetting[f"{m}_forgetting"] = f_point
            ps.forgetting_reps[f"{m}_forgetting"] = f_reps
        if m not in excluded and d["sd"] and math.isfinite(d["sd"]):
            std_points.append(f_point / d["sd"])
            std_parts.append(f_reps / d["sd"])
    if std_parts:
        reps = np.mean(np.stack(std_parts), axis=0)
        point = float(np.mean(std_points))
        cols["std_forgetting"] = point
        cols["std_forgetting_lo"], cols["std_forgetting_hi"] = percentile_ci(reps, conf)
        cols["std_forgetting_n"] = len(std_parts)
        ps.forgetting["std_forgetting"] = point
        ps.forgetting_reps["std_forgetting"] = reps
    return ps


def matched_columns(arm: PointStats, curve: Sequence[PointStats], conf: float
                    ) -> dict[str, Any]:
    """``ref_<f>``, ``excess_<f>`` (+ CI) and ``matched_in_range`` of an arm against a reference
    curve (its points in curve order; the base point (0, 0) is prepended here)."""
    if arm.gain_reps is None or any(p.gain_reps is None for p in curve) or not curve:
        return {}
    cols: dict[str, Any] = {}
    n_boot = len(arm.gain_reps)
    g_pts = np.array([0.0] + [p.gain for p in curve])[:, None]
    g_reps = np.vstack([np.zeros(n_boot)] + [p.gain_reps for p in curve])  # type: ignore[list-item]
    in_range = math.nan
    for f, f_reps in arm.forgetting_reps.items():
        if any(f not in p.forgetting_reps for p in curve):
            continue
        v_pts = np.array([0.0] + [p.forgetting[f] for p in curve])[:, None]
        v_reps = np.vstack([np.zeros(n_boot)] + [p.forgetting_reps[f] for p in curve])
        ref = float(interpolate_at(g_pts, v_pts, np.array([arm.gain]))[0])
        ref_reps = interpolate_at(g_reps, v_reps, arm.gain_reps)
        cols[f"ref_{f}"] = ref
        cols[f"excess_{f}"] = arm.forgetting[f] - ref
        in_range = float(np.mean(np.isfinite(ref_reps)))
        # a CI over the replicates that happen to fall on the curve would be conditional on
        # that: given only when (nearly) all do
        lo, hi = (percentile_ci(f_reps - ref_reps, conf) if in_range >= MATCHED_MIN_IN_RANGE
                  else (math.nan, math.nan))
        cols[f"excess_{f}_lo"], cols[f"excess_{f}_hi"] = lo, hi
    if cols:
        cols["matched_in_range"] = in_range
    return cols


def baseline_columns(arm: PointStats, base: PointStats, name: str, conf: float
                     ) -> dict[str, Any]:
    """``vs_<name>_<f>`` (+ CI): the arm's task gain and forgettings minus the baseline arm's,
    replicate by replicate (both drawn with the same item and seed resamples: a paired
    difference between arms)."""
    cols: dict[str, Any] = {}
    pairs = [("task_gain", arm.gain, arm.gain_reps, base.gain, base.gain_reps)]
    pairs += [(f, arm.forgetting[f], r, base.forgetting[f], base.forgetting_reps[f])
              for f, r in arm.forgetting_reps.items() if f in base.forgetting_reps]
    for f, v, r, bv, br in pairs:
        if r is None or br is None or len(r) != len(br):
            continue
        cols[f"vs_{name}_{f}"] = v - bv
        cols[f"vs_{name}_{f}_lo"], cols[f"vs_{name}_{f}_hi"] = percentile_ci(r - br, conf)
    return cols


# ----------------------------------------------------------------------------- tables

def _unpaired(s: dict[str, Any], row: dict[str, Any], scores_after: dict[str, Any]) -> None:
    before = s["before"]
    rel, ret = [], []
    first_task = None
    for role in ("task", "general"):
        for name, b in before.get(role, {}).items():
            hib = bool(b.get("higher_is_better", True))
            vb, va = _value(before[role], name), _value(scores_after.get(role, {}), name)
            row[f"{name}_before"], row[f"{name}_after"] = vb, va
            row[f"{name}_delta"] = va - vb
            if role == "task" and first_task is None:
                first_task = (vb, va, hib)
            if role == "general":
                d = -(va - vb if hib else vb - va)
                rel.append(d / abs(vb) if vb else math.nan)
                ret.append(retention_ratio(vb, va, hib))
    row["task_gain"] = task_gain(*first_task) if first_task else math.nan
    row["mean_rel_forgetting"] = sum(rel) / len(rel) if rel else math.nan
    row["retention_ratio"] = sum(ret) / len(ret) if ret else math.nan


def summary_row(s: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The unpaired part of one CSV row (and the metric metadata) from a run's summary.json."""
    row: dict[str, Any] = {"arm": s["arm"], "seed": s["seed"], "status": s["status"]}
    for k, v in (s.get("grid") or {}).items():
        row[f"grid:{k}"] = v
    if s.get("warnings"):  # e.g. a collapsed training: shown beside its numbers, not hidden
        row["warnings"] = "; ".join(s["warnings"])
    if s["status"] != "ok":
        row["error"] = s.get("error", "")
        return row, {}
    _unpaired(s, row, s["after"])
    tr = s.get("train", {})
    row["train_time_s"] = tr.get("train_time_s")
    row["tokens"] = tr.get("tokens")
    row["target_tokens"] = tr.get("target_tokens")
    row["steps"] = tr.get("steps")
    row["memory_estimate_bytes"] = (tr.get("memory_estimate") or {}).get("total_bytes")
    row["peak_memory_bytes"] = (tr.get("memory") or {}).get("peak_bytes")
    return row, metric_meta(s)


def load_runs(root: Path) -> list[RunRecord]:
    runs = [load_run(p.parent) for p in sorted(Path(root).glob(f"*/seed-*/{SUMMARY}"))]
    runs.sort(key=lambda r: (r.arm, r.seed))
    return runs


@dataclass
class Tables:
    rows: list[dict[str, Any]]
    agg: list[dict[str, Any]]
    points: list[dict[str, Any]]
    points_agg: list[dict[str, Any]]
    meta: dict[str, dict[str, Any]]


def _point_scores(s: dict[str, Any], point: str) -> dict[str, Any]:
    return _points(s["after"]).get(point, {})


def build_tables(root: Path, analysis: Any = None) -> Tables:
    """Every table of a results tree (see the module docstring)."""
    analysis = load_analysis(root, analysis)
    runs = load_runs(root)
    rs = Resampler(analysis.n_boot, analysis.boot_seed)
    meta: dict[str, dict[str, Any]] = {}
    rows, points = [], []
    stats: dict[tuple[str, str], list[tuple[int, PointStats]]] = {}
    for r in runs:
        row, m = summary_row(r.summary)
        meta.update(m)
        rows.append(row)
        if r.summary["status"] != "ok":
            continue
        for point in _points(r.summary["after"]):
            prow: dict[str, Any] = {"arm": r.arm, "seed": r.seed, "point": point}
            _unpaired(r.summary, prow, _point_scores(r.summary, point))
            for h in analysis.headline:  # (the paired statistics below give the same point)
                if f"{h}_delta" in prow and h in m:
                    d = prow[f"{h}_delta"]
                    prow[f"{h}_forgetting"] = -d if m[h]["higher_is_better"] else d
            if r.before_items and point in r.after_items:
                ps = point_stats(r.before_items, [r.after_items[point]], [r.seed], m,
                                 analysis, rs)
                prow.update(ps.columns)
                stats.setdefault((r.arm, point), []).append((r.seed, ps))
            points.append(prow)
            if point == FINAL:
                row.update({k: v for k, v in prow.items() if k not in ("arm", "seed", "point")})
    agg, points_agg = _aggregate(runs, rows, points, meta, analysis, rs)
    return Tables(rows, agg, points, points_agg, meta)


def _seed_mean_ci(rs_rows: list[dict[str, Any]], skip: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k in [k for k in rs_rows[0] if k not in skip]:
        vals = [r.get(k) for r in rs_rows]
        if k.startswith("grid:"):
            out[k] = vals[0]
        elif k.endswith(_PER_RUN_ONLY) and (len(rs_rows) > 1 or not k.endswith("_mcnemar_p")):
            continue  # (one seed: its McNemar p is the arm's)
        elif all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals):
            out[f"{k}_mean"], out[f"{k}_ci95"] = mean_ci([float(v) for v in vals])
    return out


def _aggregate(runs: list[RunRecord], rows: list[dict[str, Any]], points: list[dict[str, Any]],
               meta: dict[str, dict[str, Any]], analysis: Any, rs: Resampler
               ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Per arm (and per arm x point): mean and t-CI over seeds of every per-run column, plus
    the crossed seeds x items bootstrap CIs of the paired measures and the matched-gain columns."""
    ok = [r for r in runs if r.summary["status"] == "ok"]
    by_arm: dict[str, list[RunRecord]] = {}
    for r in ok:
        by_arm.setdefault(r.arm, []).append(r)
    crossed: dict[tuple[str, str], PointStats] = {}
    points_agg = []
    for arm, rr in by_arm.items():
        pts = list(_points(rr[0].summary["after"]))
        for point in pts:
            prs = [p for p in points if p["arm"] == arm and p["point"] == point]
            if len(prs) != len(rr):
                continue
            a: dict[str, Any] = {"arm": arm, "point": point, "n_seeds": len(rr)}
            a.update(_seed_mean_ci(prs, ("arm", "seed", "point")))
            have = all(r.before_items and point in r.after_items for r in rr)
            if have:
                ps = point_stats(rr[0].before_items, [r.after_items[point] for r in rr],
                                 [r.seed for r in rr], meta, analysis, rs)
                crossed[(arm, point)] = ps
                a.update({k: v for k, v in ps.columns.items() if k.endswith(("_lo", "_hi", "_n"))})
                # the point of a paired column is the crossed statistic's (the CI's own point;
                # the mean of per-run values differs where a run lacks a metric's items)
                a.update({f"{k}_mean": v for k, v in ps.columns.items()
                          if not k.endswith(("_lo", "_hi", "_n", "_lost", "_gained",
                                             "_mcnemar_p"))})
            points_agg.append(a)
    ref = analysis.reference_arm
    curve: list[PointStats] = []
    if ref and ref in by_arm:
        # the curve from the base (α 0) to the final model (α 1): alphas outside (0, 1) are
        # extrapolations, not points of it
        wise = sorted((p for (arm, p) in crossed if arm == ref and p.startswith("wise:")
                       and 0.0 < float(p.split(":", 1)[1]) < 1.0),
                      key=lambda p: float(p.split(":", 1)[1]))
        if (ref, FINAL) in crossed:
            curve = [crossed[(ref, p)] for p in wise] + [crossed[(ref, FINAL)]]
    base_arm = analysis.baseline_arm
    for a in points_agg:
        key = (a["arm"], a["point"])
        on_curve = a["arm"] == ref and not a["point"].startswith("merge:")  # the curve itself
        if curve and key in crossed and not on_curve:
            a.update(matched_columns(crossed[key], curve, analysis.confidence))
        if base_arm and (base_arm, FINAL) in crossed and key in crossed and a["arm"] != base_arm:
            a.update(baseline_columns(crossed[key], crossed[(base_arm, FINAL)], base_arm,
                                      analysis.confidence))
    agg = []
    for arm in by_arm:
        run_rows = [r for r in rows if r["arm"] == arm and r.get("status") == "ok"]
        a = {"arm": arm, "n_seeds": len(run_rows)}
        a.update(_seed_mean_ci(run_rows, ("arm", "seed", "status")))
        final = next((p for p in points_agg if p["arm"] == arm and p["point"] == FINAL), {})
        a.update({k: v for k, v in final.items() if k.endswith(("_lo", "_hi", "_n", "_mean"))
                  or k.startswith(("ref_", "excess_", "vs_")) or k == "matched_in_range"})
        agg.append(a)
    return agg, points_agg


def columns_doc(tables: Tables) -> dict[str, Any]:
    """columns.json: ``{"metrics": {name: role, direction, unit...}, "columns": {...}}``."""
    return {"metrics": tables.meta, "columns": COLUMN_DOCS}


def collect(root: Path, analysis: Any = None
            ) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """(summary.csv rows, metric metadata)."""
    t = build_tables(root, analysis)
    return t.rows, t.meta


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm from summary rows alone: n and, for every numeric per-run column, the mean and
    95 % t-interval half-width over seeds (no paired columns: those need the items)."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if r.get("status") == "ok":
            arms.setdefault(r["arm"], []).append(r)
    out = []
    for arm, rs_rows in arms.items():
        a = {"arm": arm, "n_seeds": len(rs_rows)}
        a.update(_seed_mean_ci(rs_rows, ("arm", "seed", "status")))
        out.append(a)
    return out


def write_tables(root: Path, analysis: Any = None) -> Tables | None:
    """Write summary.csv, summary_agg.csv, points.csv, points_agg.csv and columns.json."""
    import pandas as pd

    t = build_tables(root, analysis)
    if not t.rows:
        return None
    root = Path(root)
    write_text(root / "summary.csv", pd.DataFrame(t.rows).to_csv(index=False))
    if t.agg:
        write_text(root / "summary_agg.csv", pd.DataFrame(t.agg).to_csv(index=False))
    if t.points:
        write_text(root / "points.csv", pd.DataFrame(t.points).to_csv(index=False))
    if t.points_agg:
        write_text(root / "points_agg.csv", pd.DataFrame(t.points_agg).to_csv(index=False))
    write_json(root / "columns.json", columns_doc(t))
    return t
