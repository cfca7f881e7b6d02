"""``python -m forgetkit.evaluate``: checkpoints trained elsewhere, scored with forgetkit's suite.

Tiny random-init Llamas saved as standard HF checkpoints stand in for a base model and its
fine-tunes (the base with seeded noise added to every weight). The CLI runs in-process
(``main(argv)``) except for one subprocess dry run. Checked:

* the results tree of the runner's contract, summary.csv with one row per checkpoint, and
  ``forgetkit.report``-readable files; eval_after equals ``forgetkit.runner.evaluate`` of the
  checkpoint computed directly (the same code on the same inputs in the same process: equal);
* the base model is scored once: a second command with another checkpoint reuses the cache;
* every input mistake fails in the checks, with its own message, before anything is written;
* reuse of a matching result, refusal of a changed one (naming the keys), ``--force``, and a
  failed ``--force`` that keeps the old result;
* WiSE-FT points between the base and a checkpoint: alpha 0 scores the base, alpha 1 the
  checkpoint (torch.lerp returns either end bit for bit).
"""

from __future__ import annotations

import copy
import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_LLAMA, write_instruction_data

from forgetkit.evaluate import main

ROOT = Path(__file__).resolve().parents[1]
GENERAL = ROOT / "experiments" / "data" / "smoke_general.jsonl"
TINY_TASK_DIR = ROOT / "tests" / "assets" / "lmeval_tiny"
RUN_FILES = ("config.yaml", "env.json", "identity.json", "eval_before.json", "eval_after.json",
             "summary.json")


def save_tiny(out: Path, perturb: int | None = None, **arch: Any) -> Path:
    """A tiny random-init Llama (byte tokenizer) saved with save_pretrained; ``perturb`` adds
    0.02 * N(0, 1) noise seeded by it to every weight (a "fine-tuned" checkpoint)."""
    from forgetkit.config import ModelConfig
    from forgetkit.models import load_model, save_hf_checkpoint

    model, tok = load_model(ModelConfig(random_init={**TINY_LLAMA, **arch}, tokenizer="byte"),
                            seed=0)
    if perturb is not None:
        g = torch.Generator().manual_seed(perturb)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=g))
    return save_hf_checkpoint(model, tok, out)


def write_suite(path: Path, data: Path, lm_eval: bool = False, **evaluation: Any) -> Path:
    """An experiment-style YAML whose model, data and training sections must be ignored (the
    data file does not exist; the model is not the base)."""
    general: list[dict[str, Any]] = [{"name": "general_nll", "kind": "perplexity", "limit": 8,
                                      "data": {"path": str(GENERAL), "format": "text"}}]
    if lm_eval:
        general.append({"name": "rev", "kind": "lm_eval", "task": "forgetkit_tiny_reverse",
                        "include_path": str(TINY_TASK_DIR), "limit": 12})
    suite = {"name": "tiny_suite",
             "model": {"random_init": {**TINY_LLAMA, "hidden_size": 32}, "tokenizer": "byte"},
             "data": {"train": {"path": str(path.parent / "no-such-train.jsonl")}},
             "training": {"lr": 1.0e-3},
             "evaluation": {"task": [{"name": "task_nll", "kind": "answer_nll",
                                      "data": {"path": str(data)}}],
                            "general": general, "batch_size": 8, **evaluation},
             "analysis": {"headline": ["general_nll"]}}
    path.write_text(yaml.safe_dump(suite, sort_keys=False))
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("evaluate")
    data = write_instruction_data(d / "task_eval.jsonl", n=8, seed=123)
    return {"dir": d, "base": save_tiny(d / "base"), "t1": save_tiny(d / "t1", perturb=1),
            "t2": save_tiny(d / "t2", perturb=2), "t3": save_tiny(d / "t3", perturb=3),
            "suite": write_suite(d / "suite.yaml", data),
            "suite_lmeval": write_suite(d / "suite_lmeval.yaml", data, lm_eval=True)}


def count_evaluations(mp: pytest.MonkeyPatch, fail_for: Path | None = None) -> list[str]:
    """Record the checkpoint of every ``forgetkit.runner.evaluate`` call (before-scores and
    after-scores both go through it); raise for ``fail_for``."""
    import forgetkit.runner as runner

    calls: list[str] = []
    real = runner.evaluate

    def counted(model_dir: Any, cfg: Any) -> dict[str, Any]:
        calls.append(str(model_dir))
        if fail_for is not None and Path(model_dir) == fail_for:
            raise RuntimeError("simulated evaluation failure")
        return real(model_dir, cfg)

    mp.setattr(runner, "evaluate", counted)
    return calls


def args(tiny: dict[str, Path], out: Path, *tuned: str, suite: str = "suite") -> list[str]:
    argv = ["--config", str(tiny[suite]), "--base", str(tiny["base"]), "--out", str(out)]
    for t in tuned:
        argv += ["--tuned", t]
    return argv


def read(p: Path) -> Any:
    return json.loads(p.read_text())


def scores(tree: Any) -> Any:
    """An evaluation tree as JSON stores it, without its timings (``seconds`` per metric and
    per evaluation: the only part that differs between two evaluations of one checkpoint)."""
    if isinstance(tree, dict):
        return {k: scores(v) for k, v in tree.items() if k != "seconds"}
    if isinstance(tree, list):
        return [scores(v) for v in tree]
    return tree


def csv_rows(root: Path) -> list[dict[str, str]]:
    with (root / "summary.csv").open() as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def evaluated(tiny) -> tuple[Path, list[str]]:
    """Two seeds of one arm, with a local lm-eval task in the suite."""
    out = tiny["dir"] / "out"
    with pytest.MonkeyPatch.context() as mp:
        calls = count_evaluations(mp)
        rc = main(args(tiny, out, f"ft={tiny['t1']}", f"ft={tiny['t2']}", suite="suite_lmeval"))
    assert rc == 0
    return out, calls


def test_results_tree_follows_the_runner_contract(tiny, evaluated):
    out, calls = evaluated
    assert calls == [str(tiny["base"]), str(tiny["t1"]), str(tiny["t2"])]  # base once
    (cache,) = (out / "_cache").glob("eval_before-*.json")
    for seed, tuned in ((0, tiny["t1"]), (1, tiny["t2"])):
        d = out / "ft" / f"seed-{seed}"
        for f in RUN_FILES + ("drift.json",):
            assert (d / f).is_file(), d / f
        s = read(d / "summary.json")
        assert (s["status"], s["arm"], s["seed"], s["grid"], s["train"]) == ("ok", "ft", seed,
                                                                             {}, {})
        assert s["source"]["tuned"] == str(tuned.resolve())
        assert s["source"]["base"] == str(tiny["base"])
        assert set(s["after"]["general"]) == {"general_nll", "rev"}
        assert "items" not in s["after"]["general"]["rev"]  # summary.json stays small
        after = read(d / "eval_after.json")
        assert len(after["general"]["rev"]["items"]["score"]) == 12  # per-item scores kept
        assert read(d / "eval_before.json") == read(cache)
        ident = read(d / "identity.json")
        assert ident["tool"] == "forgetkit.evaluate"
        assert ident["tuned.path"] == str(tuned.resolve())
        assert set(ident) >= {"eval_cache_key", "tuned.config_sha256",
                              "tuned.file.model.safetensors", "evaluation.batch_size"}
        assert read(d / "drift.json")["total"]["rel_drift"] > 0
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        assert cfg["model"]["name_or_path"] == str(tiny["base"])
        assert "training" not in cfg and "data" not in cfg  # nothing was trained
    assert read(out / "analysis.json")["headline"] == ["general_nll"]
    assert not (out / "_tmp").exists() and not (out / "_replaced").exists()


def test_after_scores_equal_a_direct_evaluation(tiny, evaluated):
    from forgetkit.config import config_from_dict, read_yaml
    from forgetkit.runner import evaluate

    out, _ = evaluated
    d = out / "ft" / "seed-0"
    cfg = config_from_dict(read_yaml(d / "config.yaml"), "saved config")
    direct = evaluate(tiny["t1"], cfg)
    # the same function on the same checkpoint, items and batches in one process: equal
    assert scores(read(d / "eval_after.json")) == scores(json.loads(json.dumps(direct)))


def test_summary_csv_has_one_row_per_checkpoint(tiny, evaluated):
    out, _ = evaluated
    rows = csv_rows(out)
    assert [(r["arm"], r["seed"], r["status"]) for r in rows] == [("ft", "0", "ok"),
                                                                 ("ft", "1", "ok")]
    for r in rows:
        after = read(out / "ft" / f"seed-{r['seed']}" / "eval_after.json")
        assert float(r["general_nll_after"]) == pytest.approx(after["general"]["general_nll"]
                                                             ["value"], rel=1e-12)
        # paired columns come from the per-item scores of base and checkpoint
        assert r["general_nll_delta_lo"] != "" and r["rev_delta_lo"] != ""
    assert rows[0]["general_nll_before"] == rows[1]["general_nll_before"]
    assert (out / "summary_agg.csv").is_file()


def test_a_second_checkpoint_reuses_the_base_scores(tiny, evaluated, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(evaluated[0], out)  # copy2: mtimes kept
    (cache,) = (out / "_cache").glob("eval_before-*.json")
    stamp = cache.stat().st_mtime_ns
    with pytest.MonkeyPatch.context() as mp:
        calls = count_evaluations(mp)
        assert main(args(tiny, out, f"other={tiny['t3']}", suite="suite_lmeval")) == 0
    assert calls == [str(tiny["t3"])]  # the base was not scored again
    assert cache.stat().st_mtime_ns == stamp
    s = read(out / "other" / "seed-0" / "summary.json")
    assert s["before_cache_hit"] is True
    assert read(out / "other" / "seed-0" / "eval_before.json") == read(cache)
    assert sorted((r["arm"], r["seed"]) for r in csv_rows(out)) == [
        ("ft", "0"), ("ft", "1"), ("other", "0")]


def test_dry_run_in_a_subprocess_writes_nothing(tiny, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "forgetkit.evaluate",
                           *args(tiny, out, f"ft={tiny['t1']}"), "--dry-run"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "answer_nll" in proc.stderr and "8 items" in proc.stderr
    assert f"✓ --tuned ft={tiny['t1']}" in proc.stderr and "llama like the base" in proc.stderr
    assert "checks:" in proc.stderr and not out.exists()


# ----------------------------------------------------------------------------- bad input

def _no_tokenizer(d: Path, tiny: dict[str, Path]) -> str:
    shutil.copytree(tiny["t1"], d)
    for f in d.glob("tokenizer*"):
        f.unlink()
    return f"ft={d}"


def _no_weights(d: Path, tiny: dict[str, Path]) -> str:
    shutil.copytree(tiny["t1"], d)
    (d / "model.safetensors").unlink()
    return f"ft={d}"


def _missing_shard(d: Path, tiny: dict[str, Path]) -> str:
    shutil.copytree(tiny["t1"], d)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"a": "model.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    return f"ft={d}"


def _adapter(d: Path, tiny: dict[str, Path]) -> str:
    d.mkdir()
    (d / "adapter_config.json").write_text("{}")
    return f"ft={d}"


def _trainer_dir(d: Path, tiny: dict[str, Path]) -> str:
    shutil.copytree(tiny["t1"], d / "checkpoint-500")
    return f"ft={d}"


BAD = {
    "missing path": (lambda d, t: f"ft={d}", "no such directory"),
    "no config.json": (_trainer_dir, "holds the checkpoints checkpoint-500: pass one of them"),
    "LoRA adapter": (_adapter, "is a LoRA adapter, not a full checkpoint"),
    "no weights": (_no_weights, "holds no weights"),
    "missing shard": (_missing_shard, "lists 1 shard(s) that are not in"),
    "no tokenizer": (_no_tokenizer, "holds no tokenizer files"),
    "architecture": (lambda d, t: f"ft={save_tiny(d, perturb=1, hidden_size=32)}",
                     "hidden_size 32 (checkpoint) vs 64 (base)"),
    "layers": (lambda d, t: f"ft={save_tiny(d, num_hidden_layers=3)}",
               "num_hidden_layers 3 (checkpoint) vs 2 (base)"),
    "unsafe name": (lambda d, t: f"a/b={t['t1']}", "'a/b' is not a safe name"),
    "reserved name": (lambda d, t: f"_cache={t['t1']}", "reserves for its own folders"),
    "no '='": (lambda d, t: str(t["t1"]), "expected NAME=PATH"),
    "same checkpoint twice": (lambda d, t: [f"ft={t['t1']}", f"ft={t['t1']}"],
                              "already given under the name 'ft'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_fails_in_the_checks_and_writes_nothing(case, tiny, tmp_path, capsys):
    make, message = BAD[case]
    tuned = make(tmp_path / "ckpt", tiny)
    tuned = tuned if isinstance(tuned, list) else [tuned]
    out = tmp_path / "out"
    with pytest.MonkeyPatch.context() as mp:
        calls = count_evaluations(mp)
        rc = main(args(tiny, out, f"good={tiny['t2']}", *tuned))
    err = capsys.readouterr().err
    assert rc == 2, err
    assert message in err
    assert not out.exists() and calls == []


def test_overrides_outside_evaluation_are_refused(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(args(tiny, out, f"ft={tiny['t1']}") + ["training.lr=1"]) == 2
    assert "reads only evaluation.*, analysis.* and name" in capsys.readouterr().err
    assert not out.exists()


# ----------------------------------------------------------------------------- reuse, force

def test_reuse_refusal_and_force(tiny, tmp_path, capsys):
    from forgetkit.config import config_from_dict, read_yaml
    from forgetkit.runner import evaluate

    ck = save_tiny(tmp_path / "ck", perturb=5)
    out = tmp_path / "out"
    argv = args(tiny, out, f"ft={ck}")
    assert main(argv) == 0
    d = out / "ft" / "seed-0"
    first = (d / "summary.json").read_bytes()
    with pytest.MonkeyPatch.context() as mp:  # the same command again: nothing is scored
        calls = count_evaluations(mp)
        assert main(argv) == 0
    assert calls == [] and (d / "summary.json").read_bytes() == first
    assert "1 reused from earlier" in capsys.readouterr().err

    save_tiny(ck, perturb=6)  # the checkpoint replaced in place
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "tuned.file.model.safetensors" in err and "--force" in err
    assert (d / "summary.json").read_bytes() == first  # refused: nothing changed

    with pytest.MonkeyPatch.context() as mp:
        calls = count_evaluations(mp)
        assert main(argv + ["--force"]) == 0
    assert calls == [str(ck.resolve())]  # the base's scores came from the cache
    cfg = config_from_dict(read_yaml(d / "config.yaml"), "saved config")
    new = json.loads(json.dumps(evaluate(ck, cfg)))
    assert scores(read(d / "eval_after.json")) == scores(new)  # the new weights' scores
    assert not (out / "_tmp").exists() and not (out / "_replaced").exists()
    assert main(argv) == 0  # and the new result is reused


def test_a_failed_force_keeps_the_old_result(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = args(tiny, out, f"ft={tiny['t1']}", f"new={tiny['t2']}")
    assert main(args(tiny, out, f"ft={tiny['t1']}")) == 0
    d = out / "ft" / "seed-0"
    before = {f: (d / f).read_bytes() for f in RUN_FILES}
    with pytest.MonkeyPatch.context() as mp:
        count_evaluations(mp, fail_for=tiny["t1"])
        assert main(argv + ["--force"]) == 1
    err = capsys.readouterr().err
    assert "1 of 2 checkpoints failed: ft seed 0 (RuntimeError: simulated evaluation failure)" in err
    assert {f: (d / f).read_bytes() for f in RUN_FILES} == before  # the old result, untouched
    (log,) = (out / "_failed").glob("*/ft/seed-0/run.log")
    assert "simulated evaluation failure" in log.read_text()
    assert read(out / "new" / "seed-0" / "summary.json")["status"] == "ok"  # the others go on
    assert not (out / "_tmp").exists()


def test_a_failure_is_recorded_and_evaluated_again_next_time(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    argv = args(tiny, out, f"ft={tiny['t1']}")
    with pytest.MonkeyPatch.context() as mp:
        count_evaluations(mp, fail_for=tiny["t1"])
        assert main(argv) == 1
    s = read(out / "ft" / "seed-0" / "summary.json")
    assert s["status"] == "failed" and "simulated evaluation failure" in s["error"]
    assert [r["status"] for r in csv_rows(out)] == ["failed"]
    assert main(argv) == 0  # no --force needed: an unfinished result is evaluated again
    assert [r["status"] for r in csv_rows(out)] == ["ok"]


# ----------------------------------------------------------------------------- WiSE-FT

def test_wise_endpoints_score_the_base_and_the_checkpoint(tiny, tmp_path):
    data = tiny["dir"] / "task_eval.jsonl"
    suite = write_suite(tmp_path / "suite.yaml", data, wise_alphas=[0.0, 1.0])
    t = copy.copy(tiny)
    t["suite"] = suite
    out = tmp_path / "out"
    assert main(args(t, out, f"ft={tiny['t1']}")) == 0
    after = read(out / "ft" / "seed-0" / "eval_after.json")
    before = read(out / "ft" / "seed-0" / "eval_before.json")
    for role in ("task", "general"):
        for name, rec in after[role].items():
            # torch.lerp(θ0, θ*, 0) is θ0 and (.., 1) is θ* bit for bit: the same scores
            assert after["wise"]["0.0"][role][name]["value"] == before[role][name]["value"]
            assert after["wise"]["1.0"][role][name]["value"] == rec["value"]
    row = {r["point"]: r for r in csv.DictReader((out / "points.csv").open())}
    assert set(row) >= {"final", "wise:0.0", "wise:1.0"}


def test_interrupt_keeps_finished_results_and_leaves_no_partial_one(tiny, tmp_path, capsys,
                                                                    monkeypatch):
    import forgetkit.runner as runner

    out = tmp_path / "out"
    assert main(args(tiny, out, f"ft={tiny['t1']}")) == 0
    done = (out / "ft" / "seed-0" / "summary.json").read_bytes()
    real = runner.evaluate

    def interrupted(model_dir: Any, cfg: Any) -> dict[str, Any]:
        if Path(model_dir) == tiny["t2"]:
            raise KeyboardInterrupt
        return real(model_dir, cfg)

    monkeypatch.setattr(runner, "evaluate", interrupted)
    assert main(args(tiny, out, f"ft={tiny['t1']}", f"ft={tiny['t2']}")) == 130
    err = capsys.readouterr().err
    assert "interrupted while evaluating checkpoint 2/2 (ft seed 1)" in err
    assert (out / "ft" / "seed-0" / "summary.json").read_bytes() == done
    assert not (out / "ft" / "seed-1").exists() and not (out / "_tmp").exists()


def test_a_result_of_forgetkit_run_is_not_taken_for_a_checkpoint(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    d = out / "naive" / "seed-0"  # what forgetkit.run leaves: a finished run, its identity
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"status": "ok", "arm": "naive", "seed": 0}))
    (d / "identity.json").write_text(json.dumps({"training.lr": 0.001}))
    assert main(args(tiny, out, f"naive={tiny['t1']}")) == 2
    assert "holds a result of forgetkit.run (a trained arm)" in capsys.readouterr().err
    assert sorted(p.name for p in d.iterdir()) == ["identity.json", "summary.json"]
