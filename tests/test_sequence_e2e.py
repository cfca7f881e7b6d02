"""A 3-stage task sequence end to end: ``python -m forgetkit.run`` on a tiny random-init model,
tiny local data, real training and evaluation (keep_checkpoints: every stage's model is kept).

One arm carries both cross-stage regularizers: online EWC (``online_gamma``) and L2-SP with
``anchor: base``.

* every entry of sequence.json's R is the score ``runner.evaluate`` gives the saved stage
  checkpoint now; its base row is the before-scores; BWT/FWT/final average/learning accuracy
  are the hand formulas of R;
* the Fisher each stage used is ``gamma * (previous stage's accumulated Fisher) + (Fisher of
  the previous stage's data at this stage's start)``, and the gamma-weighted sum of per-stage
  Fishers estimated independently here;
* stage 1 and 2's L2-SP theta0 (its fingerprint in the checkpoint) is the base model's weights,
  not the stage's start;
* a sequence killed during stage 1's training (after a checkpoint) resumes at that stage and
  step and gives the same R and sequence.json; a rerun of a finished sequence trains nothing.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import tiny_config_dict, write_instruction_data

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
GENERAL = ROOT / "experiments" / "data" / "smoke_general.jsonl"
STAGES = ("alpha", "beta", "gamma")
GAMMA = 0.5
EPS32 = torch.finfo(torch.float32).eps


def experiment(tmp_path: Path, results: Path) -> Path:
    cfg = tiny_config_dict(tmp_path, training={"max_steps": 6, "checkpoint_every": 1,
                                               "keep_checkpoints": 2, "log_every": 1})
    cfg["name"] = "seq"
    cfg.pop("output")
    cfg["data"].pop("train")
    task, stages = [], []
    for k, name in enumerate(STAGES):
        train = tmp_path / f"{name}.jsonl"
        if not train.exists():
            write_instruction_data(train, n=24, seed=10 + k)
            write_instruction_data(tmp_path / f"{name}_eval.jsonl", n=4, seed=20 + k)
        task.append({"name": f"{name}_nll", "kind": "answer_nll",
                     "data": {"path": str(tmp_path / f"{name}_eval.jsonl")}})
        stages.append({"name": name, "data": {"path": str(train)}, "metric": f"{name}_nll"})
    cfg["evaluation"] = {"task": task, "general": [
        {"name": "general_nll", "kind": "perplexity", "limit": 4,
         "data": {"path": str(GENERAL), "format": "text"}}], "batch_size": 8}
    cfg["sequence"] = {"stages": stages}
    regs = [{"type": "ewc", "lambda": 1.0, "online_gamma": GAMMA, "fisher_examples": 4,
             "fisher_batch_size": 2, "fisher_data": {"path": str(GENERAL), "format": "text"}},
            {"type": "l2", "lambda": 0.1, "anchor": "base"}]
    cfg["experiment"] = {"seeds": [0], "keep_checkpoints": True,
                         "arms": [{"name": "cl", "overrides": {"regularizers": regs}}],
                         "results_dir": str(results / "{name}")}
    path = results.parent / f"{results.name}.yaml"
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


def stage_dirs(root: Path) -> list[Path]:
    return [root / "cl" / "seed-0" / f"stage-{k}-{n}" for k, n in enumerate(STAGES)]


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("seq")
    config = experiment(tmp, tmp / "results")
    run_cli(config)
    return tmp, config, tmp / "results" / "seq"


def test_matrix_is_the_saved_checkpoints_scores(finished):
    from forgetkit.config import load_config
    from forgetkit.runner import evaluate

    tmp, config, root = finished
    seq = json.loads((root / "cl" / "seed-0" / "sequence.json").read_text())
    dirs = stage_dirs(root)
    cfg = load_config(dirs[0] / "config.yaml")
    r, base = seq["R"], seq["base"]
    assert len(r) == 3 and all(len(row) == 3 for row in r)
    # fp32 scores recomputed in this process (other thread count, other reduction order): an
    # NLL averaged over ~100 tokens of 2-layer width-64 logits agrees to a few hundred ulps
    tol = dict(rel=512 * EPS32, abs=0.0)
    for i, d in enumerate(dirs):
        after = evaluate(d / "model", cfg)
        for j, name in enumerate(STAGES):
            assert r[i][j] == pytest.approx(after["task"][f"{name}_nll"]["value"], **tol), (i, j)
        assert seq["general"]["general_nll"][i + 1] == pytest.approx(
            after["general"]["general_nll"]["value"], **tol)
        saved = json.loads((d / "eval_after.json").read_text())
        assert [saved["task"][f"{n}_nll"]["value"] for n in STAGES] == r[i]  # as written
        assert "items" in saved["task"]["alpha_nll"]  # per-item scores kept for bootstraps
    before = json.loads((dirs[0] / "eval_before.json").read_text())
    assert base == [before["task"][f"{n}_nll"]["value"] for n in STAGES]
    (cached,) = (root / "_cache").glob("eval_before-*.json")
    assert json.loads(cached.read_text())["task"] == before["task"]
    assert seq["general"]["general_nll"][0] == before["general"]["general_nll"]["value"]
    # stage k >= 1's before is stage k-1's after, not a new evaluation
    for k in (1, 2):
        b = json.loads((dirs[k] / "eval_before.json").read_text())
        assert [b["task"][f"{n}_nll"]["value"] for n in STAGES] == r[k - 1]
    # NLL: lower is better, improvement = -(score)
    assert seq["higher_is_better"] == [False] * 3
    assert seq["final_average"] == pytest.approx(sum(r[2]) / 3)
    assert seq["learning_accuracy"] == pytest.approx((r[0][0] + r[1][1] + r[2][2]) / 3)
    assert seq["bwt"] == pytest.approx(((r[0][0] - r[2][0]) + (r[1][1] - r[2][1])) / 2)
    assert seq["fwt"] == pytest.approx(((base[1] - r[0][1]) + (base[2] - r[1][2])) / 2)
    assert seq["task_forgetting"] == pytest.approx([r[2][0] - min(r[0][0], r[1][0]),
                                                    r[2][1] - r[1][1]])
    assert r[0][0] < base[0]  # stage 0 learned its task
    for k, d in enumerate(dirs):
        s = json.loads((d / "summary.json").read_text())
        assert s["stage"] == {"index": k, "name": STAGES[k], "count": 3,
                              "metric": f"{STAGES[k]}_nll"}
        assert s["train"]["steps"] == 6


def _fisher_batches(cfg: Any, spec: Any, tok: Any) -> list[dict[str, torch.Tensor]]:
    """The Fisher batches of a run, built here the way the data layer builds them."""
    from forgetkit.data.batching import make_batches
    from forgetkit.data.sets import load_examples

    rc = cfg.regularizers[0]
    ex = load_examples(spec, tok, max_length=cfg.data.max_length,
                       train_on_prompt=cfg.data.train_on_prompt, seed=cfg.seed,
                       limit=rc.fisher_examples)
    return make_batches(ex, rc.fisher_batch_size, tok.pad_token_id, cfg.data.pad_to_multiple_of)


def _estimate(model_cfg: Any, cfg: Any, spec: Any) -> dict[str, torch.Tensor]:
    from forgetkit.models import load_model
    from forgetkit.regularizers.fisher import estimate_fisher

    model, tok = load_model(model_cfg)
    rc = cfg.regularizers[0]
    return estimate_fisher(model, _fisher_batches(cfg, spec, tok), rc.estimator,
                           rc.fisher_samples, seed=cfg.seed, progress=False)


def test_online_ewc_accumulates_the_previous_stages_fisher(finished):
    from forgetkit.config import load_config
    from forgetkit.regularizers.fisher import load_fisher

    _, _, root = finished
    dirs = stage_dirs(root)
    cfgs = [load_config(d / "config.yaml") for d in dirs]
    used = [load_fisher(d / "fisher-ewc.safetensors")[0] for d in dirs]
    metas = [load_fisher(d / "fisher-ewc.safetensors")[1] for d in dirs]
    # the chain reads the previous stage's own accumulated copy
    assert cfgs[1].regularizers[0].fisher_path == str(dirs[0] / "fisher-ewc.safetensors")
    assert cfgs[2].regularizers[0].fisher_path == str(dirs[1] / "fisher-ewc.safetensors")
    assert metas[0].get("online_gamma") is None
    assert metas[1]["online_gamma"] == GAMMA and metas[2]["previous"] == str(
        dirs[1] / "fisher-ewc.safetensors")
    # per-stage Fishers estimated here: stage 0 at the base on its fisher_data; stage k >= 1 at
    # stage k-1's final model on stage k-1's training data
    f0 = _estimate(cfgs[0].model, cfgs[0], cfgs[0].regularizers[0].fisher_data)
    f1 = _estimate(cfgs[1].model, cfgs[1], cfgs[0].data.train)
    f2 = _estimate(cfgs[2].model, cfgs[2], cfgs[1].data.train)
    assert cfgs[1].model.name_or_path == str(dirs[0] / "model")
    names = sorted(used[0])
    assert names == sorted(f0) == sorted(used[2])

    def close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], terms: int) -> None:
        # each entry is a mean of squared per-example fp32 gradients, recomputed with another
        # thread count: relative error of a squared gradient ~ 2 x that of the gradient
        # (~ 64 ulps through two layers of width <= 128), summed over `terms` Fishers; atol for
        # entries that are ~0 (exactly 0 in both for unused embedding rows)
        scale = max(float(w.abs().max()) for w in want.values())
        for n in names:
            torch.testing.assert_close(got[n], want[n], rtol=terms * 128 * EPS32,
                                       atol=terms * 128 * EPS32 * scale, msg=n)

    close(used[0], f0, 1)
    close(used[1], {n: GAMMA * f0[n] + f1[n] for n in names}, 2)
    # the Fisher used at stage 2 = gamma * stage 1's accumulated + the new one ...
    close(used[2], {n: GAMMA * used[1][n] + f2[n] for n in names}, 1)
    # ... = the gamma-weighted sum of the per-stage Fishers
    close(used[2], {n: GAMMA ** 2 * f0[n] + GAMMA * f1[n] + f2[n] for n in names}, 3)
    assert any(not torch.equal(used[2][n], used[1][n]) for n in names)


def _fingerprint(tensors: dict[str, torch.Tensor], names: list[str]) -> list[float]:
    t = [tensors[n].double() for n in names]
    return [float(sum(x.sum() for x in t)), float(sum((x * x).sum() for x in t)),
            float(sum(x.numel() for x in t))]


def test_l2_anchor_base_is_the_base_weights_at_every_stage(finished):
    from safetensors.torch import load_file

    from forgetkit.config import load_config

    _, _, root = finished
    dirs = stage_dirs(root)
    cfg1 = load_config(dirs[1] / "config.yaml")
    base_dir = Path(cfg1.regularizers[1].anchor_path)
    assert base_dir.parent.name == "_base"  # the random-init base, materialised once
    base = load_file(str(base_dir / "model.safetensors"))
    for k in (1, 2):
        assert load_config(dirs[k] / "config.yaml").regularizers[1].anchor_path == str(base_dir)
        ckpt = max((dirs[k] / "checkpoints").glob("step-*"),
                   key=lambda p: int(p.name.split("-")[1]))
        l2 = json.loads((ckpt / "regularizers-rank0.json").read_text())["l2"]
        start = load_file(str(dirs[k - 1] / "model" / "model.safetensors"))
        names = l2["names"]
        want, other = _fingerprint(base, names), _fingerprint(start, names)
        got = l2["fingerprint"]["theta0"]
        assert got == pytest.approx(want, rel=1e-9), k
        assert got[1] != pytest.approx(other[1], rel=1e-6), k  # not the stage's start


def test_killed_sequence_resumes_at_its_stage_and_step(finished):
    tmp, config, root = finished
    config2 = experiment(tmp, tmp / "results_killed")
    root2 = tmp / "results_killed" / "seq"
    proc = subprocess.Popen([sys.executable, "-m", "forgetkit.run", str(config2)], cwd=ROOT,
                            env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    ckpts = stage_dirs(root2)[1] / "checkpoints"
    deadline = time.time() + 600
    try:
        while not list(ckpts.glob("step-*/COMPLETE")):
            assert proc.poll() is None, "the sequence finished before it could be killed"
            assert time.time() < deadline
            time.sleep(0.02)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    d0, d1, d2 = stage_dirs(root2)
    assert (d0 / "summary.json").is_file() and not (d1 / "summary.json").exists()
    stamp = (d0 / "summary.json").stat().st_mtime_ns
    out = run_cli(config2)
    assert out.stderr.count("finished earlier with the same config, reused") == 1
    assert (d0 / "summary.json").stat().st_mtime_ns == stamp
    res = json.loads((d1 / "train_result.json").read_text())
    assert res["resumed_from"] is not None and 1 <= res["resumed_from"] < 6
    a = json.loads((root / "cl" / "seed-0" / "sequence.json").read_text())
    b = json.loads((root2 / "cl" / "seed-0" / "sequence.json").read_text())
    assert b == a  # R, general and every measure: identical to the uninterrupted sequence
    assert all(math.isfinite(x) for row in a["R"] for x in row)


def test_rerun_of_a_finished_sequence_trains_nothing(finished):
    _, config, root = finished
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("summary.json")}
    proc = run_cli(config)
    assert proc.stderr.count("finished earlier with the same config, reused") == 3
    assert "training:" not in proc.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())
