"""Paired per-item statistics (``forgetkit.results.stats``) against independent implementations
(scipy, brute force, the delta method, exact ideal-bootstrap variances) and known answers, on
synthetic per-item data.

Every tolerance is derived in a comment: Monte-Carlo (MC) comparisons use a few standard errors
of the MC estimate, computed in the test from the data (not tuned). Every random draw has a fixed
seed and everything is plain numpy, so no verdict depends on the CPU or the thread count.
"""

from __future__ import annotations

import inspect
import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats as sps

from forgetkit.eval.metrics import ratio_stderr
from forgetkit.results.stats import (
    ItemScores,
    Resampler,
    align,
    delta_replicates,
    interpolate_at,
    is_binary,
    item_scores,
    item_sd,
    mcnemar_exact,
    paired_delta,
    percentile_ci,
    seed_scale,
    statistic,
)

# A Monte-Carlo estimate is accepted within K_SE of its standard errors: a normal deviation beyond
# 4 SE has probability 6e-5, so a correct implementation fails only by bad luck that a fixed
# seed makes reproducible (and a bug large enough to matter shows up far beyond it).
K_SE = 4.0


def ids_of(n: int) -> list[str]:
    return [f"doc{i}" for i in range(n)]


def mean_items(scores: np.ndarray, ids: list[str] | None = None) -> dict:
    return {"stat": "mean", "id": ids or ids_of(len(scores)), "score": list(map(float, scores))}


def ratio_items(sums: np.ndarray, counts: np.ndarray) -> dict:
    return {"stat": "ratio", "id": ids_of(len(sums)), "score": list(map(float, sums)),
            "count": list(map(float, counts))}


def quantile_se(reps: np.ndarray, p: float) -> float:
    """MC standard error of the p-quantile of ``len(reps)`` draws: sqrt(p(1-p)/B) / f(q_p)
    (the asymptotic variance of a sample quantile), with the density f taken as normal with
    the replicates' SD (the bootstrap distribution of a mean or ratio over hundreds of items is
    close to normal; its density error is O(skewness), a small fraction of the SE)."""
    sd = float(np.std(reps, ddof=1))
    dens = sps.norm.pdf(sps.norm.ppf(p)) / sd
    return math.sqrt(p * (1 - p) / len(reps)) / dens


def sd_mc_se(reps: np.ndarray) -> float:
    """MC standard error of the sample SD of ``reps``: sd * sqrt((kurtosis - 1) / (4 B)) (delta
    method on the sample variance, whose variance is (m4 - sd^4) / B); kurtosis from the data."""
    c = reps - reps.mean()
    m2, m4 = float(np.mean(c ** 2)), float(np.mean(c ** 4))
    return math.sqrt(m2) * math.sqrt((m4 / m2 ** 2 - 1) / (4 * len(reps)))


def var_mc_se(reps: np.ndarray) -> float:
    """MC standard error of the sample variance of ``reps``: sqrt((m4 - m2^2) / B)."""
    c = reps - reps.mean()
    m2, m4 = float(np.mean(c ** 2)), float(np.mean(c ** 4))
    return math.sqrt((m4 - m2 ** 2) / len(reps))


def scipy_rng_kw(seed: int) -> dict:
    """scipy >= 1.15 takes ``rng``, older versions ``random_state`` (pyproject allows 1.10)."""
    name = "rng" if "rng" in inspect.signature(sps.bootstrap).parameters else "random_state"
    return {name: np.random.default_rng(seed)}


# --- 1. exact McNemar ----------------------------------------------------------------------------


def brute_force_p(lost: int, gained: int) -> float:
    """min(1, 2 P[Bin(n, 1/2) <= min]) by exact rational enumeration of the binomial."""
    n = lost + gained
    if n == 0:
        return 1.0
    tail = sum(Fraction(math.comb(n, k), 2 ** n) for k in range(min(lost, gained) + 1))
    return float(min(Fraction(1), 2 * tail))


def paired01(lost: int, gained: int, both: int, neither: int, seed: int):
    """Shuffled paired 0/1 arrays with the given discordant and concordant counts."""
    before = np.array([1] * lost + [0] * gained + [1] * both + [0] * neither)
    after = np.array([0] * lost + [1] * gained + [1] * both + [0] * neither)
    perm = np.random.default_rng(seed).permutation(len(before))
    return before[perm], after[perm]


@pytest.mark.parametrize("lost,gained", [(0, 0), (3, 3), (5, 5), (0, 1), (1, 0), (0, 12),
                                         (1, 30), (2, 7), (10, 3), (40, 60), (0, 200),
                                         (500, 520)])
def test_mcnemar_exact_matches_scipy_and_enumeration(lost: int, gained: int) -> None:
    before, after = paired01(lost, gained, both=17, neither=9, seed=lost * 1000 + gained)
    got_lost, got_gained, p = mcnemar_exact(before, after)
    assert (got_lost, got_gained) == (lost, gained)
    # binom.cdf vs an exact rational sum: agreement to float rounding (rtol 1e-9 leaves room for
    # the incomplete-beta evaluation; p can be as small as 2^-199).
    assert p == pytest.approx(brute_force_p(lost, gained), rel=1e-9, abs=0.0)
    if lost + gained:
        # scipy's two-sided exact binomial test: for the symmetric Bin(n, 1/2) it sums both tails,
        # i.e. the same min(1, 2 P[X <= min]).
        ref = sps.binomtest(min(lost, gained), lost + gained, 0.5).pvalue
        assert p == pytest.approx(ref, rel=1e-9, abs=0.0)
    else:
        assert p == 1.0  # no discordant item: no evidence of change
    if lost == gained:
        assert p == 1.0


def test_mcnemar_by_hand() -> None:
    before = np.array([1, 1, 0, 0, 1, 0])
    after = np.array([1, 0, 1, 1, 1, 0])
    # item 1: right -> wrong (lost); items 2, 3: wrong -> right (gained); the rest concordant.
    # p = min(1, 2 * P[Bin(3, 1/2) <= 1]) = min(1, 2 * 4/8) = 1.
    assert mcnemar_exact(before, after) == (1, 2, 1.0)
    # 3 gained, 0 lost: p = 2 * P[Bin(3, 1/2) = 0] = 2/8.
    assert mcnemar_exact(np.zeros(3), np.ones(3)) == (0, 3, 0.25)


def test_paired_delta_reports_mcnemar_only_for_one_binary_after() -> None:
    before, after = paired01(2, 9, both=30, neither=10, seed=0)
    rs = Resampler(n_boot=200)
    out = paired_delta(mean_items(before), [mean_items(after)], rs, "acc")
    assert (out["lost"], out["gained"]) == (2, 9)
    assert out["mcnemar_p"] == pytest.approx(brute_force_p(2, 9), rel=1e-9)
    assert out["delta"] == pytest.approx((9 - 2) / len(before), rel=1e-12)
    # two seeds, or a non-binary score: no McNemar test
    two = paired_delta(mean_items(before), [mean_items(after)] * 2, rs, "acc")
    assert "mcnemar_p" not in two
    f1 = paired_delta(mean_items(before * 0.5), [mean_items(after)], rs, "f1")
    assert "mcnemar_p" not in f1
    assert is_binary(item_scores(mean_items(before)))
    assert not is_binary(item_scores(mean_items(before * 0.5)))


# --- 2. paired bootstrap of a mean ---------------------------------------------------------------


def test_paired_bootstrap_matches_scipy_bootstrap() -> None:
    rng = np.random.default_rng(11)
    n, n_boot = 200, 20000
    b = rng.normal(0.5, 0.2, n)
    a = b + 0.03 + rng.normal(0.0, 0.1, n)
    out = paired_delta(mean_items(b), [mean_items(a)], Resampler(n_boot=n_boot, seed=1), "m")
    assert out["delta"] == pytest.approx(a.mean() - b.mean(), rel=1e-12)
    ref = sps.bootstrap((b, a), lambda b, a, axis: a.mean(axis) - b.mean(axis), paired=True,
                        vectorized=True, n_resamples=n_boot, method="percentile",
                        confidence_level=0.95, **scipy_rng_kw(2))
    reps = out["reps"]
    assert reps.shape == (n_boot,)
    # Two independent MC estimates of the same quantile: their difference has SE sqrt(2) * SE.
    for got, want, p in [(out["lo"], ref.confidence_interval.low, 0.025),
                         (out["hi"], ref.confidence_interval.high, 0.975)]:
        assert abs(got - want) <= K_SE * math.sqrt(2) * quantile_se(reps, p)
    # and the same bootstrap SD (both MC, independent)
    tol = K_SE * math.sqrt(2) * sd_mc_se(reps)
    assert abs(np.std(reps, ddof=1) - np.std(ref.bootstrap_distribution, ddof=1)) <= tol


def test_paired_bootstrap_ci_is_delta_pm_196_sd_over_sqrt_n() -> None:
    rng = np.random.default_rng(12)
    n, n_boot, true_delta, s = 400, 20000, 0.05, 0.3
    d = rng.normal(true_delta, s, n)  # item differences, normal with SD s
    b = rng.uniform(0.0, 1.0, n)  # before-scores: arbitrary, they cancel in the pairing
    a = b + d
    out = paired_delta(mean_items(b), [mean_items(a)], Resampler(n_boot=n_boot, seed=3), "m")
    reps, z = out["reps"], sps.norm.ppf(0.975)
    # The ideal bootstrap distribution of mean(d*) has mean mean(d) and SD std(d, ddof=0)/sqrt(n);
    # its 2.5/97.5% quantiles differ from mean -/+ z SD by the Cornish-Fisher terms of its
    # skewness g/sqrt(n) and excess kurtosis k/n (g, k of the items): (z^2-1) g/(6 sqrt n) and
    # (z^3-3z) k/(24 n), in SDs. Tolerance: those terms plus K_SE MC SEs of the quantile.
    sd_boot = np.std(d) / math.sqrt(n)
    cf = sd_boot * (abs((z * z - 1) * sps.skew(d) / (6 * math.sqrt(n)))
                    + abs((z ** 3 - 3 * z) * sps.kurtosis(d) / (24 * n)))
    for got, sign, p in [(out["lo"], -1, 0.025), (out["hi"], 1, 0.975)]:
        assert abs(got - (d.mean() + sign * z * sd_boot)) <= cf + K_SE * quantile_se(reps, p)
    # Known population answer for the half-width, z s / sqrt(n): the sample SD has relative SE
    # 1/sqrt(2(n-1)) for normal data; the bootstrap's ddof=0 shrinks it by ~1/(2n); plus MC.
    half, want = (out["hi"] - out["lo"]) / 2, z * s / math.sqrt(n)
    tol = want * (K_SE / math.sqrt(2 * (n - 1)) + 1 / (2 * n)) + cf + K_SE * quantile_se(reps, 0.975)
    assert abs(half - want) <= tol
    # the centre is the paired point estimate, which is within K_SE SEs of the truth
    assert abs(out["delta"] - true_delta) <= K_SE * s / math.sqrt(n)


# --- 3. ratio statistic (NLL sums / token counts) ------------------------------------------------


def ratio_data(seed: int = 21, n: int = 400):
    rng = np.random.default_rng(seed)
    counts = rng.integers(20, 81, n).astype(np.float64)  # tokens per document
    rate = 2.0 + rng.normal(0.0, 0.3, n)  # the document's NLL per token
    before = counts * rate
    after = counts * (rate + 0.1 + rng.normal(0.0, 0.1, n))
    return before, after, counts


def check_bootstrap_sd_of_ratio(sums: np.ndarray, counts: np.ndarray, r_star: np.ndarray,
                                idx: np.ndarray) -> None:
    """SD of the bootstrap ratio replicates ``r_star`` (ratio of sums over rows of ``idx``) vs
    the delta-method SE.

    r* - r = L* / (x̄*/x̄) with the linear part L* = mean((s - r c)[idx]) / x̄. By the triangle
    inequality for the SD (a norm on centred vectors), |sd(r*) - sd(L*)| <= sd(r* - r - L*),
    computed exactly from the same resamples: that bounds the nonlinearity. L* is a mean of
    resampled residuals (mean 0), so its ideal bootstrap SD is std(resid, ddof=0)/(sqrt(n) x̄)
    = ratio_stderr * sqrt((n-1)/n), up to the MC error of an SD estimate (K_SE SEs)."""
    n = len(sums)
    r, se = ratio_stderr(list(sums), list(counts))
    lin = (sums[idx].mean(axis=1) - r * counts[idx].mean(axis=1)) / counts.mean()
    nonlin = float(np.std(r_star - r - lin, ddof=1))
    ideal = se * math.sqrt((n - 1) / n)
    assert abs(np.std(r_star, ddof=1) - ideal) <= nonlin + K_SE * sd_mc_se(lin)


def test_ratio_point_sd_and_bootstrap_se() -> None:
    before, after, counts = ratio_data()
    n, n_boot = len(before), 20000
    rs = Resampler(n_boot=n_boot, seed=5)
    out = paired_delta(ratio_items(before, counts), [ratio_items(after, counts)], rs, "nll")
    # point: the hand ratio-of-sums difference (not a mean of per-item ratios)
    hand = after.sum() / counts.sum() - before.sum() / counts.sum()
    assert out["delta"] == pytest.approx(hand, rel=1e-12)
    assert out["delta"] != pytest.approx(np.mean(after / counts - before / counts), rel=1e-3)
    b = item_scores(ratio_items(before, counts))
    assert statistic(b) == pytest.approx(before.sum() / counts.sum(), rel=1e-14)
    # sd / sqrt(n) is ratio_stderr (fsum there, np.sum here: float rounding only)
    r, se = ratio_stderr(list(before), list(counts))
    assert out["sd"] == item_sd(b)
    assert item_sd(b) / math.sqrt(n) == pytest.approx(se, rel=1e-12)
    assert out["effect"] == pytest.approx(hand / item_sd(b), rel=1e-12)
    # the bootstrap SE of the before ratio agrees with the delta method
    idx = rs.items("nll", n)
    check_bootstrap_sd_of_ratio(before, counts, statistic(b, idx), idx)
    # Δ replicates recompute both ratios on the *same* resampled items: with shared counts that is
    # exactly the ratio of the resampled differences (float rounding of ~2.0-sized terms: 1e-12),
    # so its SE is the delta-method SE of ratio(after - before, counts).
    diff = after - before
    direct = diff[idx].sum(axis=1) / counts[idx].sum(axis=1)
    np.testing.assert_allclose(out["reps"], direct, rtol=0, atol=1e-12)
    check_bootstrap_sd_of_ratio(diff, counts, out["reps"], idx)


def test_ratio_with_different_counts_before_and_after() -> None:
    before, after, counts = ratio_data(seed=22, n=50)
    counts_after = counts + 3  # e.g. a different tokenisation of the same documents
    out = paired_delta(ratio_items(before, counts), [ratio_items(after, counts_after)],
                       Resampler(n_boot=100), "nll")
    hand = after.sum() / counts_after.sum() - before.sum() / counts.sum()
    assert out["delta"] == pytest.approx(hand, rel=1e-12)


# --- 4. statistic and item_sd of a mean ----------------------------------------------------------


def test_statistic_and_item_sd_of_a_mean() -> None:
    x = np.random.default_rng(31).uniform(0.0, 1.0, 57)
    s = item_scores(mean_items(x))
    assert statistic(s) == pytest.approx(np.mean(x), rel=1e-14)
    assert item_sd(s) == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    idx = Resampler(n_boot=7, seed=1).items("k", len(x))
    np.testing.assert_allclose(statistic(s, idx), x[idx].mean(axis=1), rtol=1e-14)
    assert math.isnan(item_sd(item_scores(mean_items(np.array([0.3])))))
    out = paired_delta(mean_items(x), [mean_items(x + 0.1)], Resampler(n_boot=50), "k")
    assert out["effect"] == pytest.approx(0.1 / np.std(x, ddof=1), rel=1e-9)
    # a constant before-score has sd 0: the standardised effect is undefined, not infinite
    flat = paired_delta(mean_items(np.ones(5)), [mean_items(np.zeros(5))], Resampler(50), "k")
    assert flat["sd"] == 0.0 and math.isnan(flat["effect"])


# --- 5. pairing ----------------------------------------------------------------------------------


def test_align_reorders_by_id() -> None:
    before = item_scores({"id": ["a", "b", "c"], "score": [1.0, 2.0, 3.0]})
    after = item_scores({"stat": "ratio", "id": ["c", "a", "b"], "score": [30.0, 10.0, 20.0],
                         "count": [3.0, 1.0, 2.0]})
    got = align(before, after)
    assert got.ids == ("a", "b", "c")
    np.testing.assert_array_equal(got.score, [10.0, 20.0, 30.0])
    np.testing.assert_array_equal(got.count, [1.0, 2.0, 3.0])
    # paired_delta pairs by id, not by position
    b = {"id": ["a", "b", "c"], "score": [0.0, 1.0, 0.0]}
    a = {"id": ["c", "a", "b"], "score": [1.0, 0.0, 1.0]}
    out = paired_delta(b, [a], Resampler(n_boot=50), "acc")
    assert out["delta"] == pytest.approx(1 / 3) and (out["lost"], out["gained"]) == (0, 1)


def test_align_rejects_different_item_sets() -> None:
    before = item_scores({"id": ["a", "b", "c"], "score": [1.0, 2.0, 3.0]})
    with pytest.raises(ValueError, match=r"different items: 1 only before .*'c'.*1 only after"
                                         r" .*'x'"):
        align(before, item_scores({"id": ["a", "b", "x"], "score": [1.0, 2.0, 3.0]}))
    with pytest.raises(ValueError, match="different items: 1 only before"):
        align(before, item_scores({"id": ["a", "b"], "score": [1.0, 2.0]}))
    with pytest.raises(ValueError, match="different items"):
        paired_delta({"id": ["a", "b"], "score": [1.0, 0.0]},
                     [{"id": ["a", "z"], "score": [1.0, 0.0]}], Resampler(n_boot=10), "k")


def test_item_scores_rejects_bad_records() -> None:
    with pytest.raises(ValueError, match="not unique"):
        item_scores({"id": ["a", "b", "a"], "score": [1.0, 0.0, 1.0]})
    with pytest.raises(ValueError, match="not unique"):
        paired_delta({"id": ["a", "b"], "score": [1.0, 0.0]},
                     [{"id": ["b", "b"], "score": [1.0, 0.0]}], Resampler(n_boot=10), "k")
    with pytest.raises(ValueError, match="3 item ids but 2 scores"):
        item_scores({"id": ["a", "b", "c"], "score": [1.0, 0.0]})
    with pytest.raises(ValueError, match="2 item ids but 1 counts"):
        item_scores({"stat": "ratio", "id": ["a", "b"], "score": [1.0, 0.0], "count": [3]})
    with pytest.raises(ValueError, match="unknown item statistic 'median'"):
        item_scores({"stat": "median", "id": ["a"], "score": [1.0]})


# --- 6. crossed bootstrap over seeds x items -----------------------------------------------------


def test_crossed_bootstrap_with_identical_seeds_is_the_paired_bootstrap() -> None:
    rng = np.random.default_rng(41)
    b = item_scores(mean_items(rng.uniform(0, 1, 80)))
    a = item_scores(mean_items(rng.uniform(0, 1, 80)))
    point1, reps1 = delta_replicates(b, [a], Resampler(n_boot=3000, seed=7), "m")
    # Seed resampling picks among identical sets, so it changes nothing: the same item resample
    # (it depends only on seed, key, n) gives the same replicates, up to the rounding of a mean
    # of S equal floats (1e-15 relative on ~1-sized values).
    point3, reps3 = delta_replicates(b, [a, a, a], Resampler(n_boot=3000, seed=7), "m",
                                     seeds=[1, 2, 3])
    assert point3 == pytest.approx(point1, rel=0, abs=1e-14)
    np.testing.assert_allclose(reps3, reps1, rtol=0, atol=1e-14)
    # and with one seed it is exactly the paired bootstrap of paired_delta
    out = paired_delta(mean_items(b.score), [mean_items(a.score)], Resampler(3000, 7), "m")
    np.testing.assert_array_equal(out["reps"], reps1)


def test_crossed_point_is_the_mean_over_seeds() -> None:
    before, after, counts = ratio_data(seed=43, n=60)
    afters = [after * (1 + 0.01 * k) for k in range(4)]
    b = item_scores(ratio_items(before, counts))
    a = [item_scores(ratio_items(x, counts)) for x in afters]
    point, reps = delta_replicates(b, a, Resampler(n_boot=100), "nll", seeds=[3, 1, 4, 5])
    per_seed = [x.sum() / counts.sum() - before.sum() / counts.sum() for x in afters]
    assert point == pytest.approx(np.mean(per_seed), rel=1e-12)
    assert reps.shape == (100,)
    with pytest.raises(ValueError, match="2 seeds for 4 after-scores"):
        delta_replicates(b, a, Resampler(n_boot=10), "nll", seeds=[1, 2])
    with pytest.raises(ValueError, match="no after-scores"):
        delta_replicates(b, [], Resampler(n_boot=10), "nll")


def two_way_parts(d: np.ndarray) -> tuple[float, float, float]:
    """Exact ideal-bootstrap variance parts of mean(D*) for D of shape (S, n) under the crossed
    bootstrap. With the two-way decomposition D = m + A_s + B_i + E_si (effects summing to 0),
    mean(D*) - m = mean_k A_{s_k} + mean_l B_{i_l} + mean_kl E_{s_k i_l}; the three terms are
    uncorrelated (each row and column of E sums to 0), so
    Var* = mean(A^2)/S + mean(B^2)/n + mean(E^2)/(S n): seeds part, items part, interaction."""
    s, n = d.shape
    m = d.mean()
    row, col = d.mean(axis=1) - m, d.mean(axis=0) - m
    e = d - m - row[:, None] - col[None, :]
    return float(np.mean(row ** 2)) / s, float(np.mean(col ** 2)) / n, float(np.mean(e ** 2)) / (s * n)


def crossed_data(rng: np.random.Generator, s: int, n: int, tau: float, sd_item: float,
                 sd_inter: float) -> tuple[np.ndarray, np.ndarray]:
    """before (n,) and after (S, n): after - before = 0.05 + seed effect (SD tau) + item effect
    (SD sd_item) + seed x item interaction (SD sd_inter); before's own item noise cancels."""
    before = rng.uniform(0.0, 1.0, n)
    after = (before + 0.05 + rng.normal(0, tau, (s, 1)) + rng.normal(0, sd_item, (1, n))
             + rng.normal(0, sd_inter, (s, n)))
    return before, after


def test_crossed_bootstrap_variance_is_seeds_plus_items_plus_interaction() -> None:
    rng = np.random.default_rng(44)
    s, n, n_boot = 4, 300, 20000
    before, after = crossed_data(rng, s, n, tau=0.02, sd_item=0.1, sd_inter=0.1)
    b = item_scores(mean_items(before))
    a = [item_scores(mean_items(x)) for x in after]
    point, reps = delta_replicates(b, a, Resampler(n_boot=n_boot, seed=9), "m")
    assert point == pytest.approx(float(np.mean(after - before[None, :])), rel=1e-12)
    v_seeds, v_items, v_inter = two_way_parts(after - before[None, :])
    # The replicate variance is an unbiased MC estimate of the exact ideal variance: K_SE SEs
    # (SE from the replicates' own fourth moment: the seed resample is discrete, not normal).
    got, tol = float(np.var(reps, ddof=1)), K_SE * var_mc_se(reps)
    # the seed deviation (seed part + interaction) is scaled by seed_scale (stats docstring)
    c2 = seed_scale(s) ** 2
    assert abs(got - (v_items + c2 * (v_seeds + v_inter))) <= tol
    # it counts both sources: more than the seeds-only and more than the items-only variance
    # (the data are built so that each of those is below it by far more than the tolerance),
    # and it is the sum of the two up to the (small) interaction part
    assert got > v_seeds + tol and got > v_items + tol
    assert abs(got - (c2 * v_seeds + v_items)) <= c2 * v_inter + tol


@pytest.mark.parametrize("regime", ["interaction", "seeds"])
def test_crossed_bootstrap_bias_over_many_datasets(regime: str) -> None:
    """Population check of the pigeonhole bootstrap (Owen 2007) over K synthetic datasets with a
    known variance structure: D_si = δ + a_s + d_i + e_si, a ~ N(0, τ²), d ~ N(0, σd²),
    e ~ N(0, σe²). The exact variance of Δ̂ is τ²/S + σd²/n + σe²/(S n). Taking expectations of
    the three parts of :func:`two_way_parts` gives the bootstrap's expected variance exactly:

        plain:     (S-1)/S² (τ² + σe²/n) + (n-1)/n² (σd² + σe²/S) + (S-1)(n-1)/(S² n²) σe²

    and, with forgetkit's sqrt(S/(S-1)) scaling of the seed deviation (its seed and interaction
    parts multiplied by S/(S-1)),

        E[V*] = (τ² + σe²/n)/S + (n-1)/n² (σd² + σe²/S) + (n-1)/(S n²) σe².

    So the seed part is unbiased (the plain bootstrap shrinks it by (S-1)/S: with 3 seeds and a
    dominant seed effect its CI would be too narrow), and the interaction is counted ~3 times
    (conservative)."""
    if regime == "interaction":
        s, n, tau, sd_item, sd_inter = 4, 50, 0.0, 0.05, 0.3
    else:
        s, n, tau, sd_item, sd_inter = 3, 50, 0.1, 0.02, 0.02
    k_sets, n_boot = 1000, 200
    v_true = tau ** 2 / s + sd_item ** 2 / n + sd_inter ** 2 / (s * n)
    # the plain parts (seed, items, interaction), the seed deviation's scaled by seed_scale²
    k2 = seed_scale(s) ** 2
    ev_boot = (k2 * (s - 1) / s ** 2 * (tau ** 2 + sd_inter ** 2 / n)
               + (n - 1) / n ** 2 * (sd_item ** 2 + sd_inter ** 2 / s)
               + k2 * (s - 1) * (n - 1) / (s * n) ** 2 * sd_inter ** 2)
    rng = np.random.default_rng(45 if regime == "interaction" else 46)
    points, boot_vars = np.empty(k_sets), np.empty(k_sets)
    for k in range(k_sets):
        before, after = crossed_data(rng, s, n, tau, sd_item, sd_inter)
        b = item_scores(mean_items(before))
        a = [item_scores(mean_items(x)) for x in after]
        points[k], reps = delta_replicates(b, a, Resampler(n_boot=n_boot, seed=k), "m")
        boot_vars[k] = np.var(reps, ddof=1)  # unbiased for the dataset's ideal V*
    # mean of K iid variance estimates: K_SE SEs of a mean, SE = their SD / sqrt(K)
    tol_boot = K_SE * float(np.std(boot_vars, ddof=1)) / math.sqrt(k_sets)
    assert abs(boot_vars.mean() - ev_boot) <= tol_boot
    # Δ̂ is exactly normal in this model: its sample variance has relative SE sqrt(2/(K-1))
    tol_true = K_SE * v_true * math.sqrt(2 / (k_sets - 1))
    assert abs(np.var(points, ddof=1) - v_true) <= tol_true
    # interaction-dominated: conservative, resolved beyond both tolerances; seed-dominated: the
    # plain bootstrap would be too narrow by (S-1)/S, which is resolved here, and the corrected
    # one is not
    obs = np.var(points, ddof=1)
    if regime == "interaction":
        assert ev_boot > v_true and boot_vars.mean() - tol_boot > obs + tol_true
    else:
        # ≈ what the uncorrected bootstrap would give (the items part is negligible in this
        # regime; its tolerance scales the same way): too narrow, resolved; the corrected one
        # is wider than the truth by (t/z)² (it gives the t-interval's width), not narrower
        f = (s - 1) / s / seed_scale(s) ** 2
        plain, tol_plain = f * boot_vars.mean(), f * tol_boot
        assert plain + tol_plain < obs - tol_true
        assert boot_vars.mean() - tol_boot > obs + tol_true


# --- 7. Resampler --------------------------------------------------------------------------------


def test_resampler_is_reproducible_and_shared() -> None:
    r1, r2 = Resampler(n_boot=300, seed=3), Resampler(n_boot=300, seed=3)
    x = r1.items("mmlu/acc", 50)
    assert x.shape == (300, 50) and x.min() >= 0 and x.max() < 50
    np.testing.assert_array_equal(x, r2.items("mmlu/acc", 50))  # same seed, key, n
    assert r1.items("mmlu/acc", 50) is x  # cached: every call shares the same resample
    assert not np.array_equal(x, r1.items("arc/acc", 50))  # another metric
    assert not np.array_equal(x, Resampler(n_boot=300, seed=4).items("mmlu/acc", 50))
    assert not np.array_equal(x[:, :49], r1.items("mmlu/acc", 49))  # another size
    # seeds: reproducible, all 0 for one seed, in range otherwise
    sd = r1.seeds([0, 1, 2])
    assert sd.shape == (300, 3) and set(np.unique(sd)) == {0, 1, 2}
    np.testing.assert_array_equal(sd, r2.seeds([0, 1, 2]))
    np.testing.assert_array_equal(r1.seeds([7]), np.zeros((300, 1)))
    # two arms of one metric see the same resampled items: their replicate difference is the
    # difference of the two arms' statistics on the same rows
    rng = np.random.default_rng(71)
    b, a1, a2 = (item_scores(mean_items(rng.uniform(0, 1, 50))) for _ in range(3))
    _, reps1 = delta_replicates(b, [a1], r1, "mmlu/acc")
    _, reps2 = delta_replicates(b, [a2], r1, "mmlu/acc")
    np.testing.assert_allclose(reps1 - reps2, statistic(a1, x) - statistic(a2, x), atol=1e-14)


# --- 8. interpolate_at ---------------------------------------------------------------------------


def test_interpolate_at_by_hand() -> None:
    # curve (gain, value): (0, 0) -> (1, 2) -> (3, 3)
    g, v = np.array([[0.0], [1.0], [3.0]]), np.array([[0.0], [2.0], [3.0]])

    def at(t: float) -> float:
        return float(interpolate_at(g, v, np.array([t]))[0])

    assert at(0.5) == pytest.approx(1.0)
    assert at(1.0) == pytest.approx(2.0)
    assert at(2.0) == pytest.approx(2.5)
    assert at(3.0) == pytest.approx(3.0)
    assert at(0.0) == pytest.approx(0.0)
    for t in (-0.1, 3.1, math.nan, math.inf):  # nothing is extrapolated
        assert math.isnan(at(t))


def test_interpolate_at_folded_and_flat_curves() -> None:
    # folded: (0, 0) -> (2, 4) -> (1, 10); gain 1.5 lies on both segments, the first is used
    g, v = np.array([[0.0], [2.0], [1.0]]), np.array([[0.0], [4.0], [10.0]])
    assert interpolate_at(g, v, np.array([1.5]))[0] == pytest.approx(3.0)  # not 7.0
    # flat segment (two points at the same gain): the point nearest the base
    g, v = np.array([[0.0], [0.0], [1.0]]), np.array([[0.0], [5.0], [6.0]])
    assert interpolate_at(g, v, np.array([0.0]))[0] == 0.0
    assert interpolate_at(g, v, np.array([0.5]))[0] == pytest.approx(5.5)
    g, v = np.array([[1.0], [1.0]]), np.array([[2.0], [3.0]])
    assert interpolate_at(g, v, np.array([1.0]))[0] == 2.0
    assert math.isnan(interpolate_at(g, v, np.array([0.0]))[0])
    # a NaN point (e.g. an undefined replicate) breaks only the segments that touch it
    g, v = np.array([[0.0], [math.nan], [2.0], [3.0]]), np.array([[0.0], [1.0], [2.0], [3.0]])
    assert math.isnan(interpolate_at(g, v, np.array([1.0]))[0])
    assert interpolate_at(g, v, np.array([2.5]))[0] == pytest.approx(2.5)


def test_interpolate_at_is_vectorised_over_replicates() -> None:
    rng = np.random.default_rng(81)
    p, b = 5, 400
    gains = np.vstack([np.zeros(b), np.cumsum(rng.uniform(0.1, 1.0, (p - 1, b)), axis=0)])
    values = rng.normal(0, 1, (p, b))
    target = rng.uniform(-0.5, 1.2, b) * gains[-1]  # some outside the curve on both sides
    got = interpolate_at(gains, values, target)
    want = np.array([np.interp(target[j], gains[:, j], values[:, j])
                     if gains[0, j] <= target[j] <= gains[-1, j] else np.nan for j in range(b)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, equal_nan=True)
    assert np.isnan(got).any() and np.isfinite(got).any()


# --- 9. percentile_ci ----------------------------------------------------------------------------


def test_percentile_ci_nan_handling() -> None:
    r = np.random.default_rng(91).normal(0, 1, 1000)
    assert percentile_ci(r) == pytest.approx(tuple(np.quantile(r, [0.025, 0.975])), rel=1e-14)
    assert percentile_ci(r, 0.9) == pytest.approx(tuple(np.quantile(r, [0.05, 0.95])), rel=1e-14)
    some = r.copy()
    some[::3] = np.nan  # a third undefined: left out
    assert percentile_ci(some) == pytest.approx(tuple(np.quantile(r[np.isfinite(some)],
                                                                  [0.025, 0.975])), rel=1e-14)
    half = r.copy()
    half[::2] = np.inf  # exactly half finite: still defined
    assert all(np.isfinite(percentile_ci(half)))
    most = r.copy()
    most[:501] = np.nan  # fewer than half finite: undefined
    assert all(math.isnan(x) for x in percentile_ci(most))
    assert all(math.isnan(x) for x in percentile_ci(np.full(10, np.nan)))
    assert all(math.isnan(x) for x in percentile_ci(np.array([])))


# --- 10. coverage --------------------------------------------------------------------------------


@pytest.mark.parametrize("stat", ["mean", "ratio"])
def test_paired_bootstrap_ci_covers_the_truth(stat: str) -> None:
    """Over K datasets with known Δ the 95% CI covers it in a fraction consistent with its
    expected coverage. For a mean of n normal differences the percentile bootstrap interval is
    ≈ mean ± z sd_ddof0 / sqrt(n), so its coverage is P(|t_{n-1}| <= z sqrt((n-1)/n)) (≈0.943
    at n=60: the known O(1/n) shortfall); the count of covering datasets is Binomial(K, p), and
    we accept within 3.3 binomial SDs (two-sided 1e-3). The MC noise of B=500 replicate
    endpoints lowers coverage by well under one binomial SD (the endpoint SE is ~0.06 CI
    half-widths)."""
    k_sets, n, n_boot, true_delta = 200, 60, 500, 0.1
    rng = np.random.default_rng(101 if stat == "mean" else 102)
    covered = 0
    for k in range(k_sets):
        if stat == "mean":
            b = rng.uniform(0.0, 1.0, n)
            a = b + true_delta + rng.normal(0.0, 0.3, n)
            before, after = mean_items(b), mean_items(a)
        else:  # NLL sums: the population ratio difference is exactly true_delta
            counts = rng.integers(20, 81, n).astype(np.float64)
            rate = 2.0 + rng.normal(0.0, 0.3, n)
            before = ratio_items(counts * rate, counts)
            after = ratio_items(counts * (rate + true_delta + rng.normal(0.0, 0.3, n)), counts)
        out = paired_delta(before, [after], Resampler(n_boot=n_boot, seed=k), "m")
        covered += out["lo"] <= true_delta <= out["hi"]
    z = sps.norm.ppf(0.975)
    p = 2 * sps.t.cdf(z * math.sqrt((n - 1) / n), n - 1) - 1
    assert abs(covered / k_sets - p) <= 3.3 * math.sqrt(p * (1 - p) / k_sets)
    # and with the nominal 0.95 itself
    assert abs(covered / k_sets - 0.95) <= 3.3 * math.sqrt(0.95 * 0.05 / k_sets)


def test_crossed_ci_covers_with_three_seeds_when_the_seed_effect_dominates() -> None:
    """Three seeds, a seed effect much larger than the item noise: the crossed interval (seed
    deviation scaled by seed_scale) covers the truth about as often as the t-interval over
    seeds; the plain pigeonhole bootstrap covered ~80 % here. A resample of 3 seeds has only 10
    distinct multisets, so the coverage is checked against 0.95 minus a discreteness allowance
    (0.04) and K_SE binomial standard errors."""
    rng = np.random.default_rng(11)
    s, n, sims = 3, 100, 300
    ids = tuple(str(i) for i in range(n))
    hit = 0
    for k in range(sims):
        b = rng.normal(size=n)
        eff = rng.normal(0.0, 0.3, s)
        afters = [ItemScores(ids, b + eff[j] + rng.normal(0.0, 0.05, n)) for j in range(s)]
        truth = 0.0  # the seed effects' population mean
        _, reps = delta_replicates(ItemScores(ids, b), afters, Resampler(400, seed=k), "m")
        lo, hi = percentile_ci(reps)
        hit += lo <= truth <= hi
    se = math.sqrt(0.95 * 0.05 / sims)
    assert hit / sims >= 0.95 - 0.04 - K_SE * se
