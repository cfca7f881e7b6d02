"""The report of a task-sequence experiment (``sequence:`` in the config): figures and tables from
the root tables that :func:`forgetkit.results.sequence.write_sequence_tables` writes, never a
model.

Reads ``sequence_matrix.csv`` (R in long form, every arm x seed, the base model as stage -1),
``sequence_agg.csv`` (one row per arm: the measures with their CIs and ``vs_<baseline>_*``),
``sequence_general.csv`` (each general metric after each stage, its change from the base model
with a paired CI) and, for units and directions, one stage's ``eval_after.json``. Writes::

    sequence_matrix.{png,pdf}     R per arm (mean over seeds): one heatmap per arm, rows = the base
                                  model and each stage, columns = each stage's task; cells show the
                                  raw score, colours the change from the base model in improvement
                                  units (green = better than the base model on that task)
    sequence_transfer.{png,pdf}   BWT and FWT per arm with their CIs (improvement units: positive
                                  = better), and each arm's difference to the baseline arm
    sequence_general.{png,pdf}    each general metric's change from the base model after each
                                  stage, per arm, with its paired CI
    table_sequence.{md,tex}       final average, learning accuracy, BWT, FWT, per-task forgetting
    table_sequence_vs.{md,tex}    the same measures as differences to the baseline arm, paired
    table_sequence_general.{md,tex} each general metric's change from the base model after
                                  each stage, per arm, with its paired CI
    table_sequence_matrix.{md,tex} R per arm (mean over seeds), the base model's row first
    index.md                      (``python -m forgetkit.report``) every table and figure

:func:`paper_outputs` writes the tables and figures for ``forgetkit.paper``.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from forgetkit.report.figures import Figure, Report, _plt, _save, arm_colors
from forgetkit.report.loading import _as_float, fmt, order_arms
from forgetkit.report.tables import Table, cell, to_latex, to_markdown
from forgetkit.results import read_json, write_text
from forgetkit.results.sequence import AGG_CSV, GENERAL_CSV, MATRIX_CSV, SEQUENCE_FILE

__all__ = ["SequenceResults", "load_sequence", "is_sequence_results", "sequence_tables",
           "sequence_figures", "build_sequence_report", "paper_outputs"]

DECIMALS = 3


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with path.open() as fh:
        return list(csv.DictReader(fh))


class SequenceResults:
    """A sequence experiment's root tables, read once."""

    def __init__(self, root: Path) -> None:
        from forgetkit.results.summary import load_analysis

        self.root = Path(root)
        self.name = self.root.name
        agg = {r["arm"]: r for r in _read_csv(self.root / AGG_CSV)}
        self.arms = order_arms(list(agg), {})
        self.agg = {a: agg[a] for a in self.arms}
        self.matrix = _read_csv(self.root / MATRIX_CSV)
        self.general = _read_csv(self.root / GENERAL_CSV)
        analysis = load_analysis(self.root, None)
        self.baseline = analysis.baseline_arm if analysis.baseline_arm in self.agg else None
        self.conf_pct = f"{100 * analysis.confidence:g} %"
        first = next(iter(sorted(self.root.glob(f"*/seed-*/{SEQUENCE_FILE}"))), None)
        rec = read_json(first) if first else {}
        self.stages: list[str] = list(rec.get("stages") or self._matrix_stages())
        self.metrics: list[str] = list(rec.get("metrics") or [])
        self.hib: list[bool] = [bool(h) for h in rec.get("higher_is_better") or []]
        self.meta: dict[str, dict[str, Any]] = {}
        if first and rec.get("dirs"):
            ev = first.parent / rec["dirs"][0] / "eval_after.json"
            if ev.is_file():
                d = read_json(ev)
                for group in ("task", "general"):
                    for m, v in (d.get(group) or {}).items():
                        if isinstance(v, dict):
                            self.meta[m] = {"unit": v.get("unit") or v.get("metric"),
                                            "hib": v.get("higher_is_better")}
        if len(self.hib) != len(self.stages):  # no sequence.json: from the metrics' meta
            self.hib = [bool(self.meta.get(m, {}).get("hib")) for m in self.metrics]
        self.n_seeds = {a: int(_as_float(r.get("n_seeds")) or 0) for a, r in self.agg.items()}

    def _matrix_stages(self) -> list[str]:
        out: list[str] = []
        for r in self.matrix:
            if r["task"] not in out:
                out.append(r["task"])
        return out

    def mean_matrix(self, arm: str) -> tuple[list[float], list[list[float]]]:
        """(base row, R) of ``arm``, each cell the mean over the arm's seeds."""
        t = len(self.stages)
        acc: dict[tuple[int, int], list[float]] = defaultdict(list)
        for r in self.matrix:
            if r["arm"] != arm:
                continue
            v = _as_float(r["value"])
            if v is not None and r["task"] in self.stages:
                acc[(int(r["stage_index"]), self.stages.index(r["task"]))].append(v)

        def m(i: int, j: int) -> float:
            vs = acc.get((i, j))
            return sum(vs) / len(vs) if vs else math.nan
        return [m(-1, j) for j in range(t)], [[m(i, j) for j in range(t)] for i in range(t)]

    def general_metrics(self) -> list[str]:
        out: list[str] = []
        for r in self.general:
            if r["metric"] not in out:
                out.append(r["metric"])
        return out

    def measures(self) -> list[tuple[str, str, bool]]:
        """(agg column, header, higher is better) of the sequence measures present. Final
        average and learning accuracy are raw scores (their direction is the tasks' when all
        agree); BWT, FWT are in improvement units (higher = better) and forgetting is positive
        when the task was forgotten (lower = better)."""
        raw_hib = self.hib[0] if self.hib and all(h == self.hib[0] for h in self.hib) else True
        cols = [("final_average", "Final average", raw_hib),
                ("learning_accuracy", "Learning accuracy", raw_hib),
                ("bwt", "BWT", True), ("fwt", "FWT", True)]
        cols += [(f"forgetting_{s}", f"Forgetting: {s}", False) for s in self.stages[:-1]]
        return [c for c in cols if any(_as_float(a.get(c[0])) is not None
                                       for a in self.agg.values())]


def is_sequence_results(root: Path | str) -> bool:
    """A sequence experiment's results: its ``sequence_agg.csv`` and no single-run tables."""
    root = Path(root)
    return (root / AGG_CSV).is_file() and not (root / "summary.csv").is_file()


def load_sequence(root: Path | str) -> SequenceResults:
    from forgetkit.config import ConfigError

    root = Path(root)
    if not (root / AGG_CSV).is_file():
        raise ConfigError(f"{root}: no {AGG_CSV} (not the results of a sequence experiment; "
                          "forgetkit.results.sequence.write_sequence_tables writes it)")
    return SequenceResults(root)


def _direction_note(res: SequenceResults) -> str:
    units = sorted({str(res.meta.get(m, {}).get("unit") or "score") for m in res.metrics})
    raw = ("lower is better" if res.hib and not any(res.hib) else
           "higher is better" if res.hib and all(res.hib) else "per task")
    return (f"Final average and learning accuracy are raw scores ({', '.join(units)}; {raw}); "
            "BWT and FWT are in improvement units (positive = better; FWT against the base "
            "model); forgetting is the best value after a task was trained minus its final "
            "value, positive = forgotten")


def _ci_note(res: SequenceResults) -> str:
    many = any(n > 1 for n in res.n_seeds.values())
    return (f"mean over seeds [{res.conf_pct} CI: paired bootstrap over items"
            + (", crossed with the seeds]" if many else "; one seed]"))


def _table(res: SequenceResults, name: str, caption: str, cols: list[tuple[str, str, bool]]
           ) -> Table:
    headers = ["Arm"] + [f"{h} {'↑' if hib else '↓'}" for _, h, hib in cols]
    best = []
    for c, _, hib in cols:
        vals = [round(v, DECIMALS) for a in res.agg.values()
                if (v := _as_float(a.get(c))) is not None]
        best.append((max(vals) if hib else min(vals)) if vals else None)
    rows, bold = [], []
    for arm, a in res.agg.items():
        n = res.n_seeds.get(arm)
        cells, b = [f"{arm} (n={n})" if n else arm], [False]
        for (c, _, _), bv in zip(cols, best, strict=True):
            m = _as_float(a.get(c))
            cells.append(cell(a, c, DECIMALS))
            b.append(m is not None and bv is not None and round(m, DECIMALS) == bv)
        rows.append(cells)
        bold.append(b)
    return Table(name, caption, headers, rows, bold, [c for c, _, _ in cols])


def sequence_tables(res: SequenceResults) -> list[Table]:
    """table_sequence (the measures), table_sequence_vs (paired differences to the baseline
    arm) and table_sequence_matrix (R per arm)."""
    cols = res.measures()
    order = " → ".join(res.stages)
    out = [_table(res, "sequence", f"Task sequence {order}: {_ci_note(res)}. "
                  f"{_direction_note(res)}. Best per column in bold.", cols)]
    b = res.baseline
    if b:
        vs = [(f"vs_{b}_{c}", f"{h} − {b}", hib) for c, h, hib in cols
              if any(_as_float(a.get(f"vs_{b}_{c}")) is not None for a in res.agg.values())]
        if vs:
            t = _table(res, "sequence_vs", f"Task sequence {order}: each arm minus {b} on the "
                       f"same item (and seed) resamples [{res.conf_pct} paired CI]; an interval "
                       "excluding 0 is a resolved difference. Signs as in table_sequence.", vs)
            keep = [i for i, r in enumerate(t.rows) if not r[0].startswith(f"{b} ")
                    and r[0] != b]
            t.rows, t.bold = [t.rows[i] for i in keep], [t.bold[i] for i in keep]
            out.append(t)
    g = general_table(res)
    if g is not None:
        out.append(g)
    out.append(matrix_table(res))
    return out


def general_table(res: SequenceResults) -> Table | None:
    """Each general metric's change from the base model after each stage (mean over seeds
    [paired CI]): a row per arm, a column per (metric, stage)."""
    metrics = res.general_metrics()
    if not metrics:
        return None
    cols = [(m, i) for m in metrics for i in range(len(res.stages))]
    cell_of: dict[tuple[str, str, int], dict[str, str]] = {
        (r["arm"], r["metric"], int(r["stage_index"])): r for r in res.general}
    headers = ["Arm"]
    for m, i in cols:
        hib = res.meta.get(m, {}).get("hib")
        arrow = {True: " ↑", False: " ↓"}.get(hib, "")
        headers.append(f"Δ {m} after {res.stages[i]}{arrow}")
    rows, bold = [], []
    for arm in res.arms:
        n = res.n_seeds.get(arm)
        cells = [f"{arm} (n={n})" if n else arm]
        for m, i in cols:
            r = cell_of.get((arm, m, i), {})
            cells.append(cell({"d": r.get("delta"), "d_lo": r.get("delta_lo"),
                               "d_hi": r.get("delta_hi")}, "d", DECIMALS))
        rows.append(cells)
        bold.append([False] * len(cells))
    return Table("sequence_general",
                 f"The general suite along the sequence: each metric's change from the base "
                 f"model after each stage ({_ci_note(res)}, paired with the base model's "
                 f"scores of the same items); arrows: the metric's better direction.",
                 headers, rows, bold, [f"{m}@{i}" for m, i in cols])


def matrix_table(res: SequenceResults) -> Table:
    """R per arm, mean over seeds: a row per (arm, after stage), the base model's row first."""
    t = len(res.stages)
    hdr = [f"{s} ({m}) {'↑' if h else '↓'}" for s, m, h in
           zip(res.stages, res.metrics or res.stages, res.hib or [True] * t, strict=False)]
    rows, bold = [], []
    base_done = False
    for arm in res.arms:
        base, r = res.mean_matrix(arm)
        if not base_done:
            rows.append(["base model"] + [fmt(v, DECIMALS) for v in base])
            bold.append([False] * (t + 1))
            base_done = True
        for i, row in enumerate(r):
            rows.append([f"{arm}: after {res.stages[i]}"] + [fmt(v, DECIMALS) for v in row])
            bold.append([False] + [j == i for j in range(t)])
    return Table("sequence_matrix",
                 f"Accuracy matrix R (mean over seeds): the score on each task (column) after "
                 f"each stage (row); bold = the task just trained (the diagonal). Tasks in "
                 f"training order: {' → '.join(res.stages)}.",
                 ["After"] + hdr, rows, bold, list(res.stages))


def write_sequence_tables(res: SequenceResults, out: Path) -> list[Table]:
    ts = sequence_tables(res)
    for t in ts:
        write_text(out / f"table_{t.name}.md", f"*{t.caption}*\n\n" + to_markdown(t))
        write_text(out / f"table_{t.name}.tex", to_latex(t))
    return ts


# ---------------------------------------------------------------- figures


def fig_matrix(res: SequenceResults, out: Path) -> Figure | str:
    if not res.arms or not res.stages:
        return "sequence_matrix: no matrix rows"
    plt = _plt()
    import numpy as np

    t = len(res.stages)
    sign = np.array([1.0 if h else -1.0 for h in (res.hib or [True] * t)])
    mats = {}
    for arm in res.arms:
        base, r = res.mean_matrix(arm)
        full = np.array([base] + r, dtype=float)
        mats[arm] = (full, (full - np.array(base)) * sign)
    lim = max((np.nanmax(np.abs(d)) for _, d in mats.values() if np.isfinite(d).any()),
              default=1.0) or 1.0
    n = len(res.arms)
    ncol = min(n, 3)
    nrow = math.ceil(n / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.4 * ncol + 0.8, 2.9 * nrow + 0.4),
                             squeeze=False)
    fig.subplots_adjust(hspace=0.55, wspace=0.06)
    im = None
    for k, arm in enumerate(res.arms):
        ax = axes[k // ncol][k % ncol]
        full, d = mats[arm]
        im = ax.imshow(d, cmap="RdYlGn", vmin=-lim, vmax=lim, aspect="auto")
        for i in range(t + 1):
            for j in range(t):
                if math.isfinite(full[i, j]):
                    ax.text(j, i, fmt(full[i, j], 2), ha="center", va="center", fontsize=8,
                            fontweight="bold" if i - 1 == j else "normal")
        ax.set_xticks(range(t), res.stages, rotation=20, fontsize=8)
        ax.set_yticks(range(t + 1), ["base"] + [f"after {s}" for s in res.stages]
                      if k % ncol == 0 else [""] * (t + 1), fontsize=8)
        ax.set_title(f"{arm} (n={res.n_seeds.get(arm, 0)})")
        ax.grid(False)
    for k in range(n, nrow * ncol):
        axes[k // ncol][k % ncol].axis("off")
    if im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        cb.set_label("change from the base model\n(improvement units: + = better)")
    fig.suptitle(f"{res.name}: accuracy matrix R (cell: score, mean over seeds)")
    _save(fig, out, "sequence_matrix")
    return Figure("sequence_matrix",
                  "Accuracy matrix R per arm (mean over seeds): row = after which stage, column "
                  "= which stage's task; the number is the raw score (bold: the task just "
                  "trained), the colour its change from the base model in improvement units "
                  "(green = better than the base model, red = worse; one scale for all arms).")


def _bar_panel(ax: Any, res: SequenceResults, cols: list[tuple[str, str]], colors: dict,
               arms: list[str]) -> None:
    import numpy as np

    width = 0.8 / max(len(arms), 1)
    for k, arm in enumerate(arms):
        a = res.agg[arm]
        xs, ys, lo, hi = [], [], [], []
        for ci, (c, _) in enumerate(cols):
            m = _as_float(a.get(c))
            if m is None:
                continue
            lo_v, hi_v = _as_float(a.get(f"{c}_lo")), _as_float(a.get(f"{c}_hi"))
            xs.append(ci - 0.4 + width * (k + 0.5))
            ys.append(m)
            lo.append(m - lo_v if lo_v is not None else 0.0)
            hi.append(hi_v - m if hi_v is not None else 0.0)
        if xs:
            ax.bar(xs, ys, width * 0.92, color=colors.get(arm), label=arm,
                   yerr=np.array([lo, hi]), capsize=3, error_kw={"lw": 1})
    ax.axhline(0, color="k", lw=0.8)
    ax.set_xticks(range(len(cols)), [h for _, h in cols])


def fig_transfer(res: SequenceResults, out: Path) -> Figure | str:
    have = [(c, h) for c, h in (("bwt", "BWT"), ("fwt", "FWT"))
            if any(_as_float(a.get(c)) is not None for a in res.agg.values())]
    if not have:
        return "sequence_transfer: no BWT/FWT (a sequence of one stage)"
    plt = _plt()
    colors = arm_colors(res.arms)
    b = res.baseline
    vs = [(f"vs_{b}_{c}", f"{h} − {b}") for c, h in have] if b else []
    others = [a for a in res.arms if a != b]
    vs = [v for v in vs if any(_as_float(res.agg[a].get(v[0])) is not None for a in others)]
    fig, axes = plt.subplots(1, 2 if vs else 1, figsize=(10 if vs else 5.5, 3.8),
                             squeeze=False)
    _bar_panel(axes[0][0], res, have, colors, res.arms)
    axes[0][0].set_ylabel("improvement units (+ = better)")
    axes[0][0].set_title(f"transfer ({res.conf_pct} CI)")
    if vs:
        _bar_panel(axes[0][1], res, vs, colors, others)
        axes[0][1].set_title(f"minus {b}, paired ({res.conf_pct} CI)")
    axes[0][0].legend(loc="best")
    fig.suptitle(f"{res.name}: backward and forward transfer")
    fig.tight_layout()
    _save(fig, out, "sequence_transfer")
    return Figure("sequence_transfer",
                  f"Backward transfer (BWT: what later stages did to the earlier tasks) and "
                  f"forward transfer (FWT: what the earlier stages did to a task before it was "
                  f"trained, against the base model) per arm, improvement units (positive = "
                  f"better), error bars the {res.conf_pct} CI ({_ci_note(res)})"
                  + (f"; right: each arm minus {b} on the same resamples." if vs else "."))


def fig_general(res: SequenceResults, out: Path) -> Figure | str:
    metrics = res.general_metrics()
    if not metrics:
        return "sequence_general: no general metrics"
    plt = _plt()
    colors = arm_colors(res.arms)
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.6 * len(metrics), 3.6), squeeze=False)
    labels = ["base"] + [f"after {s}" for s in res.stages]
    n_arms = max(len(res.arms), 1)
    for mi, m in enumerate(metrics):
        ax = axes[0][mi]
        for k, arm in enumerate(res.arms):
            rows = sorted((r for r in res.general if r["arm"] == arm and r["metric"] == m),
                          key=lambda r: int(r["stage_index"]))
            xs, ys, lo, hi = [], [], [], []
            for r in rows:
                d = _as_float(r["delta"])
                if d is None:
                    continue
                off = (k - (n_arms - 1) / 2) * 0.06  # keep the error bars apart
                xs.append(int(r["stage_index"]) + 1 + off)
                ys.append(d)
                lo_v, hi_v = _as_float(r.get("delta_lo")), _as_float(r.get("delta_hi"))
                lo.append(d - lo_v if lo_v is not None else 0.0)
                hi.append(hi_v - d if hi_v is not None else 0.0)
            if xs:
                ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", ms=4, capsize=2, lw=1.3,
                            color=colors.get(arm), label=arm)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=20, fontsize=8)
        meta = res.meta.get(m, {})
        better = {True: "↑ better", False: "↓ better"}.get(meta.get("hib"), "")
        ax.set_title(f"{m} ({meta.get('unit') or 'score'}; {better})" if better else m)
        ax.set_ylabel("change from the base model")
    axes[0][0].legend(loc="best")
    fig.suptitle(f"{res.name}: the general suite after each stage")
    fig.tight_layout()
    _save(fig, out, "sequence_general")
    return Figure("sequence_general",
                  "Each general metric's change from the base model after each stage, per arm "
                  f"(mean over seeds; error bars: {res.conf_pct} paired bootstrap CI over "
                  "items; arms offset sideways to keep them apart).")


def sequence_figures(res: SequenceResults, out: Path) -> Report:
    rep = Report()
    for f in (fig_matrix(res, out), fig_transfer(res, out), fig_general(res, out)):
        (rep.figures if isinstance(f, Figure) else rep.skipped).append(f)
    return rep


def _write_index(res: SequenceResults, out: Path, rep: Report) -> None:
    n = sum(res.n_seeds.values())
    lines = [f"# Report: {res.name} (task sequence)", "",
             f"{len(res.arms)} arms, {n} sequences, stages {' → '.join(res.stages)}. "
             f"{_ci_note(res)}. Generated by `python -m forgetkit.report`.", "",
             "## Tables", ""]
    for t in rep.tables:
        lines += [f"### {t.name} ([md](table_{t.name}.md), [LaTeX](table_{t.name}.tex))", "",
                  f"*{t.caption}*", "", to_markdown(t)]
    lines += ["## Figures", ""]
    for f in rep.figures:
        lines += [f"### {f.stem}", "", f"![{f.stem}]({f.stem}.png)", "",
                  f"*{f.caption}* ([PDF]({f.stem}.pdf))", ""]
    if rep.skipped:
        lines += ["## Not drawn", ""] + [f"- {s}" for s in rep.skipped] + [""]
    write_text(out / "index.md", "\n".join(lines))


def build_sequence_report(root: Path | str, out: Path | str | None = None) -> Report:
    """Tables, figures and index.md of a sequence experiment into ``out`` (default
    ``<root>/report``)."""
    res = load_sequence(root)
    out = Path(out) if out is not None else res.root / "report"
    out.mkdir(parents=True, exist_ok=True)
    rep = sequence_figures(res, out)
    rep.tables = write_sequence_tables(res, out)
    _write_index(res, out, rep)
    return rep


def paper_outputs(root: Path | str, tables_dir: Path, figures_dir: Path | None) -> list[str]:
    """The paper's tables (and figures unless ``figures_dir`` is None) of a sequence experiment;
    returns notes of figures not drawn."""
    res = load_sequence(root)
    write_sequence_tables(res, Path(tables_dir))
    if figures_dir is None:
        return []
    rep = sequence_figures(res, Path(figures_dir))
    return [f"{res.name}: {s}" for s in rep.skipped]

