"""forgetkit.paper: numbers in the text checked against the regenerated tables, table blocks,
links, --fill, --compare, and the shipped template against a synthetic results tree."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from test_report import T2, make_tree

from forgetkit.paper import (
    check_text,
    compare,
    fill_lines,
    generate,
    load_all,
    main,
    update_tables,
)
from forgetkit.results.summary import write_tables

ROOT = Path(__file__).resolve().parents[1]
CI_GAIN = T2 * 0.01 / 3 ** 0.5  # naive task gain 0.10, 0.11, 0.12


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("res")
    make_tree(root / "ewc_medical")
    return root


@pytest.fixture(scope="module")
def results(results_dir: Path) -> dict:
    return load_all(results_dir, ["ewc_medical"])


GOOD = f"""# Results
Naive gained <!-- fk: ewc_medical/naive/task_gain_mean -->0.110 ± {CI_GAIN:.3f} and forgot
<!-- fk: ewc_medical/naive/mean_rel_forgetting_mean -->0.12 of its score, i.e.
<!-- fk: ewc_medical/naive/mean_rel_forgetting_mean x100 -->12.0 %; EWC at λ = 1000 forgot
<!-- fk: ewc_medical/ewc@lambda=1000.0/mean_rel_forgetting_mean -->0.008 over
<!-- fk: ewc_medical/ewc@lambda=1000.0/n_seeds -->3 seeds
(l2: <!-- fk: ewc_medical/l2/n_seeds -->2).
Delta: <!-- fk: ewc_medical/naive/med_nll_delta_mean -->−0.50 nats.

![pareto](tables/ewc_medical/table_main.md)

```
<!-- fk: ewc_medical/naive/task_gain_mean -->9.99 (in a code block: ignored)
```

<!-- fk-table: ewc_medical/main -->
<!-- /fk-table -->
"""


def _paper(tmp_path: Path, results: dict, text: str) -> Path:
    generate(results, tmp_path, figures=False)
    (tmp_path / "paper.md").write_text(update_tables(text, results))
    return tmp_path


def test_consistent_text_passes(results: dict, tmp_path: Path) -> None:
    p = _paper(tmp_path, results, GOOD)
    text = (p / "paper.md").read_text()
    assert "| **naive (n=3)** |" not in text and "| naive (n=3) | **0.110" in text
    assert check_text(text, results, p) == []


@pytest.mark.parametrize("bad, needle", [
    ("-->0.110 ± ", "-->0.111 ± "),                       # mean off by one digit
    ("-->0.12 of", "-->0.13 of"),                         # 2 decimals: 0.12 ok, 0.13 not
    ("x100 -->12.0 %", "x100 -->12.5 %"),                 # percent
    (f"± {CI_GAIN:.3f}", "± 0.010"),                      # the CI
    ("/n_seeds -->3 seeds", "/n_seeds -->2 seeds"),
    ("-->−0.50 nats", "-->0.50 nats"),                    # sign (unicode minus accepted)
])
def test_wrong_number_fails(results: dict, tmp_path: Path, bad: str, needle: str) -> None:
    assert bad in GOOD
    p = _paper(tmp_path, results, GOOD.replace(bad, needle, 1))
    problems = check_text((p / "paper.md").read_text(), results, p)
    assert len(problems) == 1, problems
    assert "ewc_medical/" in str(problems[0]) and "paper.md:" in str(problems[0])


def test_other_problems_reported(results: dict, tmp_path: Path) -> None:
    text = ("<!-- fk: ewc_medical/nave/task_gain_mean -->0.1\n"
            "<!-- fk: ewc_medical/naive/no_such_col -->0.1\n"
            "<!-- fk: other/naive/task_gain_mean -->0.1\n"
            "<!-- fk: ewc_medical/naive/task_gain_mean --> about a tenth\n"
            "![x](figures/ewc_medical/missing.png)\n"
            "<!-- fk-table: ewc_medical/main -->\n| stale |\n<!-- /fk-table -->\n")
    problems = [str(p) for p in check_text(text, results, tmp_path)]
    assert len(problems) == 6, problems
    assert "unknown arm 'nave'" in problems[0] and "paper.md:1:" in problems[0]
    assert "no column 'no_such_col'" in problems[1]
    assert "unknown experiment 'other'" in problems[2]
    assert "no number" in problems[3]
    assert "differs from the regenerated table" in problems[4]
    assert "missing.png: file does not exist" in problems[5]


def test_cli_check_and_exit_status(results_dir: Path, results: dict, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    p = _paper(tmp_path / "paper", results, GOOD)
    args = ["--results", str(results_dir), "--paper", str(p), "--no-figures",
            "--experiments", "ewc_medical"]
    assert main(args) == 0
    assert "paper check passed" in capsys.readouterr().err
    (p / "paper.md").write_text((p / "paper.md").read_text().replace("-->0.12 of",
                                                                      "-->0.19 of"))
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "MISMATCH paper.md:3: ewc_medical/naive/mean_rel_forgetting_mean: text says 0.19" in err
    assert "FAILED: 1 problem" in err
    assert main(["--results", str(tmp_path / "nope"), "--paper", str(p)]) == 2


def test_fill(results: dict) -> None:
    lines = fill_lines(results)
    want = (f"ewc_medical/naive/task_gain: <!-- fk: ewc_medical/naive/task_gain_mean -->0.110 ± "
            f"{CI_GAIN:.3f}")
    assert want in lines
    assert "ewc_medical/l2/n_seeds: <!-- fk: ewc_medical/l2/n_seeds -->2" in lines
    # every filled line passes the check
    assert check_text("\n".join(ln.split(": ", 1)[1] for ln in lines), results) == []


def test_compare(results_dir: Path, results: dict, tmp_path: Path) -> None:
    new = tmp_path / "new"
    shutil.copytree(results_dir / "ewc_medical", new / "ewc_medical")
    assert compare(new, results) == []
    s = new / "ewc_medical" / "naive" / "seed-0" / "summary.json"
    d = json.loads(s.read_text())
    d["after"]["task"]["medqa"]["value"] = 0.60  # naive task gain 0.30 instead of 0.10
    s.write_text(json.dumps(d))
    write_tables(new / "ewc_medical")
    moved = compare(new, results)
    assert any(m.startswith("ewc_medical/naive/task_gain:") for m in moved), moved
    assert all("/naive/" in m for m in moved), moved
    shutil.rmtree(new / "ewc_medical" / "replay")
    write_tables(new / "ewc_medical")
    assert "ewc_medical/replay: arm missing from the new results" in compare(new, results)
    assert main(["--results", str(results_dir), "--experiments", "ewc_medical",
                 "--compare", str(new)]) == 1


def test_shipped_paper_figure_links_and_tables_fill(results_dir: Path, tmp_path: Path) -> None:
    """paper/paper.md: its figure links match the generated names and its table blocks fill
    (against the synthetic tree; number markers are checked by the next test)."""
    p = tmp_path / "paper"
    p.mkdir()
    text = (ROOT / "paper" / "paper.md").read_text()
    text = re.sub(r"<!-- fk: [^>]*-->", "", text)  # the real numbers belong to real results
    # the synthetic suite has no general NLL metric, so no per-metric Pareto (that one is
    # checked against the committed results below and in test_report)
    text = re.sub(r"!\[[^]]*\]\(figures/ewc_medical/pareto_wiki_nll\.png\)", "", text)
    # the paired v2-v4 studies (per-item scores) are checked against the committed results below and
    # in test_summary_stats; this synthetic tree has none
    text = re.sub(r"!\[[^]]*\]\(figures/(ewc_medical_v[234]|sequence_medical)/[^)]*\)", "", text)
    text = re.sub(r"<!-- fk-table: (ewc_medical_v[234]|sequence_medical)/\w+ -->.*?"
                  r"<!-- /fk-table -->", "", text, flags=re.S)
    (p / "paper.md").write_text(text)
    shutil.copytree(results_dir / "ewc_medical", tmp_path / "res" / "ewc_medical")
    # the sweep: the synthetic tree plus an L2 grid (a copy of its EWC grid arms, renamed)
    sweep = tmp_path / "res" / "ewc_medical_sweep"
    shutil.copytree(results_dir / "ewc_medical", sweep)
    for d in sorted(sweep.glob("ewc@lambda=*")):
        l2 = sweep / d.name.replace("ewc@", "l2@")
        shutil.copytree(d, l2)
        for f in l2.glob("seed-*/summary.json"):
            rec = json.loads(f.read_text())
            f.write_text(json.dumps({**rec, "arm": l2.name}))
    write_tables(sweep)
    assert main(["--results", str(tmp_path / "res"), "--paper", str(p), "--update",
                 "--experiments", "ewc_medical,ewc_medical_sweep"]) == 0
    text = (p / "paper.md").read_text()
    assert "| naive (n=3) |" in text
    for f in ("pareto", "benchmarks", "curves", "drift", "fisher"):
        assert (p / "figures" / "ewc_medical" / f"{f}.pdf").exists()
    for f in ("sweep_l2_lambda", "sweep_ewc_lambda"):
        assert (p / "figures" / "ewc_medical_sweep" / f"{f}.png").exists()
    assert (p / "tables" / "ewc_medical" / "table_main.tex").exists()


def test_committed_paper_matches_committed_results(tmp_path: Path) -> None:
    """What `make paper` checks: every number in paper/paper.md equals the table regenerated
    from the committed results/ (run on a copy, so the check never rewrites the repository)."""
    from forgetkit.paper import EXPERIMENTS

    missing = [e for e in EXPERIMENTS if not any(
        (ROOT / "results" / e / f).exists() for f in ("summary_agg.csv", "sequence_agg.csv"))]
    assert not missing, f"the paper's results are not committed: {missing}"
    p = tmp_path / "paper"
    shutil.copytree(ROOT / "paper", p)
    # tables regenerated and compared with the fk-table blocks, every marked number checked,
    # every figure link resolved (the committed figures; --no-figures keeps the test fast)
    assert main(["--results", str(ROOT / "results"), "--paper", str(p), "--no-figures"]) == 0


def test_every_marker_of_a_line_is_checked(results: dict, tmp_path: Path) -> None:
    """Several markers on one line (a value and its interval bounds): each is checked, not only
    the first (the marker's text once ran to the end of the line and swallowed the others)."""
    lines = [ln.split(": ", 1)[1] for ln in fill_lines(results)]
    one_line = " and ".join(lines[:3])
    assert check_text(one_line, results) == []
    last = lines[2]
    num = last.split("-->", 1)[1].split()[0]
    wrong = last.replace(f"-->{num}", "-->" + ("9" if not num.startswith("9") else "8") + num[1:], 1)
    problems = check_text(" and ".join([*lines[:2], wrong]), results)
    assert len(problems) == 1 and "paper.md:1:" in str(problems[0]), problems


def test_sequence_markers_seed_rows_general_cells_and_table_blocks(tmp_path: Path) -> None:
    """A sequence experiment's markers: arm cells of sequence_agg.csv, per-seed rows of
    sequence_summary.csv (``<arm>@seed-<s>``), general-suite deltas of sequence_general.csv
    (``general_<metric>_s<k>``), each read back independently from the CSVs; its tables embed
    as fk-table blocks and a wrong number or unknown seed is reported."""
    import csv

    from forgetkit.report import fmt

    root = tmp_path / "results"
    shutil.copytree(ROOT / "results" / "sequence_medical", root / "sequence_medical")
    res = load_all(root, ["sequence_medical"])
    with (root / "sequence_medical" / "sequence_summary.csv").open() as fh:
        seed_row = next(r for r in csv.DictReader(fh) if r["arm"] != "naive")
    with (root / "sequence_medical" / "sequence_general.csv").open() as fh:
        g = next(r for r in csv.DictReader(fh) if int(r["stage_index"]) == 1)
    arm_seed = f"{seed_row['arm']}@seed-{seed_row['seed']}"
    text = (f"BWT <!-- fk: sequence_medical/{arm_seed}/vs_naive_bwt -->"
            f"{fmt(float(seed_row['vs_naive_bwt']), 3)}; Δ <!-- fk: sequence_medical/"
            f"{g['arm']}/general_{g['metric']}_s1 -->{fmt(float(g['delta']), 3)} "
            f"[<!-- fk: sequence_medical/{g['arm']}/general_{g['metric']}_s1_hi -->"
            f"{fmt(float(g['delta_hi']), 3)}]\n\n<!-- fk-table: sequence_medical/sequence_vs -->\n"
            "<!-- /fk-table -->\n")
    paper = tmp_path / "paper"
    paper.mkdir()
    filled = update_tables(text, res)
    assert "| Arm |" in filled  # the block was filled from the generated table
    assert check_text(filled, res) == []
    bad = filled.replace(f"{arm_seed}/vs_naive_bwt -->", f"{arm_seed}/vs_naive_bwt -->9", 1)
    assert len(check_text(bad, res)) == 1
    unknown = check_text("<!-- fk: sequence_medical/naive@seed-9/bwt -->0.1", res)
    assert len(unknown) == 1 and "unknown arm and seed" in str(unknown[0])
    edited = filled.replace("| Arm |", "| Arms |", 1)
    assert any("differs" in str(m) for m in check_text(edited, res))
