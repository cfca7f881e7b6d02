"""Pure scoring functions: answer matching (exact match, token F1, ROUGE-L) and summary statistics.

Nothing here touches a model, a file or a random generator; the model-facing parts of the
metrics live in :mod:`forgetkit.eval.harness`.

Answer matching (all three: higher is better, in [0, 1]; with several references the best one
counts, as in SQuAD):

* :func:`exact_match` -- 1 when the SQuAD-normalised prediction equals the normalised
  reference (:func:`normalize_answer`: lowercase, punctuation removed, the articles a/an/the
  removed, whitespace collapsed).
* :func:`token_f1` -- SQuAD token F1: harmonic mean of precision and recall of the multiset of
  normalised whitespace tokens shared by prediction and reference (1 when both are empty).
* :func:`rouge_l` -- ROUGE-L F-measure: from the longest common subsequence of the tokens,
  with the tokenisation of Google's ``rouge_score`` package (lowercase, every run of characters
  other than ``a-z0-9`` is a separator, no stemming); equal to
  ``rouge_scorer.RougeScorer(["rougeL"]).score(reference, prediction)["rougeL"].fmeasure``.

Statistics: :func:`mean_stderr` (mean and standard error of the mean) and :func:`ratio_stderr`
(a token-weighted mean such as NLL per token, with its delta-method standard error over
documents).
"""

from __future__ import annotations

import math
import re
import string
from collections import Counter
from collections.abc import Sequence

__all__ = [
    "normalize_answer",
    "exact_match",
    "token_f1",
    "rouge_tokens",
    "lcs_length",
    "rouge_l",
    "mean_stderr",
    "ratio_stderr",
]

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize_answer(text: str) -> str:
    """SQuAD answer normalisation: lowercase, drop punctuation, drop a/an/the, collapse spaces."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _refs(reference: str | Sequence[str]) -> list[str]:
    refs = [reference] if isinstance(reference, str) else list(reference)
    if not refs:
        raise ValueError("at least one reference is needed")
    return refs


def exact_match(prediction: str, reference: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals a normalised reference, else 0.0 (higher better)."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(r) for r in _refs(reference)))


def _f1(pred_toks: list[str], ref_toks: list[str]) -> float:
    if not pred_toks or not ref_toks:
        return float(pred_toks == ref_toks)
    common = Counter(pred_toks) & Counter(ref_toks)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_toks)
    recall = same / len(ref_toks)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, reference: str | Sequence[str]) -> float:
    """SQuAD token-level F1 of normalised whitespace tokens, best over references (higher better)."""
    p = normalize_answer(prediction).split()
    return max(_f1(p, normalize_answer(r).split()) for r in _refs(reference))


def rouge_tokens(text: str) -> list[str]:
    """The tokens ROUGE is computed on (``rouge_score``'s default tokenizer, no stemming)."""
    return [t for t in _NON_ALNUM.sub(" ", text.lower()).split() if t]


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence of two token sequences (O(len(a)*len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def _rouge_l(pred: list[str], ref: list[str]) -> float:
    if not pred or not ref:
        return 0.0
    lcs = lcs_length(ref, pred)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(pred), lcs / len(ref)
    return 2 * precision * recall / (precision + recall)


def rouge_l(prediction: str, reference: str | Sequence[str]) -> float:
    """ROUGE-L F-measure (LCS-based), best over references (higher better; 0 if either empty)."""
    p = rouge_tokens(prediction)
    return max(_rouge_l(p, rouge_tokens(r)) for r in _refs(reference))


def mean_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean = sample std (ddof=1) / sqrt(n)); stderr None if n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, None
    m = math.fsum(values) / n
    if n < 2:
        return m, None
    var = math.fsum((v - m) ** 2 for v in values) / (n - 1)
    return m, math.sqrt(var / n)


def ratio_stderr(sums: Sequence[float], counts: Sequence[float]) -> tuple[float, float | None]:
    """A ratio of totals ``r = sum(sums) / sum(counts)`` and its delta-method standard error.

    Used for NLL per token: ``sums[i]`` is the summed NLL of document ``i`` and ``counts[i]`` its
    number of scored tokens, so ``r`` weights every token equally (the usual corpus perplexity).
    Documents are the sampling unit: with ``c̄`` the mean count,

        SE(r) = sqrt( sum_i (sums[i] - r * counts[i])**2 / (n (n - 1)) ) / c̄

    (the standard ratio-estimator variance). ``None`` when fewer than two documents.
    """
    n = len(sums)
    if n != len(counts):
        raise ValueError("sums and counts must have the same length")
    total = math.fsum(counts)
    if n == 0 or total <= 0:
        return math.nan, None
    r = math.fsum(sums) / total
    if n < 2:
        return r, None
    resid = math.fsum((s - r * c) ** 2 for s, c in zip(sums, counts, strict=True))
    return r, math.sqrt(resid / (n * (n - 1))) / (total / n)
