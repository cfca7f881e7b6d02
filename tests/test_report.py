"""forgetkit.drift (hand-computed per-layer values) and forgetkit.report on a synthetic results
tree written here: every figure and table, hand-computed means/CIs, bold best, failed runs."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from forgetkit.drift import (
    drift_record,
    fisher_record,
    fisher_summary,
    layer_drift,
    layer_of,
    layer_order,
)
from forgetkit.results import write_json
from forgetkit.results.summary import write_tables

T2 = 4.302652729749464   # t_{0.975, 2}: 3 seeds
T1 = 12.706204736174698  # t_{0.975, 1}: 2 seeds

# ----------------------------------------------------------------------------- drift


def test_layer_of_and_order() -> None:
    assert layer_of("model.layers.12.self_attn.q_proj.weight") == "layers.12"
    assert layer_of("module.model.layers.0.mlp.up_proj.weight") == "layers.0"
    assert layer_of("transformer.h.3.attn.c_attn.weight") == "layers.3"
    assert layer_of("model.embed_tokens.weight") == "embeddings"
    assert layer_of("transformer.wte.weight") == "embeddings"
    assert layer_of("model.norm.weight") == "norm"
    assert layer_of("transformer.ln_f.bias") == "norm"
    assert layer_of("lm_head.weight") == "lm_head"
    assert layer_of("score.weight") == "score"
    assert layer_order(["lm_head", "layers.10", "norm", "layers.2", "embeddings", "x"]) == \
        ["embeddings", "layers.2", "layers.10", "norm", "lm_head", "x"]


def test_layer_drift_hand_computed() -> None:
    t0 = {"model.layers.0.a.weight": torch.tensor([3.0, 4.0]),
          "model.layers.0.b.bias": torch.tensor([0.0]),
          "model.embed_tokens.weight": torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
          "model.norm.weight": torch.ones(4),
          "lm_head.weight": torch.tensor([[2.0]]),
          "only.before": torch.ones(3)}
    t1 = {"model.layers.0.a.weight": torch.tensor([6.0, 8.0]),
          "model.layers.0.b.bias": torch.tensor([0.0]),
          "model.embed_tokens.weight": torch.tensor([[1.0, 0.0], [0.0, 0.5]]),
          "model.norm.weight": torch.ones(4),
          "lm_head.weight": torch.tensor([[1.0]]),
          "only.after": torch.ones(3)}
    d = layer_drift(t0, t1)
    assert list(d) == ["embeddings", "layers.0", "norm", "lm_head"]
    assert d["layers.0"] == pytest.approx({"rel_drift": 1.0, "drift": 5.0, "norm0": 5.0,
                                           "norm": 10.0, "n_params": 3})
    assert d["embeddings"] == pytest.approx({"rel_drift": 0.5, "drift": 0.5, "norm0": 1.0,
                                             "norm": math.sqrt(1.25), "n_params": 4})
    assert d["norm"]["rel_drift"] == 0.0 and d["norm"]["norm0"] == pytest.approx(2.0)
    assert d["lm_head"]["rel_drift"] == pytest.approx(0.5)
    rec = drift_record(t0, t1)
    assert rec["format"] == 1 and rec["layers"] == d
    assert rec["total"]["rel_drift"] == pytest.approx(math.sqrt(26.25 / 34))
    assert rec["total"]["n_params"] == 12
    json.dumps(rec)  # plain JSON types only
    with pytest.raises(ValueError, match="shape"):
        layer_drift({"w": torch.ones(2)}, {"w": torch.ones(3)})


def test_fisher_summary_hand_computed() -> None:
    f = {"model.layers.0.w": torch.tensor([1.0, 2.0, 3.0]), "model.layers.0.b": torch.tensor([6.0]),
         "lm_head.weight": torch.tensor([[0.5, 0.5]])}
    s = fisher_summary(f)
    assert s == {"layers.0": {"mean": 3.0, "max": 6.0, "sum": 12.0, "n_params": 4},
                 "lm_head": {"mean": 0.5, "max": 0.5, "sum": 1.0, "n_params": 2}}
    rec = fisher_record(f)
    assert rec["total"] == pytest.approx({"mean": 13 / 6, "max": 6.0, "sum": 13.0, "n_params": 6})
    json.dumps(rec)


# ----------------------------------------------------------------------------- synthetic tree

BEFORE = {"medqa": 0.30, "med_nll": 2.0, "piqa": 0.60, "boolq": 0.55}
META = {"medqa": ("task", "acc", True), "med_nll": ("task", "nll", False),
        "piqa": ("general", "acc_norm", True), "boolq": ("general", "acc", True)}


def _after(arm: str, s: int) -> dict[str, float]:
    return {
        "naive": {"medqa": 0.40 + 0.01 * s, "med_nll": 1.5, "piqa": 0.50 + 0.01 * s,
                  "boolq": 0.50},
        "l2": {"medqa": 0.38 + 0.01 * s, "med_nll": 1.6, "piqa": 0.55 + 0.01 * s,
               "boolq": 0.521},
        "ewc@lambda=10.0": {"medqa": 0.39 + 0.01 * s, "med_nll": 1.55, "piqa": 0.57,
                            "boolq": 0.53 + 0.006 * s},
        "ewc@lambda=1000.0": {"medqa": 0.33 + 0.02 * s, "med_nll": 1.9, "piqa": 0.59,
                              "boolq": 0.55},
        "replay": {"medqa": 0.39, "med_nll": 1.6, "piqa": 0.58, "boolq": 0.54},
    }[arm]


def _scores(vals: dict[str, float]) -> dict[str, Any]:
    out: dict[str, Any] = {"task": {}, "general": {}}
    for name, v in vals.items():
        role, metric, hib = META[name]
        out[role][name] = {"value": v, "stderr": 0.01, "higher_is_better": hib,
                           "metric": metric, "kind": "answer_nll" if metric == "nll"
                           else "lm_eval"}
    return out


def _log(arm: str, s: int) -> str:
    lines = []
    for step in range(10, 101, 10):
        r: dict[str, Any] = {"step": step, "epoch": step / 100, "loss": 2.0 - 0.01 * step +
                             0.02 * s, "lr": 1e-4 * (1 - step / 100), "grad_norm": 1.0,
                             "tokens": 1000 * step, "target_tokens": 400 * step}
        if arm.startswith("ewc"):
            r["reg/ewc"] = 0.001 * step * (1 + s)
        if arm == "l2":
            r["reg/l2"] = 0.0005 * step
        if arm == "replay":
            r["loss/replay"], r["loss/task"] = 1.2 + 0.01 * s, r["loss"] + 0.1
        if step == 50:
            r["val_loss"] = 1.6 + 0.01 * s
        lines.append(json.dumps(r))
    lines.append(json.dumps({"step": 100, "final": True, "val_loss": 1.2 + 0.01 * s}))
    return "\n".join(lines) + "\n"


ARMS = ["naive", "l2", "ewc@lambda=10.0", "ewc@lambda=1000.0", "replay"]
DRIFT_SCALE = {"naive": 1e-2, "l2": 3e-3, "ewc@lambda=10.0": 5e-3, "ewc@lambda=1000.0": 1e-3,
               "replay": 7e-3}


def make_tree(root: Path, logs: bool = True) -> Path:
    """results/<experiment> with 5 arms x 3 seeds (l2 seed 2 failed), CSVs built by summary."""
    g = torch.Generator().manual_seed(0)
    theta0 = {"model.embed_tokens.weight": torch.randn(8, 4, generator=g)}
    for i in range(3):
        theta0[f"model.layers.{i}.mlp.weight"] = torch.randn(4, 4, generator=g)
    theta0["model.norm.weight"] = torch.ones(4)
    theta0["lm_head.weight"] = torch.randn(8, 4, generator=g)
    for arm in ARMS:
        for s in range(3):
            d = root / arm / f"seed-{s}"
            grid = ({"regularizers.0.lambda": float(arm.split("=")[1])} if "@" in arm else {})
            if arm == "l2" and s == 2:
                write_json(d / "summary.json", {"status": "failed", "arm": arm, "seed": s,
                                                "grid": grid, "error": "RuntimeError: boom"})
                continue
            write_json(d / "summary.json", {
                "status": "ok", "arm": arm, "seed": s, "grid": grid,
                "before": _scores(BEFORE), "after": _scores(_after(arm, s)),
                "train": {"train_time_s": 10.0 + s, "tokens": 100000, "target_tokens": 40000,
                          "steps": 100}})
            if logs:
                (d / "train_log.jsonl").write_text(_log(arm, s))
            k = DRIFT_SCALE[arm] * (1 + 0.1 * s)
            theta = {n: t * (1 + k * (1 + i)) for i, (n, t) in enumerate(theta0.items())}
            write_json(d / "drift.json", drift_record(theta0, theta))
            if arm.startswith("ewc"):
                write_json(d / "fisher_summary.json", fisher_record(
                    {n: t.abs() * 1e-4 * (1 + i) for i, (n, t) in enumerate(theta0.items())}))
    write_tables(root)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tree(tmp_path_factory.mktemp("results") / "synth")


@pytest.fixture(scope="module")
def report(tree: Path) -> tuple[Path, Any]:
    from forgetkit.report import build_report

    out = tree / "report"
    return out, build_report(tree, out)


# ----------------------------------------------------------------------------- report


def _ci(sd: float, n: int) -> float:
    return {3: T2, 2: T1}[n] * sd / math.sqrt(n)


def test_every_figure_written(report: tuple[Path, Any]) -> None:
    out, rep = report
    stems = {f.stem for f in rep.figures}
    assert stems == {"pareto", "benchmarks", "curves", "sweep_ewc_lambda", "drift", "fisher"}
    assert rep.skipped == []
    for stem in stems:
        for ext in ("png", "pdf"):
            p = out / f"{stem}.{ext}"
            assert p.exists() and p.stat().st_size > 1000, p
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "pareto.pdf").read_bytes()[:5] == b"%PDF-"
    index = (out / "index.md").read_text()
    for stem in stems:
        assert f"![{stem}]({stem}.png)" in index
    for t in ("main", "benchmarks", "deltas"):
        assert (out / f"table_{t}.md").exists() and (out / f"table_{t}.tex").exists()
    curves = json.loads((Path(out).parent / "train_curves.json").read_text())
    assert set(curves["arms"]) == set(ARMS)
    naive = curves["arms"]["naive"]["series"]["task_loss"]
    assert naive["step"][0] == 10 and naive["mean"][0] == pytest.approx(1.9 + 0.02)
    assert naive["min"][0] == pytest.approx(1.9) and naive["max"][0] == pytest.approx(1.94)
    assert curves["arms"]["replay"]["series"]["task_loss"]["mean"][0] == pytest.approx(2.02)
    assert "reg/ewc" in curves["arms"]["ewc@lambda=10.0"]["series"]
    assert curves["arms"]["naive"]["series"]["val_loss"]["step"] == [50, 100]


def _md_rows(path: Path) -> dict[str, list[str]]:
    rows = {}
    for ln in path.read_text().splitlines():
        if ln.startswith("| ") and not ln.startswith("| Arm"):
            cells = [c.strip() for c in ln.strip("|").split("|")]
            rows[cells[0].replace("**", "").split(" (n=")[0]] = cells[1:]
    return rows


def test_main_table_hand_computed(report: tuple[Path, Any]) -> None:
    out, _ = report
    text = (out / "table_main.md").read_text()
    # no per-item scores in this tree: no paired columns, and the mixed-unit mean is gone
    assert "| Arm | Task gain ↑ | Rel. forgetting ↓ | Retention ↑ |" in text
    rows = _md_rows(out / "table_main.md")
    assert list(rows) == ["naive", "ewc@lambda=10.0", "ewc@lambda=1000.0", "l2", "replay"]
    assert rows["naive"][0] == f"**0.110 ± {_ci(0.01, 3):.3f}**"
    # naive: relative forgetting ((0.10 - 0.01 s) / 0.6 + 0.05 / 0.55) / 2 per seed
    rel = [((0.10 - 0.01 * s) / 0.6 + 0.05 / 0.55) / 2 for s in range(3)]
    assert rows["naive"][1] == f"{sum(rel) / 3:.3f} ± {_ci(0.01 / 0.6 / 2, 3):.3f}"
    # l2: seed 2 failed -> 2 seeds
    assert "l2 (n=2)" in text
    assert rows["l2"][0] == f"0.085 ± {_ci(math.sqrt(2) * 0.005, 2):.3f}"
    rel = [((0.05 - 0.01 * s) / 0.6 + 0.029 / 0.55) / 2 for s in range(2)]
    assert rows["l2"][1] == f"{sum(rel) / 2:.3f} ± {_ci(0.01 / 0.6 / 2 / math.sqrt(2), 2):.3f}"
    # ewc@1000: gain 0.03, 0.05, 0.07; relative forgetting (0.01/0.6 + 0) / 2 every seed -> best
    assert rows["ewc@lambda=1000.0"][0] == f"0.050 ± {_ci(0.02, 3):.3f}"
    assert rows["ewc@lambda=1000.0"][1] == f"**{0.01 / 0.6 / 2:.3f} ± 0.000**"
    # retention: mean of after/before over piqa, boolq; ewc@1000: (0.59/0.6 + 1) / 2 best
    assert rows["ewc@lambda=1000.0"][2] == f"**{(0.59 / 0.6 + 1) / 2:.3f} ± 0.000**"
    bold = {a: [c.startswith("**") for c in r] for a, r in rows.items()}
    assert bold["naive"] == [True, False, False]
    assert bold["l2"] == [False] * 3
    tex = (out / "table_main.tex").read_text()
    assert r"\toprule" in tex and r"\bottomrule" in tex and r"$\uparrow$" in tex
    assert r"\textbf{0.008 $\pm$ 0.000}" in tex and r"ewc@lambda=1000.0" in tex


def test_benchmark_tables(report: tuple[Path, Any]) -> None:
    out, _ = report
    rows = _md_rows(out / "table_benchmarks.md")
    assert rows["base model (before)"][:4] == ["0.300 ± 0.000", "2.000 ± 0.000", "0.600 ± 0.000",
                                      "0.550 ± 0.000"]
    text = (out / "table_benchmarks.md").read_text()
    assert "med_nll [task] ↓" in text and "piqa [general] ↑" in text
    # med_nll is lower-is-better: naive's 1.5 is best, bold
    assert rows["naive"][1] == "**1.500 ± 0.000**"
    assert rows["naive"][0] == f"**0.410 ± {_ci(0.01, 3):.3f}**"
    deltas = _md_rows(out / "table_deltas.md")
    assert deltas["naive"][1] == "**-0.500 ± 0.000**"
    assert deltas["ewc@lambda=1000.0"][3] == "**0.000 ± 0.000**"


def test_failed_runs_listed_not_plotted(report: tuple[Path, Any], tree: Path) -> None:
    from forgetkit.report import load_results

    out, _ = report
    index = (out / "index.md").read_text()
    assert "l2 seed 2: RuntimeError: boom" in index
    assert "14 successful runs, 1 failed" in index
    res = load_results(tree)
    assert res.agg["l2"]["n_seeds"] == 2
    assert res.grid["ewc@lambda=10.0"] == {"regularizers.0.lambda": 10.0}


def test_pareto_front() -> None:
    from forgetkit.report import pareto_front

    pts = [("a", 0.1, 0.07), ("b", 0.05, 0.005), ("c", 0.04, 0.01), ("d", 0.08, 0.03)]
    assert pareto_front(pts) == ["b", "d", "a"]


def test_curves_from_committed_file_only(tree: Path, tmp_path: Path) -> None:
    """Without train logs the curves come from train_curves.json; without either: a note."""
    from forgetkit.report import arm_colors, fig_curves, load_curves, load_results

    slim = make_tree(tmp_path / "slim", logs=False)
    res = load_results(slim)
    assert load_curves(res) is None
    assert "curves" in str(fig_curves(res, tmp_path / "r", {}, None))
    load_curves(load_results(tree))  # writes tree/train_curves.json from the logs
    (slim / "train_curves.json").write_bytes((tree / "train_curves.json").read_bytes())
    curves = load_curves(res)
    assert curves is not None and set(curves["arms"]) == set(ARMS)
    fig = fig_curves(res, tmp_path / "r", arm_colors(res.arms), curves)
    assert getattr(fig, "stem", None) == "curves" and (tmp_path / "r" / "curves.png").exists()


def test_cli(tree: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import forgetkit.report as report
    import forgetkit.report.index as index  # build_report looks make_figures up there

    monkeypatch.setattr(index, "make_figures", lambda *a, **k: report.Report())  # fast
    assert report.main([str(tree), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "index.md").exists()
    assert (tmp_path / "cli" / "table_main.tex").exists()
    assert report.main([str(tmp_path / "missing")]) == 2


def test_per_metric_pareto_for_nll_in_a_mixed_unit_suite(tmp_path: Path) -> None:
    """The committed study mixes nats (wiki_nll) and accuracies in its general suite: the report
    adds pareto_wiki_nll, whose forgetting is the NLL rise (and an accuracy's drop)."""
    from forgetkit.report import (
        _fval,
        build_report,
        forgetting_column,
        headline_paretos,
        load_results,
    )

    root = Path(__file__).resolve().parents[1] / "results" / "ewc_medical"
    res = load_results(root)
    assert headline_paretos(res) == ["wiki_nll"]
    a = res.agg["naive"]
    col, _ = forgetting_column(res, "wiki_nll")
    assert _fval(res, a, col, "wiki_nll") == pytest.approx(
        float(a["wiki_nll_after_mean"]) - float(a["wiki_nll_before_mean"]), abs=1e-9)
    col, _ = forgetting_column(res, "piqa")
    assert _fval(res, a, col, "piqa") == pytest.approx(-float(a["piqa_delta_mean"]))
    rep = build_report(root, tmp_path / "report")
    assert {"pareto", "pareto_wiki_nll"} <= {f.stem for f in rep.figures}
    assert (tmp_path / "report" / "pareto_wiki_nll.png").stat().st_size > 10_000
    # a suite in one unit keeps the single Pareto (the synthetic tree: accuracies only)
    assert headline_paretos(load_results(make_tree(tmp_path / "synth"))) == []
