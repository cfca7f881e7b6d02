"""The report's tables (main, comparison, benchmarks, deltas): mean ± CI per arm, best in bold, as Markdown
and LaTeX."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from forgetkit.report.loading import Results, _as_float, _has, _mean, fmt, metric_unit, precision
from forgetkit.results import write_text

# Summary measures of the main table after the headline ones: (column, header, hib).
MAIN_COLUMNS = [
    ("task_gain", "Task gain", True),
    ("std_forgetting", "Std. forgetting", False),
    ("mean_rel_forgetting", "Rel. forgetting", False),
    ("retention_ratio", "Retention", True),
]


def main_columns(res: Results) -> list[tuple[str, str, bool]]:
    """The main table's columns: task gain, the declared headline forgettings and the unit-free
    aggregate (where the results have them), then the unpaired relative measures."""
    cols = [MAIN_COLUMNS[0]]
    cols += [(f"{m}_forgetting", f"Forgetting: {m}", False) for m in res.headline]
    cols += MAIN_COLUMNS[1:]
    return [c for c in cols if _has(res, c[0])]


def comparison_columns(res: Results) -> list[tuple[str, str, bool]]:
    """Paired comparisons between arms: each arm minus the baseline arm (task gain, headline
    forgettings, std_forgetting), and the excess forgetting at matched task gain."""
    b = res.baseline
    fs = [f"{m}_forgetting" for m in res.headline] + ["std_forgetting"]
    cols: list[tuple[str, str, bool]] = []
    if b:
        cols.append((f"vs_{b}_task_gain", f"Task gain − {b}", True))
        cols += [(f"vs_{b}_{f}", f"{_short(f)} − {b}", False) for f in fs]
    if res.reference:
        cols += [(f"excess_{f}", f"{_short(f)}: excess at matched gain", False) for f in fs]
    return [c for c in cols if _has(res, c[0])]


def _short(f: str) -> str:
    return "Std. forgetting" if f == "std_forgetting" else \
        f"Forgetting: {f.removesuffix('_forgetting')}"


@dataclass
class Table:
    name: str
    caption: str
    headers: list[str]                 # first one is the row-label header
    rows: list[list[str]]              # plain cells (no bold markup)
    bold: list[list[bool]]
    columns: list[str]                 # summary_agg base column per data column


def build_table(res: Results, name: str, cols: list[tuple[str, str, bool]], caption: str,
                base_row: dict[str, Any] | None = None, skip: tuple[str, ...] = ()) -> Table:
    """Mean ± CI per arm for ``cols`` = [(agg base column, header, higher_is_better)]; the best
    arm per column (compared at the printed precision; ties all bold) in bold."""
    headers = ["Arm"] + [f"{h} {'↑' if hib else '↓'}" for _, h, hib in cols]
    rows, bold = [], []
    best: list[float | None] = []
    for c, _, hib in cols:
        d = precision(c)
        vals = [_as_float(_mean(a, c)) for arm, a in res.agg.items() if arm not in skip]
        vals_r = [round(v, d) for v in vals if v is not None]
        best.append((max(vals_r) if hib else min(vals_r)) if vals_r else None)
    if base_row is not None:
        rows.append([base_row["label"]] + [base_row.get(c, "") for c, _, _ in cols])
        bold.append([False] * (len(cols) + 1))
    for arm, a in res.agg.items():
        if arm in skip:
            continue
        n = a.get("n_seeds")
        cells, b = [f"{arm} (n={int(n)})" if _as_float(n) is not None else arm], [False]
        for (c, _, _), bv in zip(cols, best, strict=True):
            d = precision(c)
            m = _as_float(_mean(a, c))
            cells.append(cell(a, c, d))
            b.append(m is not None and bv is not None and round(m, d) == bv)
        rows.append(cells)
        bold.append(b)
    return Table(name, caption, headers, rows, bold, [c for c, _, _ in cols])


def cell(a: dict[str, Any], c: str, d: int) -> str:
    """``mean [lo, hi]`` where the results have a paired/crossed bootstrap CI of the column,
    else ``mean ± t-CI`` over seeds, else the mean alone."""
    m = _as_float(_mean(a, c))
    if m is None:
        return "n/a"
    lo, hi = _as_float(a.get(f"{c}_lo")), _as_float(a.get(f"{c}_hi"))
    if lo is not None and hi is not None:
        return f"{fmt(m, d)} [{fmt(lo, d)}, {fmt(hi, d)}]"
    h = _as_float(a.get(f"{c}_ci95"))
    return fmt(m, d) + (f" ± {fmt(h, d)}" if h is not None else "")


def std_n(res: Results) -> str:
    """How many general metrics std_forgetting averages (its recorded count; a range when arms
    differ, e.g. a metric without per-item scores in some runs)."""
    ns = sorted({int(v) for a in res.agg.values()
                 if (v := _as_float(a.get("std_forgetting_n"))) is not None})
    if not ns:
        return str(len([m for m in res.metrics("general") if m not in res.excluded]))
    return str(ns[0]) if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def _paired(res: Results) -> bool:
    return any(_as_float(a.get("task_gain_lo")) is not None for a in res.agg.values())


def ci_note(res: Results) -> str:
    if _paired(res):
        return (f"mean over seeds [{res.conf_pct} CI: paired bootstrap over items, crossed "
                "with the seeds when there are several]")
    return "mean ± 95 % CI over seeds (t-distribution)"


def tables(res: Results) -> list[Table]:
    excl = f" except {', '.join(res.excluded)}" if res.excluded else ""
    head = "".join(f" Forgetting: {m} = how much worse it got ("
                   f"{'drop' if res.columns[m].get('higher_is_better', True) else 'rise'}, "
                   f"{metric_unit(res.columns[m])}; positive = "
                   "forgot)." for m in res.headline)
    std = (f" Std. forgetting = mean over the {std_n(res)} "
           f"general benchmarks{excl} of how much worse (drop or rise) / the base model's "
           "per-item SD (unit-free)." if _has(res, "std_forgetting") else
           " (No per-item scores: no paired statistics.)")
    out = [build_table(res, "main", main_columns(res),
                       f"Summary per arm: {ci_note(res)}. Task gain = improvement of "
                       f"{_first_task_unit(res)}.{head}{std} Relative forgetting = mean drop / "
                       "before; retention = mean after / before (unpaired).")]
    comp = comparison_columns(res)
    if comp:
        b, ref = res.baseline, res.reference
        out.append(build_table(
            res, "comparison", comp,
            f"Paired comparisons, {ci_note(res)}. X − {b} = the arm's value minus {b}'s, "
            "computed on the same bootstrap resamples of items (and seeds), so the CI is that "
            "of the difference. Excess at matched gain = the arm's forgetting minus that of "
            f"{ref}'s WiSE-FT curve (base, its alphas, its final model; linear in between) at "
            "the arm's own task gain: negative = forgot less than merging the reference toward "
            "the base would at equal learning; n/a outside the curve (no extrapolation); a "
            "value without an interval: fewer than 95 % of the replicates put the arm's gain "
            "on the curve."))
    metrics = res.metrics()
    if metrics:
        first = next(iter(res.agg.values()), {})
        base = {"label": "base model (before)"}
        for m in metrics:
            v = _as_float(first.get(f"{m}_before_mean"))
            h = _as_float(first.get(f"{m}_before_ci95"))
            base[f"{m}_after"] = fmt(v, 3) + (f" ± {fmt(h, 3)}" if h is not None else "")
        cols = [(f"{m}_after", f"{m} [{res.columns[m].get('role')}]",
                 bool(res.columns[m].get("higher_is_better", True))) for m in metrics]
        out.append(build_table(res, "benchmarks", cols,
                               "Scores after fine-tuning, mean ± 95 % CI over seeds "
                               "(t-distribution); first row: the base model. Units: "
                               + _units_note(res), base_row=base))
        cols = [(f"{m}_delta", f"Δ {m}", bool(res.columns[m].get("higher_is_better", True)))
                for m in metrics]
        out.append(build_table(res, "deltas", cols,
                               f"Change after - before per metric, {ci_note(res)} (in each "
                               "metric's unit: " + _units_note(res) + ")."))
    return out


def _units_note(res: Results) -> str:
    return "; ".join(f"{m}: {metric_unit(c)}" for m, c in res.columns.items())


def _first_task_unit(res: Results) -> str:
    t = res.metrics("task")
    return f"{t[0]} ({metric_unit(res.columns[t[0]])})" if t else "n/a"


def to_markdown(t: Table) -> str:
    lines = ["| " + " | ".join(t.headers) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(t.headers) - 1)) + "|"]
    for cells, b in zip(t.rows, t.bold, strict=True):
        lines.append("| " + " | ".join(f"**{c}**" if bb else c
                                       for c, bb in zip(cells, b, strict=True)) + " |")
    return "\n".join(lines) + "\n"


def _tex(s: str) -> str:
    s = (s.replace("\\", r"\textbackslash{}").replace("_", r"\_").replace("%", r"\%")
         .replace("&", r"\&").replace("#", r"\#"))
    return (s.replace("±", r"$\pm$").replace("↑", r"$\uparrow$").replace("↓", r"$\downarrow$")
            .replace("Δ", r"$\Delta$"))


def to_latex(t: Table) -> str:
    spec = "l" + "r" * (len(t.headers) - 1)
    out = [r"% generated by forgetkit.report -- do not edit", r"\begin{table}[t]", r"\centering",
           r"\small", rf"\caption{{{_tex(t.caption)}}}", rf"\label{{tab:{t.name}}}",
           rf"\begin{{tabular}}{{{spec}}}", r"\toprule",
           " & ".join(_tex(h) for h in t.headers) + r" \\", r"\midrule"]
    for i, (cells, b) in enumerate(zip(t.rows, t.bold, strict=True)):
        out.append(" & ".join(rf"\textbf{{{_tex(c)}}}" if bb else _tex(c)
                              for c, bb in zip(cells, b, strict=True)) + r" \\")
        if i == 0 and t.rows[0][0].startswith("base model"):
            out.append(r"\midrule")
    out += [r"\bottomrule", r"\end{tabular}", r"\end{table}"]
    return "\n".join(out) + "\n"


def write_tables(res: Results, out: Path) -> list[Table]:
    ts = tables(res)
    for t in ts:
        write_text(out / f"table_{t.name}.md", f"*{t.caption}*\n\n" + to_markdown(t))
        write_text(out / f"table_{t.name}.tex", to_latex(t))
    return ts

