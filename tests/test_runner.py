"""The experiment runner end to end: ``python -m forgetkit.run`` on a tiny random-init model with
tiny local data and a tiny local lm-eval task.

* two arms x two seeds (+ an arm whose training diverges) produce the full results tree and a
  summary.csv with the contract's columns; the before-evaluation is computed once and reused;
  the broken arm is recorded as failed (its NonFiniteLoss named in one line, exit status 1)
  while the others finish;
* a rerun skips every finished run (same config);
* a run killed mid-training resumes from its checkpoint, without recomputing finished runs.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import sigint_default, tiny_config_dict, write_instruction_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
TINY_TASK_DIR = ROOT / "tests" / "assets" / "lmeval_tiny"
GENERAL = ROOT / "experiments" / "data" / "smoke_general.jsonl"
RUN_FILES = ("config.yaml", "env.json", "train_log.jsonl", "train_result.json",
             "eval_before.json", "eval_after.json", "summary.json")


def experiment(tmp_path: Path, arms: list[dict[str, Any]], seeds: list[int],
               **training: Any) -> Path:
    cfg = tiny_config_dict(tmp_path, training={"max_steps": 4, "log_every": 1, **training})
    cfg["name"] = "tiny_exp"
    cfg.pop("output")
    eval_data = write_instruction_data(tmp_path / "task_eval.jsonl", n=8, seed=123)
    cfg["evaluation"] = {
        "task": [{"name": "task_nll", "kind": "answer_nll", "data": {"path": str(eval_data)}}],
        "general": [{"name": "rev", "kind": "lm_eval", "task": "forgetkit_tiny_reverse",
                     "include_path": str(TINY_TASK_DIR), "limit": 12},
                    {"name": "general_nll", "kind": "perplexity", "limit": 8,
                     "data": {"path": str(GENERAL), "format": "text"}}],
        "batch_size": 8}
    cfg["experiment"] = {"seeds": seeds, "arms": arms,
                         "results_dir": str(tmp_path / "results" / "{name}")}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def env() -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    e.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
             TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT))
    return e


def run_cli(config: Path, *args: str, rc: int = 0) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, "-m", "forgetkit.run", str(config), *args],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == rc, proc.stderr[-4000:]
    return proc


ARMS = [{"name": "naive"},
        {"name": "l2", "overrides": {"regularizers": [{"type": "l2", "lambda": 1.0}]}},
        # passes every check, then fails at training time: the loss diverges to inf/NaN
        {"name": "broken", "overrides": {"training": {"lr": 1.0e30}}}]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, subprocess.CompletedProcess[str]]:
    tmp = tmp_path_factory.mktemp("runner")
    config = experiment(tmp, ARMS, [0, 1])
    proc = run_cli(config, rc=1)  # the broken arm failed: exit status 1
    return config, tmp / "results" / "tiny_exp", proc


def test_results_tree_and_summary_contract(finished):
    _, root, proc = finished
    for arm in ("naive", "l2"):
        for seed in (0, 1):
            d = root / arm / f"seed-{seed}"
            for f in RUN_FILES:
                assert (d / f).is_file(), d / f
            assert not (d / "model").exists()  # checkpoints deleted (keep_checkpoints: false)
            drift = json.loads((d / "drift.json").read_text())
            assert drift["total"]["rel_drift"] > 0 and "layers.1" in drift["layers"]
            s = json.loads((d / "summary.json").read_text())
            assert s["status"] == "ok" and s["arm"] == arm and s["seed"] == seed
            assert set(s["after"]["general"]) == {"rev", "general_nll"}
            assert s["train"]["steps"] == 4
            assert s["train"]["memory_estimate"]["total_bytes"] > 0
            assert s["train"]["memory"]["peak_bytes"] > 0
            env_ = json.loads((d / "env.json").read_text())
            for k in ("python", "torch", "transformers", "accelerate", "lm_eval"):
                assert env_.get(k), k
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            assert cfg["seed"] == seed
            assert len(cfg["regularizers"]) == (1 if arm == "l2" else 0)
    with (root / "summary.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    cols = set(rows[0])
    want = {"arm", "seed", "status", "task_nll_before", "task_nll_after", "task_nll_delta",
            "rev_before", "rev_after", "rev_delta", "general_nll_before", "general_nll_after",
            "general_nll_delta", "task_gain", "mean_rel_forgetting", "retention_ratio",
            "task_gain_lo", "task_gain_hi", "std_forgetting", "general_nll_delta_lo",
            "train_time_s", "tokens", "memory_estimate_bytes", "peak_memory_bytes"}
    assert want <= cols, want - cols
    ok = [r for r in rows if r["status"] == "ok"]
    assert sorted((r["arm"], r["seed"]) for r in ok) == [("l2", "0"), ("l2", "1"),
                                                         ("naive", "0"), ("naive", "1")]
    for r in ok:  # derived columns follow from the raw ones
        gain = float(r["task_nll_before"]) - float(r["task_nll_after"])  # NLL: lower is better
        assert float(r["task_gain"]) == pytest.approx(gain)
        drops = [(float(r["rev_before"]) - float(r["rev_after"])) / float(r["rev_before"]),
                 (float(r["general_nll_after"]) - float(r["general_nll_before"]))
                 / float(r["general_nll_before"])]
        assert float(r["mean_rel_forgetting"]) == pytest.approx(sum(drops) / 2)
        # paired CIs from the per-item scores bracket their point estimates
        assert float(r["task_gain_lo"]) <= float(r["task_gain"]) <= float(r["task_gain_hi"])
        assert float(r["task_gain"]) > 0  # 4 steps at lr 1e-3 do teach the tiny model something
    with (root / "summary_agg.csv").open() as fh:
        agg = {r["arm"]: r for r in csv.DictReader(fh)}
    assert set(agg) == {"naive", "l2"} and agg["naive"]["n_seeds"] == "2"
    vals = [float(r["task_gain"]) for r in ok if r["arm"] == "naive"]
    assert float(agg["naive"]["task_gain_mean"]) == pytest.approx(sum(vals) / 2)
    # the before-evaluation was computed by the first run only
    hits = {(a, s): json.loads((root / a / f"seed-{s}" / "summary.json").read_text())
            ["before_cache_hit"] for a in ("naive", "l2") for s in (0, 1)}
    assert sum(not h for h in hits.values()) <= 1 and hits[("l2", 0)] and hits[("l2", 1)]
    assert len(list((root / "_cache").glob("eval_before-*.json"))) == 1
    # the same base scores in every run
    befores = {json.dumps(json.loads((root / a / f"seed-{s}" / "eval_before.json").read_text())
                          ["general"], sort_keys=True) for a in ("naive", "l2") for s in (0, 1)}
    assert len(befores) == 1


def test_failed_arm_is_recorded_and_others_continue(finished):
    _, root, proc = finished
    for seed in (0, 1):
        s = json.loads((root / "broken" / f"seed-{seed}" / "summary.json").read_text())
        assert s["status"] == "failed"
        assert s["error"].startswith("NonFiniteLoss: "), s["error"]
        assert "Traceback" in (root / "broken" / f"seed-{seed}" / "run.log").read_text()
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("forgetkit: 2 of 6 runs failed: broken seed 0 (NonFiniteLoss: "), last
    assert "Traceback" not in proc.stderr


def test_rerun_skips_finished_runs(finished):
    config, root, _ = finished
    stamps = {p: p.stat().st_mtime_ns for p in root.glob("naive/seed-*/summary.json")}
    stamps |= {p: p.stat().st_mtime_ns for p in root.glob("l2/seed-*/summary.json")}
    proc = run_cli(config, "--arms", "naive,l2")
    assert proc.stderr.count("finished earlier with the same config, reused") == 4
    assert "training:" not in proc.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    config = experiment(tmp_path, ARMS[:2], [0, 1, 2])
    proc = run_cli(config, "--dry-run", "--arms", "l2")
    assert "3 runs (1 arms x 3 seeds)" in proc.stderr
    assert not (tmp_path / "results").exists()
    # options before overrides, as `make demo` writes it
    proc = run_cli(config, "--arms", "l2", "--seeds", "0,1", "--dry-run",
                   f"experiment.results_dir={tmp_path}/elsewhere/{{name}}")
    assert "2 runs (1 arms x 2 seeds)" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "results").exists() and not (tmp_path / "elsewhere").exists()


def test_killed_run_resumes_without_recomputing_finished_runs(tmp_path):
    config = experiment(tmp_path, [{"name": "naive"}], [0, 1], max_steps=12, checkpoint_every=1,
                        keep_checkpoints=2)
    root = tmp_path / "results" / "tiny_exp"
    proc = subprocess.Popen([sys.executable, "-m", "forgetkit.run", str(config)], cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = root / "naive" / "seed-1" / "checkpoints"
    deadline = time.time() + 600
    try:
        while not list(ckpts.glob("step-*/COMPLETE")):
            assert proc.poll() is None, "the run finished before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the runner and its training subprocess
        proc.wait()
    first = root / "naive" / "seed-0" / "summary.json"
    assert first.is_file() and not (root / "naive" / "seed-1" / "summary.json").exists()
    stamp = first.stat().st_mtime_ns

    out = run_cli(config)
    assert first.stat().st_mtime_ns == stamp
    assert out.stderr.count("finished earlier with the same config, reused") == 1
    res = json.loads((root / "naive" / "seed-1" / "train_result.json").read_text())
    assert res["resumed_from"] is not None and 1 <= res["resumed_from"] < 12
    s = json.loads((root / "naive" / "seed-1" / "summary.json").read_text())
    assert s["status"] == "ok" and s["train"]["steps"] == 12
    # no half-written files anywhere in the tree
    assert not [p for p in root.rglob("*.tmp") if p.is_file()]


def test_ewc_arms_share_one_fisher_estimate(tmp_path):
    from forgetkit.config import read_yaml
    from forgetkit.runner import plan_runs

    fisher = {"type": "ewc", "fisher_data": {"path": str(GENERAL), "format": "text"},
              "fisher_examples": 8}
    arms = [{"name": "ewc", "grid": {"regularizers.0.lambda": [1.0, 10.0]},
             "overrides": {"regularizers": [fisher]}},
            {"name": "ewc_more", "overrides": {"regularizers": [
                {**fisher, "fisher_examples": 16}]}}]
    config = experiment(tmp_path, arms, [0, 1])
    _, runs = plan_runs(read_yaml(config), str(config))
    path = {(r.arm, r.seed): r.cfg.regularizers[0].fisher_path for r in runs}
    assert path[("ewc@lambda=1.0", 0)] == path[("ewc@lambda=10.0", 0)]  # lambda-only sweep
    assert path[("ewc@lambda=1.0", 0)] != path[("ewc@lambda=1.0", 1)]  # seed picks the data
    assert path[("ewc@lambda=1.0", 0)] != path[("ewc_more", 0)]  # other Fisher settings
    assert all("/_cache/fisher-" in p for p in path.values())


def test_ctrl_c_during_training_exits_130_and_the_rerun_resumes(tmp_path):
    """SIGINT to the whole process group (what Ctrl-C in a terminal sends): the training
    process stops by itself, the runner names the run and the step, exits 130 with no
    traceback, and the same command then resumes the run from its checkpoint."""
    config = experiment(tmp_path, [{"name": "naive"}], [0], max_steps=60, checkpoint_every=1,
                        keep_checkpoints=2)
    root = tmp_path / "results" / "tiny_exp"
    proc = subprocess.Popen([sys.executable, "-m", "forgetkit.run", str(config)], cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, preexec_fn=sigint_default)
    ckpts = root / "naive" / "seed-0" / "checkpoints"
    deadline = time.time() + 600
    try:
        while not list(ckpts.glob("step-*/COMPLETE")):
            assert proc.poll() is None, "the run finished before it could be interrupted"
            assert time.time() < deadline
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("forgetkit: interrupted during run 1/1 (naive seed 0): interrupted "
                           "at step "), last
    assert last.endswith("rerun the same command to resume"), last
    assert not (root / "naive" / "seed-0" / "summary.json").exists()

    out = run_cli(config)  # the same command
    res = json.loads((root / "naive" / "seed-0" / "train_result.json").read_text())
    assert res["resumed_from"] is not None and res["resumed_from"] >= 1, out.stderr[-2000:]
