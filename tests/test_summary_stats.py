"""The results tables' paired statistics on a synthetic results tree with a known answer:
summary.csv / summary_agg.csv / points*.csv equal direct re-computations, std_forgetting equals
its hand definition, an arm lying on the reference curve has zero excess forgetting, and every
column is documented in columns.json."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest

from forgetkit.config import AnalysisConfig
from forgetkit.results import read_json, write_json
from forgetkit.results.stats import Resampler, item_scores, item_sd, paired_delta
from forgetkit.results.summary import COLUMN_DOCS, write_tables

N_ACC, N_NLL = 80, 40


def _acc_items(p: np.ndarray) -> dict:
    return {"stat": "mean", "id": [f"{i}:x{i}" for i in range(N_ACC)],
            "score": [float(v) for v in p], "mean_equals_value": True}


def _nll_items(sums: np.ndarray, counts: np.ndarray) -> dict:
    return {"stat": "ratio", "id": [f"{i}:d{i}" for i in range(N_NLL)],
            "score": [float(v) for v in sums], "count": [int(c) for c in counts]}


def _rec(items: dict, hib: bool) -> dict:
    s, c = np.asarray(items["score"]), items.get("count")
    value = float(s.sum() / np.sum(c)) if c is not None else float(s.mean())
    return {"value": value, "higher_is_better": hib, "metric": "acc" if hib else "nll",
            "kind": "lm_eval" if hib else "perplexity", "items": items}


class World:
    """Synthetic scores: a task NLL that falls with 'amount', a general NLL that rises and a
    general accuracy whose items flip with probability growing with 'amount'."""

    def __init__(self) -> None:
        rng = np.random.default_rng(7)
        self.counts = rng.integers(5, 30, size=N_NLL)
        self.task0 = rng.uniform(1.0, 3.0, size=N_NLL) * self.counts
        self.gen0 = rng.uniform(2.0, 4.0, size=N_NLL) * self.counts
        self.acc0 = (rng.uniform(size=N_ACC) < 0.5).astype(float)
        self.u = rng.uniform(size=N_ACC)
        self.noise = rng.normal(size=N_NLL)

    def scores(self, amount: float, seed: int = 0) -> dict:
        """amount 0 = the base model; task gain and forgetting are both linear in amount."""
        jitter = 0.01 * seed * self.noise
        task = self.task0 * (1 - 0.3 * amount) + jitter
        gen = self.gen0 * (1 + 0.1 * amount) + jitter
        acc = np.where(self.u < 0.2 * amount, 1 - self.acc0, self.acc0)
        return {"task": {"task_nll": _rec(_nll_items(task, self.counts), False)},
                "general": {"gen_nll": _rec(_nll_items(gen, self.counts), False),
                            "acc": _rec(_acc_items(acc), True)}}


def _strip(tree: dict) -> dict:
    if isinstance(tree, dict):
        return {k: _strip(v) for k, v in tree.items() if k != "items"}
    return tree


def _write_run(root, arm: str, seed: int, before: dict, after: dict) -> None:
    d = root / arm / f"seed-{seed}"
    write_json(d / "eval_before.json", before)
    write_json(d / "eval_after.json", after)
    write_json(d / "summary.json", {"status": "ok", "arm": arm, "seed": seed, "grid": {},
                                    "before": _strip(before), "after": _strip(after),
                                    "train": {}, "warnings": []})


@pytest.fixture
def tree(tmp_path):
    w = World()
    root = tmp_path / "exp"
    before = w.scores(0.0)
    for seed in (0, 1):
        ref = w.scores(1.0, seed)
        ref["wise"] = {"0.5": w.scores(0.5, seed)}
        _write_run(root, "ref", seed, before, ref)
        _write_run(root, "half", seed, before, w.scores(0.5, seed))  # on the reference's line
    analysis = AnalysisConfig(headline=["gen_nll"], reference_arm="ref", baseline_arm="ref",
                              n_boot=400)
    write_json(root / "analysis.json", {"headline": ["gen_nll"], "reference_arm": "ref",
                                        "baseline_arm": "ref", "n_boot": 400})
    return root, w, before, analysis


def test_run_rows_equal_direct_paired_statistics(tree):
    root, w, before, analysis = tree
    write_tables(root)
    rows = pd.read_csv(root / "summary.csv")
    r = rows[(rows.arm == "ref") & (rows.seed == 1)].iloc[0]
    rs = Resampler(400, 0)
    after = w.scores(1.0, 1)
    for m, role in (("task_nll", "task"), ("gen_nll", "general"), ("acc", "general")):
        d = paired_delta(before[role][m]["items"], [after[role][m]["items"]], rs, m)
        assert r[f"{m}_delta"] == pytest.approx(d["delta"], rel=1e-9, abs=1e-12)
        assert r[f"{m}_delta_lo"] == pytest.approx(d["lo"], rel=1e-9)
        assert r[f"{m}_delta_hi"] == pytest.approx(d["hi"], rel=1e-9)
        assert r[f"{m}_delta_lo"] <= r[f"{m}_delta"] <= r[f"{m}_delta_hi"]
    # McNemar counts by hand: flipped items of a 0/1 benchmark
    flipped = w.u < 0.2
    assert r["acc_lost"] == int(np.sum(flipped & (w.acc0 == 1)))
    assert r["acc_gained"] == int(np.sum(flipped & (w.acc0 == 0)))
    # task gain: the first task metric's improvement (NLL falls: positive)
    assert r["task_gain"] == pytest.approx(-r["task_nll_delta"])
    # std_forgetting by its definition: mean over general metrics of forgetting / base item SD
    sd_gen = item_sd(item_scores(before["general"]["gen_nll"]["items"]))
    sd_acc = item_sd(item_scores(before["general"]["acc"]["items"]))
    hand = (r["gen_nll_delta"] / sd_gen + (-r["acc_delta"]) / sd_acc) / 2
    assert r["std_forgetting"] == pytest.approx(hand, rel=1e-9)
    assert r["std_forgetting_n"] == 2
    assert r["gen_nll_forgetting"] == pytest.approx(r["gen_nll_delta"])  # lower is better


def test_points_and_matched_gain(tree):
    root, w, before, analysis = tree
    write_tables(root, analysis)
    pts = pd.read_csv(root / "points.csv")
    assert set(pts[pts.arm == "ref"].point) == {"final", "wise:0.5"}
    agg = pd.read_csv(root / "summary_agg.csv").set_index("arm")
    # 'half' is scored exactly like the reference's WiSE point: it lies on the curve, so its
    # excess forgetting at matched gain is 0 in every bootstrap replicate
    for f in ("std_forgetting", "gen_nll_forgetting"):
        assert agg.loc["half", f"excess_{f}"] == pytest.approx(0.0, abs=1e-12)
        assert agg.loc["half", f"excess_{f}_lo"] == pytest.approx(0.0, abs=1e-12)
        assert agg.loc["half", f"excess_{f}_hi"] == pytest.approx(0.0, abs=1e-12)
    assert agg.loc["half", "matched_in_range"] == 1.0
    # the reference's own final and WiSE-FT points are the curve: not compared with it
    assert "excess_std_forgetting" not in agg.columns or math.isnan(
        agg.loc["ref", "excess_std_forgetting"])
    # crossed bootstrap CI brackets the seed mean
    for a in ("ref", "half"):
        assert agg.loc[a, "task_gain_lo"] <= agg.loc[a, "task_gain_mean"] <= \
            agg.loc[a, "task_gain_hi"]
    # paired difference to the baseline arm: the point is the difference of the seed means,
    # and 'half' (half the amount) forgets less and learns less than 'ref', resolved by the CI
    for f in ("task_gain", "std_forgetting", "gen_nll_forgetting"):
        diff = agg.loc["half", f"vs_ref_{f}"]
        assert diff == pytest.approx(agg.loc["half", f"{f}_mean"] - agg.loc["ref", f"{f}_mean"],
                                     rel=1e-9, abs=1e-12)
        if f != "std_forgetting":  # (its accuracy part flips items both ways: not monotone)
            assert agg.loc["half", f"vs_ref_{f}_hi"] < 0
    assert "vs_ref_task_gain" not in agg.columns or math.isnan(agg.loc["ref", "vs_ref_task_gain"])
    # with two seeds the t-interval exists, and per-run CI bounds are not averaged
    assert math.isfinite(agg.loc["ref", "task_gain_ci95"])
    assert "task_gain_lo_mean" not in agg.columns


def test_every_column_is_documented(tree):
    root, *_ = tree
    write_tables(root)
    doc = read_json(root / "columns.json")
    assert set(doc) == {"metrics", "columns"}
    assert doc["metrics"]["gen_nll"]["role"] == "general"
    metrics = sorted(doc["metrics"], key=len, reverse=True)
    patterns = []
    for key in COLUMN_DOCS:
        rx = re.escape(key).replace(re.escape("<m>"), "(" + "|".join(map(re.escape, metrics))
                                     + ")")
        rx = rx.replace(re.escape("<f>"), r"[a-z_]+").replace(re.escape("<col>"), ".+")
        rx = rx.replace(re.escape("<b>"), r"[A-Za-z0-9._=@+-]+")
        patterns.append(re.compile(f"^{rx}$"))
    for f in ("summary.csv", "summary_agg.csv", "points.csv", "points_agg.csv"):
        for col in pd.read_csv(root / f).columns:
            assert any(p.match(col) for p in patterns), f"{f}: column {col!r} undocumented"


def test_runs_without_items_get_unpaired_columns_only(tmp_path):
    w = World()
    root = tmp_path / "old"
    before, after = _strip(w.scores(0.0)), _strip(w.scores(1.0))
    _write_run(root, "naive", 0, before, after)
    write_tables(root)
    row = pd.read_csv(root / "summary.csv").iloc[0]
    assert math.isfinite(row["gen_nll_delta"])
    assert "gen_nll_delta_lo" not in row and "std_forgetting" not in row


def test_different_items_before_and_after_get_no_paired_statistics(tmp_path, caplog):
    """A metric scored on other items after than before is never paired (a warning says why);
    the other metrics and the tables are still written."""
    w = World()
    root = tmp_path / "bad"
    before, after = w.scores(0.0), w.scores(1.0)
    after["general"]["acc"]["items"]["id"][0] = "999:other"
    _write_run(root, "naive", 0, before, after)
    with caplog.at_level("WARNING", logger="forgetkit"):
        write_tables(root)
    assert "acc: no paired statistics" in caplog.text and "different items" in caplog.text
    row = pd.read_csv(root / "summary.csv").iloc[0]
    assert "acc_delta_lo" not in row and math.isfinite(row["acc_delta"])
    assert math.isfinite(row["gen_nll_delta_lo"])


def test_agg_points_are_those_of_their_intervals(tree):
    """Where one seed lacks a metric's items, the crossed statistics leave that metric out for
    the arm; the agg point of every paired column is then the crossed one, inside its CI."""
    root, w, before, analysis = tree
    d = root / "half" / "seed-1"
    t = read_json(d / "eval_after.json")
    t["general"]["acc"]["items"]["mean_equals_value"] = False
    write_json(d / "eval_after.json", t)
    write_tables(root, analysis)
    a = pd.read_csv(root / "summary_agg.csv").set_index("arm").loc["half"]
    for c in ("std_forgetting", "task_gain", "gen_nll_forgetting"):
        assert a[f"{c}_lo"] <= a[f"{c}_mean"] <= a[f"{c}_hi"], c


def test_report_of_a_paired_tree(tree, tmp_path):
    """The report leads with the headline and paired CIs where per-item scores exist: the main
    table's cells are 'mean [lo, hi]', the comparison table holds the paired differences, the
    benchmark figure draws each change with its paired CI and names a metric no arm changed."""
    from forgetkit.report import build_report

    root, w, before, _ = tree
    # a general metric that no arm changes: every item the same before and after
    for d in root.glob("*/seed-*"):
        for f in ("eval_before.json", "eval_after.json"):
            t = read_json(d / f)
            pts = [t] + list((t.get("wise") or {}).values())
            for p in pts:
                p["general"]["flat"] = _rec(_acc_items(w.acc0), True)
            write_json(d / f, t)
        s = read_json(d / "summary.json")
        for p in [s["before"], s["after"], *(s["after"].get("wise") or {}).values()]:
            p["general"]["flat"] = _strip(_rec(_acc_items(w.acc0), True))
        write_json(d / "summary.json", s)
    write_tables(root)
    rep = build_report(root, tmp_path / "report")
    main = (tmp_path / "report" / "table_main.md").read_text()
    assert "| Arm | Task gain ↑ | Forgetting: gen_nll ↓ | Std. forgetting ↓ |" in main
    assert "paired bootstrap" in main and " [" in main.splitlines()[-1]
    comp = (tmp_path / "report" / "table_comparison.md").read_text()
    assert "Task gain − ref" in comp and "excess at matched gain" in comp
    # the baseline's own row: no differences to itself (n/a), its matched-gain excess is shown
    # when it has one (here it is the reference curve itself: n/a too)
    assert "| ref (n=2) | n/a | n/a |" in comp
    cap = next(f.caption for f in rep.figures if f.stem == "benchmarks")
    assert "paired bootstrap CI" in cap and "flat" in cap.split("Unchanged in every arm")[1]
    assert (tmp_path / "report" / "pareto.png").stat().st_size > 10_000


def test_matched_gain_ci_needs_the_gain_on_the_curve(tree):
    """An arm whose task gain lies at the top end of the reference curve falls off it in many
    replicates: its excess has a point value but no CI (it would be conditional)."""
    root, w, before, analysis = tree
    z = np.random.default_rng(3).normal(0.0, 2.0, N_NLL)
    for seed in (0, 1):
        # the curve's end point, with item noise that sums to slightly above 0 (so its gain is
        # just below the end's: on the curve) but moves it past the end in many replicates
        sc = w.scores(1.0, seed)
        it = sc["task"]["task_nll"]["items"]
        it["score"] = [v + c for v, c in zip(it["score"], z - z.mean() + 1e-3, strict=True)]
        sc["task"]["task_nll"] = _rec(it, False)
        _write_run(root, "top", seed, before, sc)
    write_tables(root, analysis)
    agg = pd.read_csv(root / "summary_agg.csv").set_index("arm")
    assert agg.loc["top", "matched_in_range"] < 0.95
    assert math.isfinite(agg.loc["top", "excess_std_forgetting"])
    assert math.isnan(agg.loc["top", "excess_std_forgetting_lo"])


def test_analysis_settings_are_checked_before_anything_runs(tmp_path):
    """A reference arm that is not an arm (typo), or has no WiSE-FT points, fails the plan's
    checks with a did-you-mean; one left out by --arms is only noted."""
    from conftest import tiny_config_dict

    from forgetkit.runner import analysis_checks, plan_runs

    raw = tiny_config_dict(tmp_path)
    raw["experiment"] = {"arms": [{"name": "naive"},
                                  {"name": "naive_wise",
                                   "overrides": {"evaluation.wise_alphas": [0.5]}}]}

    def checks(analysis, arms=None):
        base, runs = plan_runs({**raw, "analysis": analysis}, "test", arms=arms)
        return analysis_checks(base, runs)

    ok = checks({"reference_arm": "naive_wise"})
    assert all(c.ok for c in ok)
    bad = checks({"reference_arm": "naive_wis"})
    assert not bad[0].ok and "did you mean 'naive_wise'" in bad[0].problem
    nowise = checks({"reference_arm": "naive"})
    assert not nowise[0].ok and "wise_alphas" in nowise[0].problem
    left_out = checks({"reference_arm": "naive_wise"}, arms=["naive"])
    assert left_out[0].ok and "not run here" in left_out[0].what
