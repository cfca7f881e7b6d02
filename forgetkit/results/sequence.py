"""Continual-learning measures of a task sequence: pure functions of the accuracy matrix.

``R[i][j]`` is the score on task ``j`` after training stage ``i`` (stages and tasks in the same
order, ``T`` of each: stage ``i`` trains on task ``i``); ``base[j]`` is the base model's score on
task ``j`` (before any stage). Each task declares its direction (``higher_is_better``); every
measure is written in *improvement* units, ``s_j * score`` with ``s_j = +1`` when higher is better
and ``-1`` when lower is better (NLL), so the signs mean the same for every metric:

* :func:`final_average` -- ``mean_j R[T-1][j]`` (the raw scores after the last stage).
* :func:`learning_accuracy` -- ``mean_j R[j][j]``: each task just after it was trained (Riemer et
  al. 2019).
* :func:`task_forgetting` -- per task ``j < T-1``: ``max_{j <= l <= T-2} s_j R[l][j] - s_j R[T-1][j]``,
  the best value it had from when it was trained up to the stage before last, minus its final
  value (Chaudhry et al. 2018, restricted to the stages after the task was learned); positive =
  forgot. The last task has no forgetting (nothing came after it).
* :func:`bwt` -- backward transfer ``1/(T-1) sum_{j<T-1} s_j (R[T-1][j] - R[j][j])`` (Lopez-Paz
  & Ranzato 2017); negative = later stages undid earlier learning.
* :func:`fwt` -- forward transfer ``1/(T-1) sum_{j>=1} s_j (R[j-1][j] - base[j])``: what
  training on the earlier tasks did to task ``j`` before it was trained, against the base model;
  positive = the earlier stages helped.

NaN in, NaN out; a sequence of one stage has no BWT, FWT or forgetting (NaN / empty).

Files (written by the runner, read by the report): :func:`sequence_record` is the content of
``<root>/<arm>/seed-<s>/sequence.json``; :func:`write_sequence_tables` writes the long-form
``sequence_matrix.csv`` and ``sequence_summary.csv`` at the results root from every
``sequence.json`` there. The stage runs themselves (``<arm>/seed-<s>/stage-<k>-<name>/``) are
not rows of the single-run tables (``summary.csv`` reads ``<arm>/seed-<s>/summary.json`` only):
a stage's "before" is the previous stage, so its before/after columns would mean something
else than a run's.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["final_average", "learning_accuracy", "task_forgetting", "bwt", "fwt",
           "sequence_record", "matrix_rows", "summary_row", "write_sequence_tables",
           "SEQUENCE_FILE", "MATRIX_CSV", "SUMMARY_CSV", "AGG_CSV", "GENERAL_CSV"]

SEQUENCE_FILE = "sequence.json"
MATRIX_CSV = "sequence_matrix.csv"
SUMMARY_CSV = "sequence_summary.csv"

Matrix = Sequence[Sequence[float]]


def _check(r: Matrix, hib: Sequence[bool]) -> int:
    t = len(r)
    if t == 0:
        raise ValueError("the accuracy matrix is empty")
    for i, row in enumerate(r):
        if len(row) != t:
            raise ValueError(f"R must be T x T (stage i trains task i): row {i} has {len(row)} "
                             f"scores for {t} stages")
    if len(hib) != t:
        raise ValueError(f"{len(hib)} higher_is_better flags for {t} tasks")
    return t


def _s(h: bool) -> float:
    return 1.0 if h else -1.0


def final_average(r: Matrix, hib: Sequence[bool]) -> float:
    t = _check(r, hib)
    return math.fsum(float(v) for v in r[t - 1]) / t


def learning_accuracy(r: Matrix, hib: Sequence[bool]) -> float:
    t = _check(r, hib)
    return math.fsum(float(r[j][j]) for j in range(t)) / t


def task_forgetting(r: Matrix, hib: Sequence[bool]) -> list[float]:
    """Forgetting of each task but the last, in improvement units (positive = forgot)."""
    t = _check(r, hib)
    out = []
    for j in range(t - 1):
        s = _s(hib[j])
        window = [s * float(r[k][j]) for k in range(j, t - 1)]
        if any(math.isnan(v) for v in window):  # max() would skip or keep a NaN by position
            out.append(math.nan)
            continue
        out.append(max(window) - s * float(r[t - 1][j]))
    return out


def bwt(r: Matrix, hib: Sequence[bool]) -> float:
    t = _check(r, hib)
    if t < 2:
        return math.nan
    return math.fsum(_s(hib[j]) * (float(r[t - 1][j]) - float(r[j][j]))
                     for j in range(t - 1)) / (t - 1)


def fwt(r: Matrix, hib: Sequence[bool], base: Sequence[float]) -> float:
    t = _check(r, hib)
    if len(base) != t:
        raise ValueError(f"{len(base)} base scores for {t} tasks")
    if t < 2:
        return math.nan
    return math.fsum(_s(hib[j]) * (float(r[j - 1][j]) - float(base[j]))
                     for j in range(1, t)) / (t - 1)


# ----------------------------------------------------------------------------- files

def _score(scores: dict[str, Any], group: str, name: str) -> tuple[float, bool | None]:
    """(value, higher_is_better) of one metric of an evaluation tree (NaN when absent)."""
    entry = (scores.get(group) or {}).get(name) or {}
    v = entry.get("value")
    return (float(v) if v is not None else math.nan), entry.get("higher_is_better")


def sequence_record(stages: Sequence[str], metrics: Sequence[str], base: dict[str, Any],
                    after: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The content of a sequence's ``sequence.json``.

    Args:
        stages: the stage names, in order (``T`` of them).
        metrics: the ``evaluation.task`` metric that scores each stage's task.
        base: the base model's evaluation tree (``{"task": {name: {"value", ...}}, "general":
            ...}``: stage 0's ``eval_before.json``).
        after: each stage's ``eval_after.json`` tree, in stage order.

    Returns:
        ``{stages, metrics, higher_is_better, base, R, general, final_average,
        learning_accuracy, bwt, fwt, task_forgetting}`` with ``R[i][j]`` the score of stage
        ``j``'s metric after stage ``i``, ``base[j]`` the base model's, and ``general[m] =
        [base, after stage 0, ..., after stage T-1]`` for every general metric.

    Raises:
        ValueError: lengths disagree, or a metric has no ``higher_is_better`` anywhere.
    """
    t = len(stages)
    if len(metrics) != t or len(after) != t:
        raise ValueError(f"{t} stages, {len(metrics)} metrics, {len(after)} evaluations")
    hib: list[bool] = []
    for m in metrics:
        flags = [_score(x, "task", m)[1] for x in [base, *after]]
        known = {f for f in flags if f is not None}
        if len(known) != 1:
            raise ValueError(f"metric {m!r}: higher_is_better is {sorted(known) or 'unknown'} "
                             "across the stages' evaluations")
        hib.append(known.pop())
    r = [[_score(a, "task", m)[0] for m in metrics] for a in after]
    b = [_score(base, "task", m)[0] for m in metrics]
    names = list(base.get("general") or {})
    for a in after:
        names += [n for n in (a.get("general") or {}) if n not in names]
    general = {n: [_score(x, "general", n)[0] for x in [base, *after]] for n in names}
    return {"stages": list(stages), "metrics": list(metrics), "higher_is_better": hib,
            "base": b, "R": r, "general": general,
            "final_average": final_average(r, hib), "learning_accuracy": learning_accuracy(r, hib),
            "bwt": bwt(r, hib), "fwt": fwt(r, hib, b), "task_forgetting": task_forgetting(r, hib)}


MATRIX_COLUMNS = ("arm", "seed", "stage_index", "stage", "task", "metric", "value")
SUMMARY_COLUMNS = ("arm", "seed", "final_average", "learning_accuracy", "bwt", "fwt")


def matrix_rows(arm: str, seed: int, rec: dict[str, Any]) -> list[dict[str, Any]]:
    """Long-form rows of one sequence's matrix: the base model's scores (``stage_index`` -1,
    ``stage`` ``base``), then ``R`` row by row (``task`` = the stage whose metric it is)."""
    out = []
    for j, (task, m) in enumerate(zip(rec["stages"], rec["metrics"], strict=True)):
        out.append({"arm": arm, "seed": seed, "stage_index": -1, "stage": "base", "task": task,
                    "metric": m, "value": rec["base"][j]})
    for i, row in enumerate(rec["R"]):
        for j, v in enumerate(row):
            out.append({"arm": arm, "seed": seed, "stage_index": i, "stage": rec["stages"][i],
                        "task": rec["stages"][j], "metric": rec["metrics"][j], "value": v})
    return out


def summary_row(arm: str, seed: int, rec: dict[str, Any]) -> dict[str, Any]:
    return {"arm": arm, "seed": seed, **{k: rec[k] for k in SUMMARY_COLUMNS[2:]}}


def _csv(rows: list[dict[str, Any]], cols: Sequence[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(cols), lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                        repr(v) if isinstance(v, float) else v) for k, v in r.items()})
    return buf.getvalue()


AGG_CSV = "sequence_agg.csv"
GENERAL_CSV = "sequence_general.csv"
GENERAL_COLUMNS = ("arm", "stage_index", "stage", "metric", "value", "delta", "delta_lo",
                   "delta_hi")


def _union(rows: list[dict[str, Any]], lead: Sequence[str]) -> list[str]:
    cols = list(lead)
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def write_sequence_tables(root: Path, analysis: Any = None) -> int:
    """The sequence tables at ``root`` from every ``<arm>/seed-<s>/sequence.json`` (sorted by
    arm, then seed): ``sequence_matrix.csv`` (R long form), ``sequence_summary.csv`` (one row
    per sequence: the measures with their paired item-bootstrap CIs and ``vs_<baseline>_*``),
    ``sequence_agg.csv`` (one row per arm: mean over seeds, crossed seeds x items CIs) and
    ``sequence_general.csv`` (each general metric after each stage, its change from the base
    model with a paired CI); :mod:`forgetkit.results.sequence_stats`, with the settings of
    ``analysis`` (default: the root's ``analysis.json``). Returns the number of sequences; when
    there is none, the tables are removed (they were derived from sequence files that are gone,
    e.g. a sequence being recomputed)."""
    from forgetkit.results import read_json, write_text
    from forgetkit.results.sequence_stats import sequence_stats
    from forgetkit.results.summary import load_analysis

    root = Path(root)
    found = []
    for p in root.glob(f"*/seed-*/{SEQUENCE_FILE}"):
        try:
            seed = int(p.parent.name.removeprefix("seed-"))
        except ValueError:
            continue
        found.append((p.parent.parent.name, seed, p))
    found.sort(key=lambda x: (x[0], x[1]))
    if not found:
        for name in (MATRIX_CSV, SUMMARY_CSV, AGG_CSV, GENERAL_CSV):
            (root / name).unlink(missing_ok=True)
        return 0
    matrix, recs = [], []
    for arm, seed, p in found:
        rec = read_json(p)
        rec = {k: (math.nan if v is None else v) if not isinstance(v, (list, dict)) else v
               for k, v in rec.items()}  # JSON null is a NaN measure
        rec["base"] = [math.nan if v is None else v for v in rec["base"]]
        rec["R"] = [[math.nan if v is None else v for v in row] for row in rec["R"]]
        rec["general"] = {g: [math.nan if v is None else v for v in vals]
                          for g, vals in (rec.get("general") or {}).items()}
        matrix += matrix_rows(arm, seed, rec)
        recs.append((arm, seed, p.parent, rec))
    per_seed, per_arm, general = sequence_stats(recs, load_analysis(root, analysis))
    write_text(root / MATRIX_CSV, _csv(matrix, MATRIX_COLUMNS))
    write_text(root / SUMMARY_CSV, _csv(per_seed, _union(per_seed, SUMMARY_COLUMNS)))
    write_text(root / AGG_CSV, _csv(per_arm, _union(per_arm, ("arm", "n_seeds",
                                                               *SUMMARY_COLUMNS[2:]))))
    write_text(root / GENERAL_CSV, _csv(general, GENERAL_COLUMNS))
    return len(found)
