"""CIs of a task sequence's measures (forgetkit.results.sequence_stats): the point equals the
matrix measures, the replicates equal an element-by-element recomputation from the resampled
items, pairing makes an arm identical to the baseline differ by exactly 0, and the tables carry
every column."""

from __future__ import annotations

import csv
import math

import numpy as np
import pytest

from forgetkit import results
from forgetkit.results import sequence as seq
from forgetkit.results.sequence_stats import load_sequence_items, measure_replicates
from forgetkit.results.stats import Resampler

STAGES = ["s0", "s1", "s2"]
METRICS = ["m0", "m1", "m2"]
N = 30  # items per task


def _items(rng: np.random.Generator, mean: float) -> dict:
    counts = rng.integers(1, 6, size=N)
    score = counts * (mean + rng.normal(0.0, 0.3, size=N))
    return {"stat": "ratio", "id": [f"{k}:x{k}" for k in range(N)], "score": score.tolist(),
            "count": counts.tolist()}


def _tree(items: dict[str, dict], general: dict[str, dict]) -> dict:
    def rec(it: dict) -> dict:
        value = float(np.sum(it["score"]) / np.sum(it["count"]))
        return {"value": value, "higher_is_better": False, "kind": "answer_nll", "items": it}

    return {"task": {m: rec(it) for m, it in items.items()},
            "general": {g: rec(it) for g, it in general.items()}}


def write_sequence(root, arm: str, seed: int, shift: float, rng_seed: int) -> None:
    """A 3-stage sequence with per-item scores: stage i lowers task i's NLL and raises the
    earlier tasks' by ``shift`` (forgetting), raises the general NLL."""
    rng = np.random.default_rng(rng_seed)
    base_items = {m: _items(rng, 2.0 + 0.2 * j) for j, m in enumerate(METRICS)}
    gen_base = {"wiki": _items(rng, 3.4)}
    d = root / arm / f"seed-{seed}"
    afters = []
    for i, stage in enumerate(STAGES):
        it = {}
        for j, m in enumerate(METRICS):
            b = base_items[m]
            delta = -1.0 if j == i else (shift * (i - j) if j < i else -0.1)
            noise = np.random.default_rng([rng_seed, i, j]).normal(0, 0.1, size=N)
            it[m] = {**b, "score": (np.asarray(b["score"]) + np.asarray(b["count"]) *
                                    (delta + noise)).tolist()}
        g = {"wiki": {**gen_base["wiki"], "score": (np.asarray(gen_base["wiki"]["score"]) +
                                                     np.asarray(gen_base["wiki"]["count"]) *
                                                     0.1 * (i + 1)).tolist()}}
        t = _tree(it, g)
        results.write_json(d / f"stage-{i}-{stage}" / "eval_after.json", t)
        afters.append(t)
    before = _tree(base_items, gen_base)
    results.write_json(d / "stage-0-s0" / "eval_before.json", before)
    rec = seq.sequence_record(STAGES, METRICS, before, afters)
    rec.update(arm=arm, seed=seed, dirs=[f"stage-{i}-{s}" for i, s in enumerate(STAGES)])
    results.write_json(d / seq.SEQUENCE_FILE, rec)


def read_csv(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_replicates_equal_a_recomputation_from_the_resampled_items(tmp_path):
    write_sequence(tmp_path, "naive", 0, 0.5, 1)
    rec = results.read_json(tmp_path / "naive" / "seed-0" / seq.SEQUENCE_FILE)
    rs = Resampler(200, 7)
    reps = measure_replicates(load_sequence_items(tmp_path / "naive" / "seed-0", rec), rs)
    assert reps is not None
    before = results.read_json(tmp_path / "naive/seed-0/stage-0-s0/eval_before.json")
    afters = [results.read_json(tmp_path / f"naive/seed-0/stage-{i}-{s}/eval_after.json")
              for i, s in enumerate(STAGES)]
    for b in (0, 57, 199):  # element by element, from the raw item lists
        def value(tree: dict, m: str, b: int = b) -> float:
            it = tree["task"][m]["items"]
            idx = rs.items(m, N)[b]
            return (sum(it["score"][k] for k in idx) / sum(it["count"][k] for k in idx))

        r = [[value(afters[i], m) for m in METRICS] for i in range(3)]
        base = [value(before, m) for m in METRICS]
        hib = [False] * 3
        assert reps["bwt"][b] == pytest.approx(seq.bwt(r, hib), rel=1e-12)
        assert reps["fwt"][b] == pytest.approx(seq.fwt(r, hib, base), rel=1e-12)
        assert reps["final_average"][b] == pytest.approx(seq.final_average(r, hib), rel=1e-12)
        assert reps["forgetting_s0"][b] == pytest.approx(seq.task_forgetting(r, hib)[0],
                                                         rel=1e-12)


def test_tables_points_cis_and_pairing(tmp_path):
    # naive and a copy of it (same items, same scores): the copy's difference is exactly 0 in
    # every replicate, while its own CI is as wide as naive's; an arm that forgets less has a
    # higher BWT than naive.
    write_sequence(tmp_path, "naive", 0, 0.5, 1)
    write_sequence(tmp_path, "copy", 0, 0.5, 1)
    write_sequence(tmp_path, "kind", 0, 0.1, 1)
    results.write_json(tmp_path / "analysis.json", {"n_boot": 400, "boot_seed": 3})
    assert seq.write_sequence_tables(tmp_path) == 3
    per_seed = {r["arm"]: r for r in read_csv(tmp_path / seq.SUMMARY_CSV)}
    agg = {r["arm"]: r for r in read_csv(tmp_path / seq.AGG_CSV)}
    for arm in ("naive", "copy", "kind"):
        rec = results.read_json(tmp_path / arm / "seed-0" / seq.SEQUENCE_FILE)
        for m in ("bwt", "fwt", "final_average", "learning_accuracy"):
            assert float(per_seed[arm][m]) == pytest.approx(rec[m], rel=1e-12)
            lo, hi = float(per_seed[arm][f"{m}_lo"]), float(per_seed[arm][f"{m}_hi"])
            assert lo < rec[m] < hi
            assert float(agg[arm][m]) == pytest.approx(rec[m], rel=1e-12)
        assert agg[arm]["n_seeds"] == "1"
    assert float(per_seed["copy"]["vs_naive_bwt"]) == 0.0
    c = per_seed["copy"]
    assert float(c["vs_naive_bwt_lo"]) == float(c["vs_naive_bwt_hi"]) == 0.0
    assert float(per_seed["copy"]["bwt_hi"]) > float(per_seed["copy"]["bwt_lo"])
    # "kind" forgets 0.1 instead of 0.5 per later stage: a higher BWT, resolved by the pairing
    assert float(per_seed["kind"]["vs_naive_bwt_lo"]) > 0
    assert "vs_naive_bwt" not in per_seed["naive"] or per_seed["naive"]["vs_naive_bwt"] == ""
    gen = read_csv(tmp_path / seq.GENERAL_CSV)
    rows = [r for r in gen if r["arm"] == "naive" and r["metric"] == "wiki"]
    assert [int(r["stage_index"]) for r in rows] == [-1, 0, 1, 2]
    for r in rows[1:]:  # a constant shift of 0.1 per stage on every item: CI collapses onto it
        d = 0.1 * (int(r["stage_index"]) + 1)
        assert float(r["delta"]) == pytest.approx(d, rel=1e-9)
        assert float(r["delta_lo"]) == pytest.approx(d, rel=1e-9)
        assert float(r["delta_hi"]) == pytest.approx(d, rel=1e-9)


def test_two_seeds_are_crossed_with_the_items(tmp_path):
    write_sequence(tmp_path, "naive", 0, 0.5, 1)
    write_sequence(tmp_path, "naive", 1, 0.3, 2)
    results.write_json(tmp_path / "analysis.json", {"n_boot": 300})
    seq.write_sequence_tables(tmp_path)
    per_seed = read_csv(tmp_path / seq.SUMMARY_CSV)
    (agg,) = read_csv(tmp_path / seq.AGG_CSV)
    assert agg["n_seeds"] == "2"
    mean = (float(per_seed[0]["bwt"]) + float(per_seed[1]["bwt"])) / 2
    assert float(agg["bwt"]) == pytest.approx(mean, rel=1e-12)
    # the seeds differ by far more than the items' noise: the crossed interval is wider than
    # either seed's item interval
    width = float(agg["bwt_hi"]) - float(agg["bwt_lo"])
    assert all(width > float(r["bwt_hi"]) - float(r["bwt_lo"]) for r in per_seed)


def test_without_items_the_measures_have_no_ci(tmp_path):
    write_sequence(tmp_path, "naive", 0, 0.5, 1)
    for p in (tmp_path / "naive" / "seed-0").glob("stage-*/eval_after.json"):
        t = results.read_json(p)
        for rec in t["task"].values():
            rec.pop("items")
        results.write_json(p, t)
    seq.write_sequence_tables(tmp_path)
    (row,) = read_csv(tmp_path / seq.SUMMARY_CSV)
    assert row["bwt"] != "" and not math.isnan(float(row["bwt"]))
    assert row["bwt_lo"] == row["bwt_hi"] == ""


def _rewrite_items(root, arm: str, fn) -> None:
    """Apply ``fn(items) -> items`` to every task metric's items of an arm's stage files."""
    for p in (root / arm / "seed-0").glob("stage-*/eval_*.json"):
        t = results.read_json(p)
        for rec in t["task"].values():
            rec["items"] = fn(rec["items"])
        results.write_json(p, t)


def test_arms_are_paired_by_item_id_not_by_position(tmp_path, caplog):
    """A copy of naive whose files list the items in reverse order is still paired item by
    item (its difference is exactly 0 in every replicate); an arm scored on other items gets no
    CI and a warning instead of a comparison of different items."""
    write_sequence(tmp_path, "naive", 0, 0.5, 1)
    write_sequence(tmp_path, "reversed", 0, 0.5, 1)
    write_sequence(tmp_path, "other", 0, 0.5, 1)
    _rewrite_items(tmp_path, "reversed", lambda it: {k: v[::-1] if isinstance(v, list) else v
                                                     for k, v in it.items()})
    _rewrite_items(tmp_path, "other", lambda it: {**it, "id": [f"z{i}" for i in it["id"]]})
    results.write_json(tmp_path / "analysis.json", {"n_boot": 300, "boot_seed": 3})
    with caplog.at_level("WARNING", logger="forgetkit"):
        assert seq.write_sequence_tables(tmp_path) == 3
    per_seed = {r["arm"]: r for r in read_csv(tmp_path / seq.SUMMARY_CSV)}
    r = per_seed["reversed"]
    assert float(r["vs_naive_bwt"]) == float(r["vs_naive_bwt_lo"]) == \
        float(r["vs_naive_bwt_hi"]) == 0.0
    assert r["bwt_lo"] == per_seed["naive"]["bwt_lo"]  # the same items drawn: the same CI
    o = per_seed["other"]
    assert o["bwt"] != "" and o["bwt_lo"] == o["bwt_hi"] == "" and o["vs_naive_bwt_lo"] == ""
    assert "other seed 0 was scored on other items" in caplog.text


def test_forgetting_with_a_nan_in_its_window_is_nan():
    hib = [True, True]
    # R[0][0] or R[1][0] unknown: task 0's best earlier value is unknown, whatever its position
    for r in ([[math.nan, 0.1], [0.5, 0.2], [0.4, 0.3]], [[1.0, 0.1], [math.nan, 0.2],
                                                        [0.4, 0.3]]):
        r3 = [row + [0.0] for row in r]
        assert math.isnan(seq.task_forgetting(r3, hib + [True])[0])
    assert seq.task_forgetting([[1.0, 0.0, 0.0], [0.8, 1.0, 0.0], [0.5, 0.9, 1.0]],
                               [True] * 3) == pytest.approx([0.5, 0.1])
