"""The report's figures (Pareto plots, benchmarks, training curves, sweeps, drift, Fisher) and
:func:`make_figures`, which draws every one the results allow."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from forgetkit.report.loading import NAIVE, Results, _as_float, _has, _mean, arm_base, metric_unit
from forgetkit.report.tables import Table, _first_task_unit, _paired, ci_note, std_n
from forgetkit.results import read_json
from forgetkit.results.forgetting import forgetting


@dataclass
class Figure:
    stem: str
    caption: str


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10,
                         "legend.fontsize": 8, "figure.dpi": 100, "axes.grid": True,
                         "grid.alpha": 0.3, "svg.hashsalt": "forgetkit"})
    return plt


def _save(fig: Any, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fig.savefig(out / f"{stem}.png", dpi=150, bbox_inches="tight")
    fig.savefig(out / f"{stem}.pdf", bbox_inches="tight", metadata={"CreationDate": None})
    import matplotlib.pyplot as plt

    plt.close(fig)


def arm_colors(arms: list[str]) -> dict[str, Any]:
    """naive red; grid arms of one base share a hue (lighter to darker along the grid)."""
    import matplotlib as mpl

    bases = []
    for a in arms:
        if a != NAIVE and arm_base(a) not in bases:
            bases.append(arm_base(a))
    palette = [c for i, c in enumerate(mpl.colormaps["tab10"].colors) if i != 3]  # 3 = red
    cmaps = ["Blues", "Greens", "Purples", "Oranges", "Greys", "YlOrBr"]
    out: dict[str, Any] = {}
    for bi, b in enumerate(bases):
        members = [a for a in arms if arm_base(a) == b and a != NAIVE]
        if len(members) == 1:
            out[members[0]] = palette[bi % len(palette)]
        else:
            cm = mpl.colormaps[cmaps[bi % len(cmaps)]]
            for j, a in enumerate(members):
                out[a] = cm(0.45 + 0.5 * j / max(len(members) - 1, 1))
    out[NAIVE] = "#d62728"
    return out


def _nan(v: Any) -> float:
    f = _as_float(v)
    return f if f is not None else math.nan


def _ci(v: Any) -> float:
    f = _as_float(v)
    return f if f is not None else 0.0


def pareto_front(points: list[tuple[str, float, float]]) -> list[str]:
    """Names of the non-dominated points (more gain and less forgetting is better), by gain."""
    front = []
    for n, g, f in points:
        dominated = any(g2 >= g and f2 <= f and (g2 > g or f2 < f) for _, g2, f2 in points)
        if not dominated:
            front.append((g, n))
    return [n for _, n in sorted(front)]


def _err(a: dict[str, Any], col: str, m: float) -> tuple[float, float]:
    """(below, above) error-bar lengths: from the bootstrap CI [lo, hi] when present, else the
    symmetric t-CI over seeds, else none."""
    lo, hi = _as_float(a.get(f"{col}_lo")), _as_float(a.get(f"{col}_hi"))
    if lo is not None and hi is not None:
        return max(m - lo, 0.0), max(hi - m, 0.0)
    h = _ci(a.get(f"{col}_ci95"))
    return h, h


def forgetting_column(res: Results, metric: str | None) -> tuple[str, str]:
    """(column, axis label) of the forgetting measure a Pareto plot uses: one general metric's
    forgetting, or (``metric`` None) the unit-free std_forgetting -- the relative drop for results
    without per-item scores."""
    if metric is not None:
        change = "drop" if res.columns[metric].get("higher_is_better", True) else "rise"
        col = f"{metric}_forgetting" if _has(res, f"{metric}_forgetting") else f"{metric}_delta"
        return col, f"forgetting on {metric} ({change}, {metric_unit(res.columns[metric])})"
    gen = res.metrics("general")
    if _has(res, "std_forgetting"):
        return "std_forgetting", (f"std. forgetting: mean over {std_n(res)} general benchmarks "
                                  "of drop / base per-item SD")
    return "mean_rel_forgetting", f"relative forgetting: mean over {len(gen)} general drop/before"


def _fval(res: Results, a: dict[str, Any], col: str, metric: str | None) -> float | None:
    v = _as_float(_mean(a, col))
    if v is not None and metric is not None and col == f"{metric}_delta":
        return forgetting(0.0, v, bool(res.columns[metric].get("higher_is_better", True)))
    return v


def fig_pareto(res: Results, out: Path, colors: dict[str, Any],
               metric: str | None = None) -> Figure | str:
    """Task gain against forgetting (std_forgetting, or one general metric: ``pareto_<metric>``),
    one point per arm with its CI; the scored merges and WiSE-FT points of an arm (small
    markers, joined to the arm's point) on the same axes."""
    plt = _plt()
    stem = "pareto" if metric is None else f"pareto_{metric}"
    col, ylabel = forgetting_column(res, metric)
    pts = []
    for arm, a in res.agg.items():
        g, f = _as_float(_mean(a, "task_gain")), _fval(res, a, col, metric)
        if g is not None and f is not None:
            pts.append((arm, g, f))
    if not pts:
        return f"{stem}: no arm has both a task gain and a forgetting value"
    extra: dict[str, list[tuple[str, float, float, dict[str, Any]]]] = {}
    for p in res.points:
        if str(p.get("point")) == "final" or str(p.get("arm")) not in res.agg:
            continue
        g, f = _as_float(_mean(p, "task_gain")), _fval(res, p, col, metric)
        if g is not None and f is not None:
            extra.setdefault(str(p["arm"]), []).append((str(p["point"]), g, f, p))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    ax.axhline(0, color="0.5", lw=0.8, zorder=0)
    ax.axvline(0, color="0.5", lw=0.8, zorder=0)
    allpts = pts + [(f"{arm}+{n}", g, f) for arm, e in extra.items() for n, g, f, _ in e]
    front = pareto_front(allpts)
    where = {n: (g, f) for n, g, f in allpts}
    if len(front) > 1:  # a one-point frontier is no line: no legend entry for it
        ax.plot([where[n][0] for n in front], [where[n][1] for n in front], "--",
                color="0.35", lw=1.2, zorder=1, label="Pareto frontier")
    for arm, g, f in pts:
        a = res.agg[arm]
        naive = arm == NAIVE
        ax.errorbar(g, f, xerr=[[v] for v in _err(a, "task_gain", g)],
                    yerr=[[v] for v in _err(a, col, f)],
                    fmt="*" if naive else "o", ms=14 if naive else 7, color=colors[arm],
                    ecolor=colors[arm], elinewidth=1, capsize=3, zorder=3,
                    mec="black" if naive else colors[arm], label=arm + (" (no regularizer)"
                                                                        if naive else ""))
        for n, g2, f2, p in sorted(extra.get(arm, []), key=lambda e: e[1]):
            ax.plot([g2, g], [f2, f], ":", color=colors[arm], lw=1, zorder=2)
            ax.errorbar(g2, f2, xerr=[[v] for v in _err(p, "task_gain", g2)],
                        yerr=[[v] for v in _err(p, col, f2)], fmt="s" if n.startswith(
                            "merge:") else "D", ms=5, color=colors[arm], ecolor=colors[arm],
                        elinewidth=0.8, capsize=2, zorder=3, alpha=0.85)
    if extra:
        ax.plot([], [], "D", color="0.4", ms=5, label="WiSE-FT point of the arm (dotted)")
        ax.plot([], [], "s", color="0.4", ms=5, label="merge of the arm (dotted)")
    # arms are named by the legend (their colours); the WiSE-FT points and merges get labels
    _label_points(ax, [(f"α={n.split(':', 1)[1]}" if n.startswith("wise:") else
                        n.split(":", 1)[1], g, f) for e in extra.values() for n, g, f, _ in e])
    # axes fitted to the points and their error bars
    xs: list[float] = []
    ys: list[float] = []
    for arm, g, f in pts:
        (gl, gh), (fl, fh) = _err(res.agg[arm], "task_gain", g), _err(res.agg[arm], col, f)
        xs += [g - gl, g + gh]
        ys += [f - fl, f + fh]
    for e in extra.values():
        for _, g, f, p in e:
            (gl, gh), (fl, fh) = _err(p, "task_gain", g), _err(p, col, f)
            xs += [g - gl, g + gh]
            ys += [f - fl, f + fh]
    _fit_axes(ax, xs, ys)
    ax.set_xlabel(f"task gain: Δ {_first_task_unit(res)}  (→ better)")
    ax.set_ylabel(_wrap(ylabel) + "  (↓ better)")
    what = "std. forgetting" if col == "std_forgetting" else (
        f"forgetting on {metric}" if metric else "relative forgetting")
    ax.set_title(f"{res.name}: learning vs {what}")
    ax.legend(loc="best", framealpha=0.9, fontsize=8)
    fig.tight_layout()
    _save(fig, out, stem)
    return Figure(stem, f"Task gain vs {what} per arm ({ci_note(res)}); dashed: Pareto "
                        "frontier (lower right is better); star: naive fine-tuning; diamonds and "
                        "squares: WiSE-FT points and merges of an arm, joined to it.")


def _wrap(text: str, width: int = 48) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _fit_axes(ax: Any, xs: list[float], ys: list[float]) -> None:
    """Axes fitted to the data (with the origin, where the base model sits) plus a margin."""
    for lim, vals in ((ax.set_xlim, xs), (ax.set_ylim, ys)):
        lo, hi = min(vals), max(vals)
        pad = 0.08 * (hi - lo) if hi > lo else 0.05 * (abs(hi) or 1.0)
        lim(lo - pad, hi + pad)


def _label_points(ax: Any, pts: list[tuple[str, float, float]]) -> None:
    """Text labels beside points, nudged apart vertically where they would overlap."""
    placed: list[tuple[float, float]] = []
    trans = ax.transData
    for name, g, f in sorted(pts, key=lambda p: (p[2], p[1])):
        x, y = trans.transform((g, f))
        dy = 6.0
        while any(abs(x - px) < 70 and abs(y + dy - py) < 11 for px, py in placed):
            dy += 11.0
        placed.append((x, y + dy))
        ax.annotate(name, (g, f), xytext=(8, dy - 6), textcoords="offset points",
                    fontsize=7.5, arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.5})


def headline_paretos(res: Results) -> list[str]:
    """General metrics that get their own Pareto plot: the declared headline metrics, and the
    NLL metrics of a suite with mixed units."""
    gen = res.metrics("general")
    out = list(res.headline)
    if len({metric_unit(res.columns[m]) for m in gen}) >= 2:
        out += [m for m in gen if res.columns[m].get("metric") == "nll" and m not in out]
    return out


def fig_benchmarks(res: Results, out: Path, colors: dict[str, Any]) -> Figure | str:
    """Per metric: with per-item scores, each arm's change after - before with its paired CI
    (the comparison the statistics make); without, before/after bars with the t-CI over seeds.
    A panel in which no arm changed anything says so instead of drawing flat bars."""
    metrics = res.metrics()
    if not metrics or not res.agg:
        return "benchmarks: no metrics in columns.json"
    paired = _paired(res)
    plt = _plt()
    ncol = min(3, len(metrics))
    nrow = math.ceil(len(metrics) / ncol)
    arms = res.arms
    fig, axes = plt.subplots(nrow, ncol, figsize=(max(4.2, 0.55 * len(arms) + 1.5) * ncol,
                                                   3.6 * nrow), squeeze=False)
    x = list(range(len(arms)))
    flat_panels = []
    for i, m in enumerate(metrics):
        ax = axes[i // ncol][i % ncol]
        meta = res.columns[m]
        unit = metric_unit(meta)
        arrow = "↑" if meta.get("higher_is_better", True) else "↓"
        ax.set_title(f"{m} [{meta.get('role')}] {arrow}", fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(arms, rotation=35, ha="right", fontsize=8)
        if paired:
            d = [_nan(res.agg[a].get(f"{m}_delta_mean")) for a in arms]
            err = [_err(res.agg[a], f"{m}_delta", v) if not math.isnan(v) else (0.0, 0.0)
                   for a, v in zip(arms, d, strict=True)]
            if all(v == 0.0 for v in d) and all(e == (0.0, 0.0) for e in err):
                flat_panels.append(m)
                ax.text(0.5, 0.5, "unchanged in every arm:\nno item scored differently\n"
                        "after fine-tuning", ha="center", va="center", transform=ax.transAxes,
                        fontsize=9, color="0.3")
                ax.set_xticks([])
                ax.set_yticks([])
                continue
            ax.axhline(0, color="0.4", lw=0.8)
            ax.bar(x, d, 0.6, color=[colors[a] for a in arms], edgecolor="black", lw=0.5)
            ax.errorbar(x, d, yerr=[[e[0] for e in err], [e[1] for e in err]], fmt="none",
                        ecolor="black", elinewidth=1, capsize=3)
            ax.set_ylabel(f"after − before ({unit})", fontsize=8)
            continue
        bm = [_nan(res.agg[a].get(f"{m}_before_mean")) for a in arms]
        bc = [_ci(res.agg[a].get(f"{m}_before_ci95")) for a in arms]
        am = [_nan(res.agg[a].get(f"{m}_after_mean")) for a in arms]
        ac = [_ci(res.agg[a].get(f"{m}_after_ci95")) for a in arms]
        w = 0.4
        ax.bar([xi - w / 2 for xi in x], bm, w, yerr=bc, color="0.82", edgecolor="0.5",
               capsize=2, label="before")
        ax.bar([xi + w / 2 for xi in x], am, w, yerr=ac, color=[colors[a] for a in arms],
               edgecolor="black", lw=0.5, capsize=2, label="after")
        vals = [v for v in bm + am if not math.isnan(v)]
        if vals:
            lo = min(v - c for v, c in zip(bm + am, bc + ac, strict=True) if not math.isnan(v))
            hi = max(v + c for v, c in zip(bm + am, bc + ac, strict=True) if not math.isnan(v))
            pad = 0.15 * (hi - lo) if hi > lo else 0.05 * max(abs(hi), 1e-3)
            ax.set_ylim(lo - pad, hi + pad)
        ax.set_ylabel(unit)
        if i == 0:
            ax.legend(loc="best")
    for j in range(len(metrics), nrow * ncol):
        axes[j // ncol][j % ncol].set_visible(False)
    if paired:
        fig.suptitle(f"{res.name}: change after − before per benchmark and arm, with its "
                     f"{res.conf_pct} paired bootstrap CI")
        caption = ("Per benchmark, each arm's change after - before fine-tuning with its "
                   f"{res.conf_pct} paired bootstrap CI over items (crossed with seeds when there are several); "
                   "arrows give the better direction.")
        if flat_panels:
            caption += (" Unchanged in every arm (no item scored differently): "
                        + ", ".join(flat_panels) + ".")
    else:
        fig.suptitle(f"{res.name}: scores before (grey) and after fine-tuning, mean ± 95 % CI "
                     "(y-axes do not start at 0)")
        caption = ("Per-benchmark score before (grey) and after fine-tuning per arm, mean ± 95 % "
                   "CI over seeds; arrows give the better direction; y-axes zoomed (not from 0).")
    fig.tight_layout()
    _save(fig, out, "benchmarks")
    return Figure("benchmarks", caption)


_CURVE_LABELS = {"task_loss": ("task loss", "nats/token"),
                 "val_loss": ("validation loss", "nats/token"),
                 "loss/replay": ("replay loss", "nats/token"),
                 "lr": ("learning rate", "learning rate (per step)")}


def _curve_keys(curves: dict[str, Any]) -> list[str]:
    keys = set()
    for a in curves["arms"].values():
        keys |= set(a["series"])
    order = ["task_loss", "val_loss"] + sorted(k for k in keys if k.startswith("reg/")) + \
        ["loss/replay", "lr"]
    return [k for k in order if k in keys]


def fig_curves(res: Results, out: Path, colors: dict[str, Any],
               curves: dict[str, Any] | None) -> Figure | str:
    if not curves or not curves.get("arms"):
        return "curves: no train_log.jsonl and no train_curves.json"
    plt = _plt()
    keys = _curve_keys(curves)
    ncol = min(3, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.5 * nrow), squeeze=False)
    arms = [a for a in res.arms if a in curves["arms"]] + \
        [a for a in curves["arms"] if a not in res.agg]
    for i, k in enumerate(keys):
        ax = axes[i // ncol][i % ncol]
        for a in arms:
            s = curves["arms"][a]["series"].get(k)
            if not s:
                continue
            c = colors.get(a, "0.3")
            ax.plot(s["step"], s["mean"], color=c, lw=1.3, label=a,
                    marker="o" if k == "val_loss" else None, ms=3)
            if "min" in s and curves["arms"][a].get("n_seeds", 1) > 1:
                ax.fill_between(s["step"], s["min"], s["max"], color=c, alpha=0.15, lw=0)
        if k.startswith("reg/"):
            title, unit = f"{k[4:]} penalty (λ-weighted, added to loss)", "nats/token"
        else:
            title, unit = _CURVE_LABELS[k]
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(unit)
        steps = {st for a in arms for st in (curves["arms"][a]["series"].get(k) or {}).get(
            "step", [])}
        if len(steps) == 1:  # measured once (e.g. validation at the end only): say so
            ax.text(0.5, 0.92, f"measured once, at step {int(next(iter(steps)))}",
                    ha="center", va="top", transform=ax.transAxes, fontsize=8, color="0.3")
            ax.set_xticks(sorted(steps))
        if k == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-2, 2))
        elif k.startswith("reg/") and all(
                v > 0 for a in arms for v in curves["arms"][a]["series"].get(k, {}).get("mean",
                                                                                       [])):
            ax.set_yscale("log")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for j in range(len(keys), nrow * ncol):
        axes[j // ncol][j % ncol].set_visible(False)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6),
               bbox_to_anchor=(0.5, -0.02 - 0.03 * math.ceil(len(labels) / 6)))
    n = sorted({v.get("n_seeds", 1) for v in curves["arms"].values()})
    fig.suptitle(f"{res.name}: training curves, mean over seeds (n={'/'.join(map(str, n))}; "
                 "band: min..max over seeds)")
    fig.tight_layout()
    _save(fig, out, "curves")
    return Figure("curves", "Training curves per arm: task loss, validation loss, each "
                            "regularizer's λ-weighted penalty, replay loss and learning rate "
                            "against the optimizer step; lines are the mean over seeds, bands "
                            "the min..max over seeds.")


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", s).strip("_")


def fig_sweeps(res: Results, out: Path, colors: dict[str, Any]) -> list[Figure | str]:
    sweeps: dict[tuple[str, str], list[tuple[float, str]]] = {}
    for arm in res.arms:
        for k, v in res.grid.get(arm, {}).items():
            f = _as_float(v)
            if f is not None:
                sweeps.setdefault((arm_base(arm), k), []).append((f, arm))
    sweeps = {k: sorted(v) for k, v in sweeps.items() if len({x for x, _ in v}) > 1}
    if not sweeps:
        return ["sweeps: no grid arm with two or more numeric grid values"]
    plt = _plt()
    figs: list[Figure | str] = []
    task = res.metrics("task")
    gen = res.metrics("general")
    # one general metric: its own forgetting, in its unit; else the suite's aggregate
    fmetric = gen[0] if len(gen) == 1 else None
    fcol, flabel = forgetting_column(res, fmetric)
    panels = [("task_gain", f"task gain (Δ {_first_task_unit(res)}) ↑"),
              (fcol, _wrap(flabel, 40) + " ↓")]

    def value(a: dict[str, Any], col: str) -> float:
        v = _fval(res, a, col, fmetric)  # a forgetting, sign-corrected for its direction
        return math.nan if v is None else v
    for (base, key), pts in sweeps.items():
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        xs = [x for x, _ in pts]
        logx = min(xs) > 0 and max(xs) / min(xs) >= 10
        for ax, (col, label) in zip(axes, panels, strict=True):
            ys = [value(res.agg[a], col) for _, a in pts]
            es = [_ci(res.agg[a].get(f"{col}_ci95")) for _, a in pts]
            what = "mean ± 95 % CI" if any(e > 0 for e in es) else "no CI: one seed"
            ax.errorbar(xs, ys, yerr=es, fmt="o-",
                        color=colors[pts[-1][1]], capsize=3, label=f"{base} ({what})")
            if NAIVE in res.agg:
                nm = value(res.agg[NAIVE], col)
                nc = _ci(res.agg[NAIVE].get(f"{col}_ci95"))
                if not math.isnan(nm):
                    ax.axhline(nm, color=colors[NAIVE], ls="--", lw=1, label="naive (λ = 0)")
                    ax.axhspan(nm - nc, nm + nc, color=colors[NAIVE], alpha=0.1, lw=0)
            if logx:
                ax.set_xscale("log")
            ax.set_xlabel(f"{key} ({'log scale' if logx else 'linear'})")
            ax.set_ylabel(label)
            ax.legend(loc="best")
        fig.suptitle(f"{res.name}: {base} sweep over {key}"
                     + (f" (task metric: {task[0]})" if task else ""))
        fig.tight_layout()
        stem = f"sweep_{_slug(base)}_{_slug(key.split('.')[-1])}"
        _save(fig, out, stem)
        what = f"forgetting on {fmetric}" if fmetric else fcol.replace("_", " ")
        figs.append(Figure(stem, f"{base}: task gain and {what} against "
                                 f"{key} (mean ± 95 % CI over seeds); dashed: naive "
                                 "fine-tuning."))
    return figs


def _per_layer(res: Results, fname: str) -> dict[str, list[dict[str, Any]]]:
    """arm -> list of per-run {layer: entry} read from <arm>/seed-*/<fname> of ok runs."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in res.rows:
        if r["status"] != "ok":
            continue
        p = res.root / r["arm"] / f"seed-{int(r['seed'])}" / fname
        if p.exists():
            d = read_json(p)
            out.setdefault(r["arm"], []).append(d.get("layers", d))
    return out


def _layer_means(runs: list[dict[str, Any]], key: str) -> dict[str, float]:
    vals: dict[str, list[float]] = {}
    for run in runs:
        for layer, e in run.items():
            v = _as_float((e or {}).get(key))
            if v is not None:
                vals.setdefault(layer, []).append(v)
    return {k: sum(v) / len(v) for k, v in vals.items()}


def _layer_ticks(layers: list[str]) -> list[str]:
    short = {"embeddings": "emb", "lm_head": "head"}
    return [short.get(g, g[7:] if g.startswith("layers.") else g) for g in layers]


def fig_drift(res: Results, out: Path, colors: dict[str, Any]) -> Figure | str:
    from forgetkit.drift import layer_order

    data = _per_layer(res, "drift.json")
    if not data:
        return "drift: no drift.json in any run"
    plt = _plt()
    arms = [a for a in res.arms if a in data]
    means = {a: _layer_means(data[a], "rel_drift") for a in arms}
    layers = layer_order([g for m in means.values() for g in m])
    fig, ax = plt.subplots(figsize=(max(7, 0.28 * len(layers) + 3), 4.2))
    x = list(range(len(layers)))
    for a in arms:
        ax.plot(x, [means[a].get(g, math.nan) for g in layers], "o-", ms=3.5, lw=1.2,
                color=colors[a], label=f"{a} (n={len(data[a])})",
                zorder=3 if a == NAIVE else 2)
    if all(v > 0 for m in means.values() for v in m.values()):
        ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(_layer_ticks(layers), fontsize=7, rotation=90 if len(layers) > 20 else 0)
    ax.set_xlabel("parameter group (emb = embeddings, numbers = decoder layers, head = lm_head)")
    ax.set_ylabel("relative drift ‖θ−θ₀‖ / ‖θ₀‖")
    ax.set_title(f"{res.name}: weight drift per layer (mean over seeds)")
    ax.legend(loc="best", ncol=2)
    fig.tight_layout()
    _save(fig, out, "drift")
    return Figure("drift", "Relative weight drift ‖θ−θ₀‖/‖θ₀‖ per parameter group after "
                           "fine-tuning, mean over seeds (n per arm in the legend).")


def fig_fisher(res: Results, out: Path, colors: dict[str, Any]) -> Figure | str:
    from forgetkit.drift import layer_order

    data = _per_layer(res, "fisher_summary.json")
    if not data:
        return "fisher: no fisher_summary.json in any run (no EWC arm, or not recorded)"
    plt = _plt()
    bases: dict[str, list[dict[str, Any]]] = {}
    for a in res.arms:
        if a in data:
            bases.setdefault(arm_base(a), []).extend(data[a])
    layers = layer_order([g for runs in bases.values() for r in runs for g in r])
    fig, ax = plt.subplots(figsize=(max(7, 0.28 * len(layers) + 3), 4.2))
    x = list(range(len(layers)))
    for b, runs in bases.items():
        c = colors.get(b) or colors[[a for a in res.arms if arm_base(a) == b and a in data][-1]]
        mean, mx = _layer_means(runs, "mean"), _layer_means(runs, "max")
        ax.plot(x, [mean.get(g, math.nan) for g in layers], "o-", ms=3.5, color=c,
                label=f"{b}: mean F per weight ({len(runs)} runs)")
        ax.plot(x, [mx.get(g, math.nan) for g in layers], "^:", ms=3.5, color=c,
                label=f"{b}: max F per weight")
    ax.set_yscale("log")
    ax.set_xticks(x)
    ax.set_xticklabels(_layer_ticks(layers), fontsize=7, rotation=90 if len(layers) > 20 else 0)
    ax.set_xlabel("parameter group (emb = embeddings, numbers = decoder layers, head = lm_head)")
    ax.set_ylabel("diagonal Fisher (log scale)")
    ax.set_title(f"{res.name}: Fisher magnitude per layer (averaged over runs)")
    ax.legend(loc="best")
    fig.tight_layout()
    _save(fig, out, "fisher")
    return Figure("fisher", "Diagonal Fisher information per parameter group used by EWC: mean "
                            "(solid) and max (dotted) per weight, averaged over the runs.")


def make_figures(res: Results, out: Path, curves: dict[str, Any] | None) -> Report:
    rep = Report()
    if not res.agg:
        rep.skipped.append("all figures: no successful run")
        return rep
    colors = arm_colors(res.arms + [a for a in (curves or {}).get("arms", {})
                                    if a not in res.agg])
    items: list[Figure | str] = [fig_pareto(res, out, colors)]
    items += [fig_pareto(res, out, colors, m) for m in headline_paretos(res)]
    items += [fig_benchmarks(res, out, colors), fig_curves(res, out, colors, curves)]
    items += fig_sweeps(res, out, colors)
    items += [fig_drift(res, out, colors), fig_fisher(res, out, colors)]
    for it in items:
        if isinstance(it, Figure):
            rep.figures.append(it)
        else:
            rep.skipped.append(it)
    return rep

