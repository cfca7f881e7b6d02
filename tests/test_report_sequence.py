"""The task-sequence report (forgetkit.report.sequence): tables equal independent recomputations
from the sequence files and root tables, figures are drawn, and `python -m forgetkit.report`
and `forgetkit.paper` route a sequence experiment to it."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

from forgetkit.config import ConfigError
from forgetkit.report import build_report
from forgetkit.report.loading import fmt
from forgetkit.report.sequence import (
    load_sequence,
    matrix_table,
    paper_outputs,
    sequence_tables,
)
from forgetkit.results.sequence import AGG_CSV, GENERAL_CSV, MATRIX_CSV

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = ROOT / "results" / "sequence_medical"


def _write(path: Path, rows: list[dict], cols: list[str]) -> None:
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def synthetic(tmp_path: Path) -> Path:
    """Two arms x two seeds of a 2-stage sequence (accuracy, higher is better), hand-made root
    tables; seed 1 of arm b lacks one cell (NaN: the mean is over the seed that has it)."""
    root = tmp_path / "seq"
    root.mkdir()
    r = {("a", 0): [[0.5, 0.2], [0.4, 0.7]], ("a", 1): [[0.7, 0.4], [0.2, 0.9]],
         ("b", 0): [[0.6, 0.3], [0.6, 0.8]], ("b", 1): [[0.6, 0.3], [math.nan, 0.6]]}
    base = [0.25, 0.1]
    rows = []
    for (arm, seed), m in r.items():
        for j, t in enumerate(("t1", "t2")):
            rows.append({"arm": arm, "seed": seed, "stage_index": -1, "stage": "base",
                         "task": t, "metric": f"{t}_acc", "value": base[j]})
        for i, row in enumerate(m):
            for j, v in enumerate(row):
                rows.append({"arm": arm, "seed": seed, "stage_index": i,
                             "stage": ("t1", "t2")[i], "task": ("t1", "t2")[j],
                             "metric": f"t{j + 1}_acc", "value": "" if math.isnan(v) else v})
    _write(root / MATRIX_CSV, rows, ["arm", "seed", "stage_index", "stage", "task", "metric",
                                     "value"])
    agg = [{"arm": "b", "n_seeds": 2, "final_average": 0.7, "bwt": -0.1, "bwt_lo": -0.3,
            "bwt_hi": 0.05, "fwt": 0.2, "vs_a_bwt": 0.1, "vs_a_bwt_lo": 0.02,
            "vs_a_bwt_hi": 0.2, "forgetting_t1": 0.1},
           {"arm": "a", "n_seeds": 2, "final_average": 0.55, "bwt": -0.3, "bwt_lo": -0.5,
            "bwt_hi": -0.1, "fwt": 0.2, "vs_a_bwt": 0.0, "vs_a_bwt_lo": 0.0, "vs_a_bwt_hi": 0.0,
            "forgetting_t1": 0.3}]
    _write(root / AGG_CSV, agg, list(agg[0]) + ["vs_a_fwt"])
    gen = [{"arm": a, "stage_index": i, "stage": s, "metric": "wiki_nll", "value": 3 + d,
            "delta": d, "delta_lo": d - 0.01, "delta_hi": d + 0.01}
           for a in ("a", "b") for i, s, d in ((-1, "base", 0.0), (0, "t1", 0.2), (1, "t2", 0.3))]
    _write(root / GENERAL_CSV, gen, list(gen[0]))
    (root / "analysis.json").write_text(json.dumps({"baseline_arm": "a", "confidence": 0.9}))
    return root


def test_synthetic_tables(synthetic: Path) -> None:
    res = load_sequence(synthetic)
    assert res.stages == ["t1", "t2"] and res.baseline == "a" and res.conf_pct == "90 %"
    base, m = res.mean_matrix("b")
    assert base == [0.25, 0.1]
    assert m[0] == pytest.approx([0.6, 0.3])
    assert m[1] == pytest.approx([0.6, 0.7])  # seed 1's missing cell is skipped, not a zero
    t = {x.name: x for x in sequence_tables(res)}
    main = t["sequence"]
    # arms in the report's order (naive first when present, then by name); the CI as given
    assert [r[0] for r in main.rows] == ["a (n=2)", "b (n=2)"]
    col = main.columns.index("bwt") + 1
    assert main.rows[0][col] == "-0.300 [-0.500, -0.100]"
    assert main.bold[1][col] and not main.bold[0][col]  # BWT: higher is better
    fcol = main.columns.index("forgetting_t1") + 1
    assert main.bold[1][fcol] and not main.bold[0][fcol]  # forgetting: lower is better
    fw = main.columns.index("fwt") + 1
    assert main.bold[0][fw] and main.bold[1][fw]  # ties all bold
    vs = t["sequence_vs"]
    assert [r[0] for r in vs.rows] == ["b (n=2)"]  # the baseline's own row (0) is left out
    assert vs.columns == ["vs_a_bwt"]  # an empty column (vs_a_fwt) is not a column
    assert vs.rows[0][1] == "0.100 [0.020, 0.200]"
    gt = t["sequence_general"]
    assert gt.headers[1:] == ["Δ wiki_nll after t1", "Δ wiki_nll after t2"]  # no meta: no arrow
    assert gt.rows[0] == ["a (n=2)", "0.200 [0.190, 0.210]", "0.300 [0.290, 0.310]"]
    mt = t["sequence_matrix"]
    assert mt.rows[0] == ["base model", "0.250", "0.100"]
    assert mt.rows[1:3] == [["a: after t1", "0.600", "0.300"], ["a: after t2", "0.300", "0.800"]]
    assert mt.bold[1] == [False, True, False] and mt.bold[2] == [False, False, True]


def test_synthetic_report_files(synthetic: Path, tmp_path: Path) -> None:
    out = tmp_path / "rep"
    rep = build_report(synthetic, out)  # routed: no summary.csv, a sequence_agg.csv
    assert {f.stem for f in rep.figures} == {"sequence_matrix", "sequence_transfer",
                                             "sequence_general"}
    assert rep.skipped == []
    for f in rep.figures:
        png = (out / f"{f.stem}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
        assert (out / f"{f.stem}.pdf").stat().st_size > 1_000
    index = (out / "index.md").read_text()
    for name in ("sequence", "sequence_vs", "sequence_general", "sequence_matrix"):
        assert f"table_{name}.md" in index and (out / f"table_{name}.tex").is_file()
    tex = (out / "table_sequence.tex").read_text()
    assert r"\textbf{-0.100 [-0.300, 0.050]}" in tex


def test_one_stage_has_no_transfer_figure(synthetic: Path, tmp_path: Path) -> None:
    rows = list(csv.DictReader((synthetic / AGG_CSV).open()))
    for r in rows:
        for k in list(r):
            if "bwt" in k or "fwt" in k:
                r[k] = ""
    _write(synthetic / AGG_CSV, rows, list(rows[0]))
    rep = build_report(synthetic, tmp_path / "rep")
    assert any(s.startswith("sequence_transfer:") for s in rep.skipped)


def test_not_a_sequence_results_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="sequence_agg.csv"):
        load_sequence(tmp_path)


def test_committed_study_tables_equal_recomputation(tmp_path: Path) -> None:
    """On the committed study: the matrix table equals R recomputed from every
    <arm>/seed-<s>/sequence.json (mean over seeds), and the main table's cells are the agg CSV's
    values; the paper outputs land where forgetkit.paper expects them."""
    res = load_sequence(COMMITTED)
    recs: dict[str, list[dict]] = {}
    for p in sorted(COMMITTED.glob("*/seed-*/sequence.json")):
        recs.setdefault(p.parent.parent.name, []).append(json.loads(p.read_text()))
    assert set(recs) == set(res.arms)
    mt = matrix_table(res)
    by_label = {r[0]: r[1:] for r in mt.rows}
    for arm, rs in recs.items():
        t = len(rs[0]["stages"])
        for i in range(t):
            want = [fmt(sum(x["R"][i][j] for x in rs) / len(rs), 3) for j in range(t)]
            assert by_label[f"{arm}: after {rs[0]['stages'][i]}"] == want
        assert by_label["base model"] == [fmt(v, 3) for v in rs[0]["base"]]
    agg = {r["arm"]: r for r in csv.DictReader((COMMITTED / AGG_CSV).open())}
    main = sequence_tables(res)[0]
    col = main.columns.index("bwt") + 1
    for row in main.rows:
        a = agg[row[0].split(" ")[0]]
        assert row[col] == (f"{fmt(float(a['bwt']), 3)} [{fmt(float(a['bwt_lo']), 3)}, "
                            f"{fmt(float(a['bwt_hi']), 3)}]")
    tables, figures = tmp_path / "tables", tmp_path / "figures"
    assert paper_outputs(COMMITTED, tables, figures) == []
    assert (tables / "table_sequence.md").is_file() and (figures / "sequence_matrix.png").is_file()
    only = tmp_path / "only_tables"
    paper_outputs(COMMITTED, only, None)
    assert (only / "table_sequence_matrix.tex").is_file()
    assert not (tmp_path / "figures2").exists()


def test_report_cli_on_a_copy(tmp_path: Path) -> None:
    from forgetkit.report import main

    root = tmp_path / "sequence_medical"
    shutil.copytree(COMMITTED, root)
    assert main([str(root)]) == 0
    assert (root / "report" / "index.md").read_text().startswith(
        "# Report: sequence_medical (task sequence)")
