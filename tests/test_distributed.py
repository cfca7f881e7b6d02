"""Two CPU processes (gloo) train to the same weights as one, for every distributed strategy.

The loop normalises the loss by the global number of target tokens of each optimizer step and
plans every step's examples deterministically (see ``forgetkit.train.loop``), so how a global
batch is split over ranks and micro-steps must not change the result. Each strategy trains the
smoke model (tiny 2-layer Llama) for 4 optimizer steps with a global batch of 8:

    2 processes x micro-batch 2 x accumulation 2   (the strategy under test, via torchrun)
    1 process   x micro-batch 2 x accumulation 4   (the plain single-process reference)

Both runs see the same micro-batches (``split_step`` cuts the global batch into the same 4
contiguous chunks), so the only numerical difference is the order in which the 4 micro-batch
gradients are summed (rank-local accumulation + all-reduce vs. one sequential sum): a few ulp,
which Adam turns into ~1e-6 on weights with tiny gradients. Accumulation > 1 on the 2-process
side also exercises DDP ``no_sync``, FSDP2 ``set_requires_gradient_sync`` and DeepSpeed's
accumulation boundary. Per-step loss and *pre-clip* gradient norm are compared as well: Adam and
clipping hide a wrong gradient scale from the weights, the norm does not.

A second test stops a 2-process run after its step-2 checkpoint (deletes the final checkpoint and
model, and leaves a half-written ``.tmp`` checkpoint as a kill would) and resumes it: the result
must equal the uninterrupted run bit for bit.

Runtime: ~3 minutes on 2 cores (each run pays ~10 s of imports; DeepSpeed builds a small C++
op into ~/.cache/torch_extensions on first use).
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import skip_unless_installed
from dist_utils import max_abs_diff, reports, run_worker, step_logs, weights
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smoke.yaml"
DATA = REPO / "experiments" / "data" / "smoke_task.jsonl"

NPROC = 2
MAX_STEPS = 4
MICRO = 2
ACCUM_2PROC = 2
ACCUM_1PROC = ACCUM_2PROC * NPROC  # same global batch: 2 x 2 x 2 = 1 x 2 x 4 = 8
ATOL, RTOL = 1e-5, 1e-4  # fp32 weights after 4 AdamW steps (observed max diff ~6e-7)
LOG_RTOL = 1e-5  # per-step loss and gradient norm

# strategy id -> forgetkit ``distributed.*`` keys
STRATEGIES: dict[str, dict[str, Any]] = {
    "ddp": {"strategy": "ddp"},
    "fsdp": {"strategy": "fsdp"},
    "deepspeed-zero2": {"strategy": "deepspeed", "zero_stage": 2},
    "deepspeed-zero3": {"strategy": "deepspeed", "zero_stage": 3},
}

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


# ----------------------------------------------------------------------------- helpers

def write_config(path: Path, out_dir: Path, accum: int, **distributed: Any) -> Path:
    """The smoke experiment, shortened to MAX_STEPS steps with checkpoints at step 2 and 4."""
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["data"]["train"].update(path=str(DATA), limit=64)  # 57 train examples >= 4 x 8
    cfg["training"].update(micro_batch_size=MICRO, gradient_accumulation_steps=accum,
                           max_steps=MAX_STEPS, log_every=1, eval_every=0, checkpoint_every=2,
                           keep_checkpoints=2)
    cfg["distributed"] = {"cpu": True, **distributed}
    cfg["output"] = {"dir": str(out_dir)}
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def check_wrapper(strategy: str, rep: dict[str, Any]) -> None:
    """The strategy really ran: a test must not pass because it silently fell back to DDP."""
    want = STRATEGIES[strategy]
    if want["strategy"] == "ddp":
        assert rep["wrapper"] == "DistributedDataParallel", rep
    elif want["strategy"] == "fsdp":
        assert rep["backend"] == "FSDPBackend" and rep["fsdp"], rep
    else:
        assert rep["wrapper"] == "DeepSpeedEngine", rep
        assert rep["zero_stage"] == want["zero_stage"], rep


def assert_matches_reference(strategy: str, out: Path, reference: Path) -> float:
    """A fresh 2-process run of ``strategy`` (every rank reporting, the strategy really used)
    ended at the 1-process reference's weights, per-step lr, token counts, losses and pre-clip
    gradient norms; returns the largest weight difference."""
    reps = reports(out)
    assert [r["rank"] for r in reps] == list(range(NPROC)), reps
    for rep in reps:
        assert rep["world_size"] == NPROC and rep["steps"] == MAX_STEPS, rep
        assert rep["resumed_from"] is None, rep
        check_wrapper(strategy, rep)
    ref, got = weights(reference), weights(out)
    assert sorted(got) == sorted(ref)  # tied lm_head saved once, like the reference
    diff = max_abs_diff(got, ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: (
            f"{strategy}: {k} differs from the 1-process run (max diff {diff:.3e}): {m}"))
    ref_log, got_log = step_logs(reference), step_logs(out)
    assert [r["step"] for r in got_log] == [r["step"] for r in ref_log]
    keys = ("lr", "tokens", "target_tokens")
    for a, b in zip(got_log, ref_log, strict=True):
        assert [a[k] for k in keys] == [b[k] for k in keys], (a, b)
        assert a["loss"] == pytest.approx(b["loss"], rel=LOG_RTOL), (a, b)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=LOG_RTOL), (a, b)
    return diff


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, plain backend, micro 2 x accumulation 4."""
    root = tmp_path_factory.mktemp("reference")
    out = root / "out"
    cfg = write_config(root / "config.yaml", out, ACCUM_1PROC)
    run_worker(cfg, 1, "--save-init", str(root / "init.safetensors"))
    return out


@pytest.fixture(scope="module")
def two_proc(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], tuple[Path, Path]]:
    """strategy -> (config, output dir) of its 2-process run; each trains once per module."""
    root = tmp_path_factory.mktemp("two_proc")
    done: dict[str, tuple[Path, Path]] = {}

    def get(strategy: str) -> tuple[Path, Path]:
        if STRATEGIES[strategy]["strategy"] == "deepspeed":
            skip_unless_installed(importlib.util.find_spec("deepspeed") is None,
                                  "DeepSpeed is not installed (pip install 'forgetkit[deepspeed]')")
        if strategy not in done:
            out = root / strategy
            cfg = write_config(root / f"{strategy}.yaml", out, ACCUM_2PROC,
                               **STRATEGIES[strategy])
            run_worker(cfg, NPROC)
            done[strategy] = (cfg, out)
        return done[strategy]

    return get


# ----------------------------------------------------------------------------- tests

def test_reference_trains(reference: Path) -> None:
    """The equality below is not vacuous: training moves the weights far beyond ATOL."""
    init = load_file(str(reference.parent / "init.safetensors"))
    final = weights(reference)
    moved = max_abs_diff({k: final[k] for k in init if k in final}, init)
    assert moved > 100 * ATOL, moved
    logs = step_logs(reference)
    assert [r["step"] for r in logs] == list(range(1, MAX_STEPS + 1))
    assert logs[-1]["loss"] < logs[0]["loss"]
    assert max(r["grad_norm"] for r in logs) > 1.0  # max_grad_norm=1 clipping is exercised
    (rep,) = reports(reference)
    assert rep["world_size"] == 1 and rep["wrapper"] == "LlamaForCausalLM", rep


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_two_processes_match_one(strategy: str, reference: Path,
                                 two_proc: Callable[[str], tuple[Path, Path]],
                                 record_property: Callable[[str, Any], None]) -> None:
    _, out = two_proc(strategy)
    diff = assert_matches_reference(strategy, out, reference)
    record_property("max_abs_diff", diff)
    print(f"\n{strategy}: max |w_2proc - w_1proc| = {diff:.3e}")
    for step in (2, MAX_STEPS):  # checkpoints written (training state of every rank)
        assert (out / "checkpoints" / f"step-{step:08d}" / "COMPLETE").exists()


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_resume_matches_uninterrupted(strategy: str, tmp_path: Path,
                                      two_proc: Callable[[str], tuple[Path, Path]]) -> None:
    cfg, full = two_proc(strategy)
    # "Kill" the run after its step-2 checkpoint: no final checkpoint, no model, a half-written
    # step-4 checkpoint (no COMPLETE marker) and log lines past step 2 are left behind.
    out = tmp_path / "resumed"
    shutil.copytree(full, out)
    shutil.rmtree(out / "model")
    ckpt = out / "checkpoints" / f"step-{MAX_STEPS:08d}"
    shutil.rmtree(ckpt)
    (ckpt.with_name(ckpt.name + ".tmp")).mkdir()
    (ckpt.with_name(ckpt.name + ".tmp") / "partial").write_text("killed mid-write")
    for f in out.glob("worker-rank*.json"):
        f.unlink()

    run_worker(cfg, NPROC, f"output.dir={out}")
    for rep in reports(out):
        assert rep["resumed_from"] == 2 and rep["world_size"] == NPROC, rep
        check_wrapper(strategy, rep)
    assert not (out / "checkpoints" / f"step-{MAX_STEPS:08d}.tmp").exists()

    a, b = weights(out), weights(full)
    assert sorted(a) == sorted(b)
    diff = max_abs_diff(a, b)
    assert all(torch.equal(a[k], b[k]) for k in a), f"{strategy}: resumed != uninterrupted " \
                                                    f"(max diff {diff:.3e})"
    keys = ("step", "loss", "grad_norm", "lr", "tokens", "target_tokens")
    assert [{k: r[k] for k in keys} for r in step_logs(out)] == \
        [{k: r[k] for k in keys} for r in step_logs(full)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_padding_free_two_processes_match_the_padded_one(strategy: str, reference: Path,
                                                         tmp_path: Path) -> None:
    """``data.batching: padding_free`` under DDP and FSDP2: each rank's micro-batches become one
    flat row with per-example attention (sdpa: the per-example ``segments`` form, chosen by a
    probe every rank runs), and training ends at the padded 1-process reference's weights,
    per-step losses and gradient norms (the same plan; only the collation differs)."""
    out = tmp_path / "pf"
    cfg = write_config(tmp_path / "pf.yaml", out, ACCUM_2PROC, **STRATEGIES[strategy])
    text = run_worker(cfg, NPROC, "data.batching=padding_free")
    assert "boundaries kept by segments" in text, text[-3000:]
    assert_matches_reference(strategy, out, reference)
