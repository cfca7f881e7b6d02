"""``python -m forgetkit.paper``: regenerate the paper's tables and figures from the committed
result summaries and check that every number written in ``paper/paper.md`` matches them.

Inputs (all small, committed): ``results/<experiment>/summary.csv``, ``summary_agg.csv``,
``columns.json``, ``train_curves.json`` (downsampled training curves, written by
``python -m forgetkit.report``) and per run ``<arm>/seed-<s>/drift.json`` /
``fisher_summary.json``. Outputs: ``paper/tables/<experiment>/table_{main,benchmarks,deltas}.
{md,tex}`` and ``paper/figures/<experiment>/*.{png,pdf}`` (the names of forgetkit.report).

Numbers in the text
-------------------
Every number taken from the results is written right after a marker naming its table cell::

    naive fine-tuning forgot <!-- fk: ewc_medical/naive/mean_forgetting_mean -->0.070 points
    EWC forgot <!-- fk: ewc_medical/ewc@lambda=1000.0/mean_forgetting_mean -->0.005 ± 0.002
    i.e. <!-- fk: ewc_medical/naive/mean_forgetting_mean x100 -->7.0 % of ...

The key is ``<experiment>/<arm>/<column of summary_agg.csv>`` (or ``<arm>#<point>`` for a row
of ``points_agg.csv``: ``naive_merged#wise:0.5``, ``naive_merged#merge:layerwise_0-1``); the number must equal the cell
rounded to the number of decimals written (tolerance: half a unit of the last printed digit).
After a ``*_mean`` key an optional ``± <ci>`` is checked against the matching ``*_ci95``. The
option ``x100`` scales the cell first (percentages). Markers inside fenced code blocks are
ignored. A whole generated table can be embedded between ``<!-- fk-table: <experiment>/<name>
-->`` and ``<!-- /fk-table -->``; the block must equal ``paper/tables/<experiment>/table_<name>.md``
(``--update`` rewrites such blocks). Every image or link target under ``figures/`` or ``tables/``
must exist. Any mismatch is listed and the exit status is 1.

Other modes::

    --fill                 print the marker and number of every table cell, to paste
    --compare NEW_RESULTS  compare NEW_RESULTS/<experiment>/summary_agg.csv with the committed
                           one: every mean that moved beyond its committed 95 % CI (exit 1 if any)
    --no-figures           tables and checks only
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetkit.cli import guarded
from forgetkit.config import ConfigError
from forgetkit.report import (
    Results,
    _as_float,
    fmt,
    load_curves,
    load_results,
    make_figures,
    precision,
    tables,
    to_markdown,
    write_tables,
)

# The paper's experiments: the main comparison and the lambda sweep behind its lambdas, the
# one-seed studies with per-item statistics (v2; v3: the cloze suite with more items; v4:
# numerics v3, with LoRA and freezing on that suite) and the task-sequence study.
EXPERIMENTS = ["ewc_medical", "ewc_medical_sweep", "ewc_medical_v2", "ewc_medical_v3",
               "ewc_medical_v4", "sequence_medical"]
# Not compared by --compare: they depend on the machine, not on the method.
VOLATILE = {"train_time_s", "n_seeds"}

MARKER = re.compile(r"<!--\s*fk:\s*(?P<key>\S+?)(?:\s+(?P<opt>x100))?\s*-->(?P<text>[^\n<]*)")
NUMBER = re.compile(r"\s*(?P<num>[-+−]?\d+(?:\.\d+)?)"
                    r"(?:\s*(?:±|\$\\pm\$|\\pm|\+/-)\s*(?P<ci>\d+(?:\.\d+)?))?")
TABLE_BLOCK = re.compile(r"<!--\s*fk-table:\s*(?P<key>\S+)\s*-->\n(?P<body>.*?)"
                         r"<!--\s*/fk-table\s*-->", re.S)
LINK = re.compile(r"!?\[[^\]]*\]\((?P<target>(?:figures|tables)/[^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


@dataclass
class Mismatch:
    line: int
    what: str

    def __str__(self) -> str:
        return f"paper.md:{self.line}: {self.what}"


@dataclass
class SequenceTables:
    """A task-sequence experiment's tables. Marker keys ``<experiment>/<arm>/<column>``:

    * ``<arm>`` an arm, ``<column>`` a column of ``sequence_agg.csv`` (``sequence_medical/naive/
      bwt``), or ``general_<metric>_s<k>`` (``_lo``/``_hi``): the general metric's change from the
      base model after stage k, from ``sequence_general.csv``;
    * ``<arm>@seed-<s>``: that seed's row of ``sequence_summary.csv``
      (``sequence_medical/replay@seed-1/vs_naive_bwt``)."""

    root: Path
    agg: dict[str, dict[str, Any]]
    points: list[dict[str, Any]] = field(default_factory=list)
    seeds: dict[str, dict[str, Any]] = field(default_factory=dict)


def load_sequence_tables(root: Path) -> SequenceTables:
    import csv

    from forgetkit.results.sequence import AGG_CSV, GENERAL_CSV, SUMMARY_CSV

    def rows(name: str) -> list[dict[str, str]]:
        if not (root / name).exists():
            return []
        with (root / name).open() as fh:
            return list(csv.DictReader(fh))

    agg = {r["arm"]: r for r in rows(AGG_CSV)}
    for r in rows(GENERAL_CSV):
        k = int(r["stage_index"])
        if r["arm"] in agg and k >= 0:
            for col, suffix in (("delta", ""), ("delta_lo", "_lo"), ("delta_hi", "_hi")):
                agg[r["arm"]][f"general_{r['metric']}_s{k}{suffix}"] = r[col]
    seeds = {f"{r['arm']}@seed-{r['seed']}": r for r in rows(SUMMARY_CSV)}
    return SequenceTables(root, agg, seeds=seeds)


def _decimals(num: str) -> int:
    return len(num.split(".")[1]) if "." in num else 0


def _matches(written: str, value: float, scale: float = 1.0) -> bool:
    d = _decimals(written)
    w = float(written.replace("−", "-"))
    return abs(w - value * scale) <= 0.5 * 10 ** -d * (1 + 1e-9) + 1e-12


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def _blank_fences(text: str) -> str:
    """Code blocks replaced by blank lines of equal length (line numbers stay right)."""
    return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), text)


def _cell(results: dict[str, Results], key: str) -> tuple[float | None, str | None]:
    """(value, error) of ``<experiment>/<arm>/<column>``."""
    parts = key.split("/")
    if len(parts) < 3:
        return None, f"marker key {key!r}: expected <experiment>/<arm>/<column>"
    exp, col, arm = parts[0], parts[-1], "/".join(parts[1:-1])
    if exp not in results:
        return None, f"{key}: unknown experiment {exp!r} (known: {sorted(results)})"
    res = results[exp]
    if "#" in arm:  # <arm>#<point>: a row of points_agg.csv (a WiSE-FT alpha, a merge)
        a, _, point = arm.partition("#")
        rows = [r for r in res.points if str(r.get("arm")) == a and str(r.get("point")) == point]
        if not rows:
            known = sorted(f"{r.get('arm')}#{r.get('point')}" for r in res.points)
            return None, f"{key}: unknown point {arm!r} (points: {known})"
        row, where = rows[0], f"{exp}/points_agg.csv"
    elif isinstance(res, SequenceTables) and "@seed-" in arm:
        if arm not in res.seeds:
            return None, f"{key}: unknown arm and seed {arm!r} (known: {sorted(res.seeds)})"
        row, where = res.seeds[arm], f"{exp}/sequence_summary.csv"
    elif arm not in res.agg:
        return None, f"{key}: unknown arm {arm!r} (arms: {list(res.agg)})"
    else:
        row = res.agg[arm]
        where = f"{exp}/{'sequence_agg' if isinstance(res, SequenceTables) else 'summary_agg'}.csv"
    if col not in row:
        return None, f"{key}: no column {col!r} in {where}"
    v = _as_float(row[col])
    if v is None:
        return None, f"{key}: the table cell is empty (NaN)"
    return v, None


def check_text(text: str, results: dict[str, Results], paper_dir: Path | None = None
               ) -> list[Mismatch]:
    """Every marker's number, every embedded table and every figure/table link of ``text``."""
    out: list[Mismatch] = []
    body = _blank_fences(text)
    for m in MARKER.finditer(body):
        line, key = _line_of(body, m.start()), m.group("key")
        scale = 100.0 if m.group("opt") == "x100" else 1.0
        n = NUMBER.match(m.group("text"))
        if n is None:
            out.append(Mismatch(line, f"{key}: no number right after the marker"))
            continue
        v, err = _cell(results, key)
        if err:
            out.append(Mismatch(line, err))
            continue
        assert v is not None
        num = n.group("num")
        if not _matches(num, v, scale):
            d = _decimals(num)
            out.append(Mismatch(line, f"{key}: text says {num}, table has "
                                      f"{v * scale:.{max(d, 1) + 2}f} (rounds to "
                                      f"{v * scale:.{d}f})"))
        ci = n.group("ci")
        if ci is not None:
            if not key.endswith("_mean"):
                out.append(Mismatch(line, f"{key}: '± CI' is only checked after a *_mean key"))
                continue
            cv, err = _cell(results, key[: -len("_mean")] + "_ci95")
            if err:
                out.append(Mismatch(line, err))
            elif cv is not None and not _matches(ci, cv, scale):
                out.append(Mismatch(line, f"{key}: text says ± {ci}, table has ± "
                                          f"{cv * scale:.{_decimals(ci)}f}"))
    gen = _generated_tables(results)
    for m in TABLE_BLOCK.finditer(body):
        key, line = m.group("key"), _line_of(body, m.start())
        if key not in gen:
            out.append(Mismatch(line, f"fk-table {key!r}: no such table (known: {sorted(gen)})"))
        elif m.group("body").strip() != gen[key].strip():
            out.append(Mismatch(line, f"fk-table {key}: differs from the regenerated table "
                                      "(python -m forgetkit.paper --update rewrites it)"))
    if paper_dir is not None:
        for m in LINK.finditer(body):
            if not (paper_dir / m.group("target")).exists():
                out.append(Mismatch(_line_of(body, m.start()),
                                    f"{m.group('target')}: file does not exist"))
    return out


def _generated_tables(results: dict[str, Results]) -> dict[str, str]:
    from forgetkit.report.sequence import load_sequence, sequence_tables

    out = {}
    for exp, res in results.items():
        ts = (sequence_tables(load_sequence(res.root)) if isinstance(res, SequenceTables)
              else tables(res))
        out.update({f"{exp}/{t.name}": to_markdown(t) for t in ts})
    return out


def update_tables(text: str, results: dict[str, Results]) -> str:
    gen = _generated_tables(results)

    def repl(m: re.Match[str]) -> str:
        key = m.group("key")
        if key not in gen:
            return m.group(0)
        return f"<!-- fk-table: {key} -->\n{gen[key]}<!-- /fk-table -->"
    return TABLE_BLOCK.sub(repl, text)


def fill_lines(results: dict[str, Results]) -> list[str]:
    """``<exp>/<arm>/<column>: <marker><mean> ± <ci>`` for every aggregated cell."""
    lines = []
    for exp, res in results.items():
        if isinstance(res, SequenceTables):  # every column: the measures and their CI bounds
            for arm, a in res.agg.items():
                for col, v in a.items():
                    x = _as_float(v)
                    if col != "arm" and x is not None:
                        lines.append(f"{exp}/{arm}/{col}: <!-- fk: {exp}/{arm}/{col} -->"
                                     f"{fmt(x, 3)}")
            continue
        for arm, a in res.agg.items():
            for col in a:
                if not col.endswith("_mean") or col.startswith("grid:"):
                    continue
                base = col[: -len("_mean")]
                d = precision(base)
                m, h = _as_float(a[col]), _as_float(a.get(base + "_ci95"))
                if m is None:
                    continue
                ci = f" ± {fmt(h, d)}" if h is not None else ""
                lines.append(f"{exp}/{arm}/{base}: <!-- fk: {exp}/{arm}/{col} -->{fmt(m, d)}{ci}")
            lines.append(f"{exp}/{arm}/n_seeds: <!-- fk: {exp}/{arm}/n_seeds -->"
                         f"{fmt(a.get('n_seeds'), 0)}")
    return lines


def compare(new_root: Path, old: dict[str, Results]) -> list[str]:
    """Every aggregated mean of the committed tables that the new results moved beyond the
    committed 95 % CI (or, without a CI, beyond the printed precision); missing arms too."""
    moved = []
    for exp, res in old.items():
        if isinstance(res, SequenceTables):
            continue  # one seed committed: nothing to compare a CI over seeds with
        try:
            new = load_results(new_root / exp)
        except ConfigError as e:
            moved.append(f"{exp}: no new results ({e})")
            continue
        for arm, a in res.agg.items():
            if arm not in new.agg:
                moved.append(f"{exp}/{arm}: arm missing from the new results")
                continue
            b = new.agg[arm]
            for col in a:
                if not col.endswith("_mean") or col.startswith("grid:"):
                    continue
                base = col[: -len("_mean")]
                if base in VOLATILE:
                    continue
                m0, h0 = _as_float(a[col]), _as_float(a.get(base + "_ci95"))
                m1 = _as_float(b.get(col))
                if m0 is None:
                    continue
                if m1 is None:
                    moved.append(f"{exp}/{arm}/{col}: committed {m0:.4g}, new value missing")
                    continue
                d = precision(base)
                limit = h0 if h0 is not None else 0.5 * 10 ** -d
                if abs(m1 - m0) > limit * (1 + 1e-9) + 1e-12:
                    what = f"CI ± {h0:.4g}" if h0 is not None else "precision (no CI)"
                    moved.append(f"{exp}/{arm}/{base}: committed {m0:.4g}, new {m1:.4g} "
                                 f"(moved {m1 - m0:+.4g}, beyond the committed {what})")
        for arm in new.agg:
            if arm not in res.agg:
                moved.append(f"{exp}/{arm}: new arm, not in the committed results")
    return moved


def load_all(results_dir: Path, experiments: list[str]) -> dict[str, Any]:
    """Each experiment's tables: :class:`Results`, or :class:`SequenceTables` for a sequence
    experiment (a ``sequence_agg.csv`` and no ``summary.csv``)."""
    from forgetkit.results.sequence import AGG_CSV

    out: dict[str, Any] = {}
    for e in experiments:
        root = results_dir / e
        if (root / AGG_CSV).is_file() and not (root / "summary.csv").is_file():
            out[e] = load_sequence_tables(root)
        else:
            out[e] = load_results(root)
    return out


def generate(results: dict[str, Results], paper_dir: Path, figures: bool = True) -> list[str]:
    """Tables and figures into paper/tables/<exp>/ and paper/figures/<exp>/; returns notes of
    figures not drawn."""
    notes = []
    for exp, res in results.items():
        if isinstance(res, SequenceTables):
            notes += _sequence_outputs(exp, res, paper_dir, figures)
            continue
        write_tables(res, paper_dir / "tables" / exp)
        if figures:
            rep = make_figures(res, paper_dir / "figures" / exp, load_curves(res, write=False))
            notes += [f"{exp}: {s}" for s in rep.skipped]
    return notes


def _sequence_outputs(exp: str, res: SequenceTables, paper_dir: Path, figures: bool
                      ) -> list[str]:
    """A sequence experiment's tables and figures (forgetkit.report.sequence)."""
    from forgetkit.report import sequence as report_sequence

    out = paper_dir / "figures" / exp if figures else None
    return report_sequence.paper_outputs(res.root, paper_dir / "tables" / exp, out)


@guarded
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m forgetkit.paper",
                                 description="Regenerate the paper's tables/figures and check "
                                             "its numbers against them.")
    ap.add_argument("--results", default="results", help="committed results root")
    ap.add_argument("--paper", default="paper", help="paper directory (paper.md inside)")
    ap.add_argument("--experiments", default=",".join(EXPERIMENTS),
                    help="comma-separated experiments of the paper")
    ap.add_argument("--fill", action="store_true", help="print marker + number of every cell")
    ap.add_argument("--compare", metavar="NEW_RESULTS",
                    help="compare NEW_RESULTS/<experiment>/ with the committed results")
    ap.add_argument("--update", action="store_true",
                    help="rewrite the fk-table blocks of paper.md from the tables")
    ap.add_argument("--no-figures", action="store_true", help="skip the figures")
    args = ap.parse_args(argv)
    exps = [e.strip() for e in args.experiments.split(",") if e.strip()]
    results = load_all(Path(args.results), exps)
    if args.fill:
        print("\n".join(fill_lines(results)))
        return 0
    if args.compare:
        moved = compare(Path(args.compare), results)
        for m in moved:
            print(f"MOVED: {m}")
        print(f"compare: {len(moved)} number(s) moved beyond the committed CI" if moved else
              "compare: every number within the committed 95 % CI", file=sys.stderr)
        return 1 if moved else 0
    paper_dir = Path(args.paper)
    for note in generate(results, paper_dir, figures=not args.no_figures):
        print(f"not drawn: {note}", file=sys.stderr)
    md = paper_dir / "paper.md"
    if not md.exists():
        raise ConfigError(f"{md}: no such file")
    text = md.read_text()
    if args.update:
        new = update_tables(text, results)
        if new != text:
            md.write_text(new)
            text = new
            print(f"updated the fk-table blocks of {md}", file=sys.stderr)
    bad = check_text(text, results, paper_dir)
    for b in bad:
        print(f"MISMATCH {b}", file=sys.stderr)
    n = len(MARKER.findall(_blank_fences(text)))
    if bad:
        print(f"paper check FAILED: {len(bad)} problem(s) in {md}", file=sys.stderr)
        return 1
    print(f"paper check passed: {n} numbers in {md} match the tables", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
