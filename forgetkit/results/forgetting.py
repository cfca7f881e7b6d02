"""Forgetting and learning measures: pure functions of before/after scores (no I/O).

Conventions (every function takes the metric's direction ``higher_is_better``):

* :func:`delta` -- the signed *improvement* after fine-tuning, in the metric's own unit:
  ``after - before`` when higher is better, ``before - after`` when lower is better (NLL,
  perplexity). Positive = the model got better.
* :func:`task_gain` -- :func:`delta` of a metric of the fine-tuning task (positive = learned).
* :func:`forgetting` -- the *drop* on a general benchmark, ``-delta`` (positive = forgot,
  negative = backward transfer / improvement).
* :func:`retention_ratio` -- the fraction of the before-score kept, unit-free: ``after / before``
  when higher is better, ``before / after`` when lower is better; 1 = nothing lost, < 1 = forgot,
  > 1 = improved. Meant for positive metrics (accuracy, NLL, perplexity). With sequences it is the
  mean of the per-benchmark ratios.
* :func:`mean_ci` -- mean and t-distribution confidence half-width over seeds.

NaN in, NaN out: nothing is silently dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["delta", "task_gain", "forgetting", "retention_ratio", "mean_ci"]

# (A mean of drops across metrics adds nats to accuracy points; it is gone. The unit-free
# aggregate is std_forgetting, forgetkit.results.stats.)


def delta(before: float, after: float, higher_is_better: bool = True) -> float:
    """Signed improvement ``after - before`` (``before - after`` if lower is better); > 0 = better."""
    d = float(after) - float(before)
    return d if higher_is_better else -d


def task_gain(before: float, after: float, higher_is_better: bool = True) -> float:
    """Gain on the fine-tuning task, in the metric's unit; positive = learned."""
    return delta(before, after, higher_is_better)


def forgetting(before: float, after: float, higher_is_better: bool = True) -> float:
    """Drop on a general benchmark, in the metric's unit; positive = forgot (``-delta``)."""
    return -delta(before, after, higher_is_better)


def _ratio(before: float, after: float, higher_is_better: bool) -> float:
    num, den = (float(after), float(before)) if higher_is_better else (float(before), float(after))
    if den == 0.0 or math.isnan(den) or math.isnan(num):
        return math.nan
    return num / den


def retention_ratio(before: float | Sequence[float], after: float | Sequence[float],
                    higher_is_better: bool | Sequence[bool] = True) -> float:
    """Fraction of performance retained: ``after/before`` (higher better) or ``before/after``.

    Scalars give one benchmark's ratio; sequences (one entry per general benchmark, with one
    ``higher_is_better`` flag for all or one per benchmark) give the mean of the per-benchmark
    ratios. 1 = nothing lost, below 1 = forgot. NaN where a denominator is 0 or a score is NaN.
    """
    if isinstance(before, (int, float)) and isinstance(after, (int, float)):
        if not isinstance(higher_is_better, bool):
            raise TypeError("scalar scores need a single higher_is_better flag")
        return _ratio(before, after, higher_is_better)
    b, a = list(before), list(after)  # type: ignore[arg-type]
    if len(b) != len(a):
        raise ValueError(f"before has {len(b)} scores, after has {len(a)}")
    hib = ([higher_is_better] * len(b) if isinstance(higher_is_better, bool)
           else list(higher_is_better))
    if len(hib) != len(b):
        raise ValueError(f"{len(hib)} higher_is_better flags for {len(b)} scores")
    if not b:
        return math.nan
    return math.fsum(_ratio(x, y, h) for x, y, h in zip(b, a, hib, strict=True)) / len(b)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width) of a two-sided t confidence interval: ``t_{(1+c)/2, n-1} * s / sqrt(n)``.

    ``s`` is the sample standard deviation (ddof=1). One value gives a NaN half-width (no spread
    can be estimated); no values give (NaN, NaN).
    """
    from scipy.stats import t

    vals = [float(v) for v in values]
    n = len(vals)
    if n == 0:
        return math.nan, math.nan
    m = math.fsum(vals) / n
    if n == 1:
        return m, math.nan
    s = math.sqrt(math.fsum((v - m) ** 2 for v in vals) / (n - 1))
    return m, float(t.ppf((1.0 + confidence) / 2.0, n - 1)) * s / math.sqrt(n)
