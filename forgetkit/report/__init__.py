"""``python -m forgetkit.report results/<experiment> [--out DIR]``: figures and tables of an
experiment, from its results tree only (never a model; no network).

Reads ``summary.csv`` / ``summary_agg.csv`` / ``columns.json`` (rebuilt from the runs'
``summary.json`` when absent), the runs' ``train_log.jsonl``, ``drift.json`` and
``fisher_summary.json`` (see forgetkit.drift), and writes into ``--out`` (default
``results/<experiment>/report/``), always under the same names::

    pareto.{png,pdf}          task gain vs std_forgetting (relative forgetting without per-item
                              scores), one point per arm with its CI, plus each arm's WiSE-FT
                              points and merges
    pareto_<metric>.{png,pdf} the same for each headline metric and, when the suite mixes
                              units, each general NLL metric
    benchmarks.{png,pdf}      before/after per benchmark and arm
    curves.{png,pdf}          training curves (mean over seeds, band = min..max over seeds)
    sweep_<arm>_<key>.{png,pdf}  metric and forgetting against a grid value (grid arms only)
    drift.{png,pdf}           relative weight drift per layer (runs with drift.json)
    fisher.{png,pdf}          Fisher magnitude per layer (runs with fisher_summary.json)
    table_main.{md,tex}       task gain, headline forgettings, std_forgetting, retention: mean
                              and CI (paired bootstrap where per-item scores exist), best in bold
    table_comparison.{md,tex} paired differences to the baseline arm; excess forgetting at
                              matched task gain (results with per-item scores only)
    table_benchmarks.{md,tex} every metric after fine-tuning (and the base model's score)
    table_deltas.{md,tex}     every metric's change after - before
    index.md                  every table and figure with a one-line caption; failed runs

The training curves (mean/min/max over seeds, at most ``CURVE_POINTS`` points per series) are
also written to ``results/<experiment>/train_curves.json``: a small file that can be committed
so that the curves can be redrawn without the (large) train logs, which the report then uses
when no ``train_log.jsonl`` is present.

Failed runs are listed in index.md and never plotted or aggregated.

The package's modules: ``loading`` (:class:`Results`, :func:`load_results`, arm order, units and
number formats), ``tables`` (the tables, Markdown and LaTeX), ``curves`` (training curves),
``figures`` (every figure, :func:`make_figures`) and ``index`` (index.md, :func:`build_report`,
:func:`main`). Everything that other code imports is re-exported here.
"""

from __future__ import annotations

from forgetkit.report.curves import CURVE_POINTS, CURVES_FILE, curves_from_logs, load_curves
from forgetkit.report.figures import (
    Figure,
    Report,
    _fval,
    arm_colors,
    fig_benchmarks,
    fig_curves,
    fig_drift,
    fig_fisher,
    fig_pareto,
    fig_sweeps,
    forgetting_column,
    headline_paretos,
    make_figures,
    pareto_front,
)
from forgetkit.report.index import build_report, failed_lines, main, write_index
from forgetkit.report.loading import (
    NAIVE,
    Results,
    _as_float,
    arm_base,
    fmt,
    load_results,
    metric_unit,
    order_arms,
    precision,
)
from forgetkit.report.tables import (
    MAIN_COLUMNS,
    Table,
    build_table,
    cell,
    ci_note,
    main_columns,
    tables,
    to_latex,
    to_markdown,
    write_tables,
)

__all__ = [
    "CURVES_FILE", "CURVE_POINTS", "MAIN_COLUMNS", "NAIVE",
    "Figure", "Report", "Results", "Table",
    "arm_base", "arm_colors", "build_report", "build_table", "cell", "ci_note", "curves_from_logs",
    "failed_lines", "fig_benchmarks", "fig_curves", "fig_drift", "fig_fisher", "fig_pareto",
    "fig_sweeps", "fmt", "forgetting_column", "headline_paretos", "load_curves", "load_results",
    "main", "main_columns", "make_figures", "metric_unit", "order_arms", "pareto_front",
    "precision", "tables", "to_latex", "to_markdown", "write_index", "write_tables",
    # private, imported by forgetkit.paper (_as_float) and tests/test_report.py (_fval)
    "_as_float", "_fval",
]
