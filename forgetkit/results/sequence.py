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
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["final_average", "learning_accuracy", "task_forgetting", "bwt", "fwt"]

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
        best = max(s * float(r[k][j]) for k in range(j, t - 1))
        out.append(best - s * float(r[t - 1][j]))
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
