"""Confidence intervals of a task sequence's measures, from the per-item scores of its stages.

Every stage of a sequence is scored on the same items (``forgetkit.runner``: a fixed evaluation
seed), and each evaluation record keeps each item's score (``items``). So the matrix measures
(:mod:`forgetkit.results.sequence`: final average, learning accuracy, BWT, FWT, per-task
forgetting) get the paired statistics of :mod:`forgetkit.results.stats`:

* **One sequence (arm x seed):** a paired bootstrap over items. Replicate ``b`` resamples the
  items of each task ``j`` with replacement -- the *same* resample for the base model and for
  every stage's model, so ``R[i][j]`` and ``base[j]`` move together -- recomputes every entry of
  ``R`` and ``base`` (a ratio metric: ratio of sums), and applies the measure's own function to
  that matrix. The CI is the percentile interval of the replicates.
* **Several seeds:** the crossed seeds x items bootstrap of
  :func:`forgetkit.results.stats.delta_replicates` (items shared by all seeds, one item resample
  for all of them; the seed deviation scaled by :func:`forgetkit.results.stats.seed_scale`).
* **Against the baseline arm** (``analysis.baseline_arm``, default ``naive``): ``vs_<b>_<m>`` =
  the arm's measure minus the baseline's, on the same item resamples and seeds (paired), over
  the seeds both have.
* **The general suite per stage:** the change of each general metric from the base model to
  after each stage, :func:`forgetkit.results.stats.paired_delta` (as the single-run tables).

The item resample of a metric depends only on (``analysis.boot_seed``, the metric's name, its
number of items) (:class:`forgetkit.results.stats.Resampler`), so every arm, seed and stage of
one experiment is resampled with the same items. A sequence without per-item scores gets no CI
(empty cells), never an approximate one.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from forgetkit.results.stats import (
    Resampler,
    align,
    item_scores,
    paired_delta,
    percentile_ci,
    seed_scale,
    statistic,
)

__all__ = ["MEASURES", "measures_of", "SequenceItems", "load_sequence_items",
           "measure_replicates", "sequence_stats"]

log = logging.getLogger("forgetkit")

MEASURES = ("final_average", "learning_accuracy", "bwt", "fwt")


def measures_of(r: Sequence[Sequence[float]], hib: Sequence[bool], base: Sequence[float],
                stages: Sequence[str]) -> dict[str, float]:
    """Every measure of one matrix: :data:`MEASURES` and ``forgetting_<stage>`` for each stage
    but the last (:func:`forgetkit.results.sequence.task_forgetting`)."""
    from forgetkit.results.sequence import (
        bwt,
        final_average,
        fwt,
        learning_accuracy,
        task_forgetting,
    )

    out = {"final_average": final_average(r, hib), "learning_accuracy": learning_accuracy(r, hib),
           "bwt": bwt(r, hib), "fwt": fwt(r, hib, base)}
    for name, v in zip(stages, task_forgetting(r, hib), strict=False):
        out[f"forgetting_{name}"] = v
    return out


class SequenceItems:
    """The per-item scores of one finished sequence: ``base[j]`` and ``after[i][j]`` (stage
    ``i``, task ``j``) as aligned :class:`forgetkit.results.stats.ItemScores`, plus the general
    metrics' ``general[g] = (base, [after stage 0, ...])``; ``None`` where items are missing."""

    def __init__(self, rec: dict[str, Any], before: dict[str, Any],
                 afters: Sequence[dict[str, Any]]) -> None:
        self.rec = rec
        self.metrics: list[str] = list(rec["metrics"])
        self.base: list[Any] = []
        self.after: list[list[Any]] = [[] for _ in afters]
        for m in self.metrics:
            b = _items(before, "task", m)
            self.base.append(b)
            for i, a in enumerate(afters):
                ai = _items(a, "task", m)
                self.after[i].append(None if b is None or ai is None else align(b, ai))
        self.general: dict[str, tuple[Any, list[Any]]] = {}
        for g in rec.get("general") or {}:
            b = _items(before, "general", g)
            self.general[g] = (b, [None if b is None else _opt_align(b, _items(a, "general", g))
                                   for a in afters])

    @property
    def complete(self) -> bool:
        return all(b is not None for b in self.base) and all(
            a is not None for row in self.after for a in row)


def _items(tree: dict[str, Any], section: str, name: str) -> Any:
    rec = (tree.get(section) or {}).get(name) or {}
    return item_scores(rec["items"]) if rec.get("items") else None


def _opt_align(b: Any, a: Any) -> Any:
    return None if a is None else align(b, a)


def load_sequence_items(seq_dir: Path, rec: dict[str, Any]) -> SequenceItems:
    """The items of the sequence whose ``sequence.json`` (``rec``) is in ``seq_dir``: stage 0's
    ``eval_before.json`` (the base model) and every stage's ``eval_after.json``, located by the
    record's ``dirs`` (relative to ``seq_dir``); without them, no item has a score (no CI)."""
    from forgetkit.results import read_json

    dirs = [seq_dir / d for d in rec.get("dirs") or []]
    files = [dirs[0] / "eval_before.json", *(d / "eval_after.json" for d in dirs)] if dirs else []
    if len(dirs) != len(rec["stages"]) or not all(f.is_file() for f in files):
        # stage folders not kept (a copied summary): the measures without CIs
        return SequenceItems(rec, {}, [{} for _ in rec["stages"]])
    return SequenceItems(rec, read_json(files[0]), [read_json(f) for f in files[1:]])


def measure_replicates(si: SequenceItems, rs: Resampler) -> dict[str, np.ndarray] | None:
    """``{measure: (n_boot,) replicates}`` of one sequence (module docstring); None without
    complete per-item scores."""
    if not si.complete:
        return None
    t = len(si.metrics)
    hib = si.rec["higher_is_better"]
    stages = si.rec["stages"]
    base_rep, r_rep = [], [[None] * t for _ in range(t)]
    for j, m in enumerate(si.metrics):
        idx = rs.items(m, si.base[j].n)
        base_rep.append(statistic(si.base[j], idx))
        for i in range(t):
            r_rep[i][j] = statistic(si.after[i][j], idx)
    out: dict[str, list[float]] = {}
    for b in range(rs.n_boot):
        r = [[float(r_rep[i][j][b]) for j in range(t)] for i in range(t)]
        for k, v in measures_of(r, hib, [float(x[b]) for x in base_rep], stages).items():
            out.setdefault(k, []).append(v)
    return {k: np.asarray(v, dtype=np.float64) for k, v in out.items()}


def _crossed(points: Sequence[float], reps: Sequence[np.ndarray] | None, seeds: Sequence[int],
             rs: Resampler, conf: float) -> tuple[float, float, float]:
    """(mean over seeds, lo, hi): the crossed seeds x items interval (one seed: the items'
    percentile interval); no CI when a seed has no replicates."""
    point = float(np.mean(points))
    if reps is None:
        return point, math.nan, math.nan
    a = np.stack(reps)  # (S, B): the same item resample in every row
    items_part = a.mean(axis=0)
    if len(reps) == 1:
        return (point, *percentile_ci(items_part, conf))
    sidx = rs.seeds(seeds)
    resampled = np.take_along_axis(a.T, sidx, axis=1).mean(axis=1)
    lo, hi = percentile_ci(items_part + seed_scale(len(reps), conf) * (resampled - items_part),
                           conf)
    return point, lo, hi


def _columns(prefix: str, point: float, lo: float, hi: float) -> dict[str, float]:
    return {prefix: point, f"{prefix}_lo": lo, f"{prefix}_hi": hi}


def sequence_stats(found: Sequence[tuple[str, int, Path, dict[str, Any]]], analysis: Any
                   ) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[dict[str, Any]]]:
    """(per-sequence rows, per-arm rows, general-suite rows) of the sequences ``found`` (``(arm,
    seed, seq_dir, sequence.json record)``), with the CIs of the module docstring at
    ``analysis.confidence``, ``analysis.n_boot`` replicates from ``analysis.boot_seed``."""
    rs = Resampler(analysis.n_boot, analysis.boot_seed)
    conf = analysis.confidence
    items = {(arm, seed): load_sequence_items(d, rec) for arm, seed, d, rec in found}
    _pair_by_id(items)
    reps = {k: measure_replicates(si, rs) for k, si in items.items()}
    points = {k: measures_of(si.rec["R"], si.rec["higher_is_better"], si.rec["base"],
                             si.rec["stages"]) for k, si in items.items()}
    arms = list(dict.fromkeys(arm for arm, _, _, _ in found))
    seeds_of = {a: sorted(s for arm, s, _, _ in found if arm == a) for a in arms}
    base_arm = analysis.baseline_arm

    def block(arm: str, seeds: list[int]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        keys = list(points[(arm, seeds[0])])
        for m in keys:
            rr = [reps[(arm, s)] for s in seeds]
            row.update(_columns(m, *_crossed(
                [points[(arm, s)][m] for s in seeds],
                None if any(r is None for r in rr) else [r[m] for r in rr], seeds, rs, conf)))
        common = [s for s in seeds if s in seeds_of.get(base_arm, [])]
        if arm != base_arm and common:
            for m in keys:
                if m not in points[(base_arm, common[0])]:
                    continue
                ra = [reps[(arm, s)] for s in common]
                rb = [reps[(base_arm, s)] for s in common]
                diff = (None if any(r is None for r in ra + rb)
                        else [x[m] - y[m] for x, y in zip(ra, rb, strict=True)])
                row.update(_columns(f"vs_{base_arm}_{m}", *_crossed(
                    [points[(arm, s)][m] - points[(base_arm, s)][m] for s in common], diff,
                    common, rs, conf)))
        return row

    per_seed = [{"arm": arm, "seed": seed, **block(arm, [seed])} for arm, seed, _, _ in found]
    per_arm = [{"arm": a, "n_seeds": len(seeds_of[a]), **block(a, seeds_of[a])} for a in arms]
    general: list[dict[str, Any]] = []
    for a in arms:
        sis = [items[(a, s)] for s in seeds_of[a]]
        rec0 = sis[0].rec
        for g in rec0.get("general") or {}:
            if any(g not in (si.rec.get("general") or {}) for si in sis):
                log.warning("sequence tables: %s: general metric %s is missing from some of "
                            "its sequences; not tabulated", a, g)
                continue
            general.append({"arm": a, "stage_index": -1, "stage": "base", "metric": g,
                            "value": _nanmean([si.rec["general"][g][0] for si in sis]),
                            "delta": 0.0, "delta_lo": math.nan, "delta_hi": math.nan})
            for i, stage in enumerate(rec0["stages"]):
                row = {"arm": a, "stage_index": i, "stage": stage, "metric": g,
                       "value": _nanmean([si.rec["general"][g][i + 1] for si in sis]),
                       "delta": _nanmean([si.rec["general"][g][i + 1] - si.rec["general"][g][0]
                                          for si in sis]),
                       "delta_lo": math.nan, "delta_hi": math.nan}
                b = sis[0].general.get(g, (None, []))[0]
                afters = [si.general.get(g, (None, []))[1] for si in sis]
                if b is not None and all(x and x[i] is not None for x in afters):
                    pd = paired_delta(_record(b), [_record(x[i]) for x in afters], rs, g,
                                      seeds=seeds_of[a], confidence=conf)
                    row.update(delta=pd["delta"], delta_lo=pd["lo"], delta_hi=pd["hi"])
                general.append(row)
    return per_seed, per_arm, general


def _pair_by_id(items: dict[tuple[str, int], SequenceItems]) -> None:
    """Pair every sequence's items with the first complete one's, task by task, *by item id*
    (in place: each sequence's scores reordered to the reference's item order), so that one
    resample of positions picks the same items in every arm and seed. A sequence scored on
    another item set than the reference gets no per-item scores (its measures have no CI; a
    warning says so) rather than a comparison of different items."""
    ref: dict[str, Any] = {}
    for si in items.values():
        if si.complete:
            for m, b in zip(si.metrics, si.base, strict=True):
                ref.setdefault(m, b)
    for (arm, seed), si in items.items():
        if not si.complete:
            continue
        if any(set(ref[m].ids) != set(b.ids) for m, b in zip(si.metrics, si.base, strict=True)):
            log.warning("sequence tables: %s seed %d was scored on other items than the other "
                        "sequences (an evaluation override?); its measures get no CI and it is "
                        "not paired", arm, seed)
            si.base = [None for _ in si.base]
            continue
        si.base = [align(ref[m], b) for m, b in zip(si.metrics, si.base, strict=True)]
        si.after = [[align(ref[m], a) for m, a in zip(si.metrics, row, strict=True)]
                    for row in si.after]


def _nanmean(v: Sequence[float]) -> float:
    x = [float(u) for u in v if u is not None and not math.isnan(float(u))]
    return math.fsum(x) / len(x) if x else math.nan


def _record(s: Any) -> dict[str, Any]:
    """An :class:`ItemScores` back as an ``items`` record (for :func:`paired_delta`)."""
    rec: dict[str, Any] = {"stat": "mean" if s.count is None else "ratio", "id": list(s.ids),
                           "score": s.score.tolist()}
    if s.count is not None:
        rec["count"] = s.count.tolist()
    return rec
