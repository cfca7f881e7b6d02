"""Training-side reliability (issue 12): no pickles, verified checkpoints, run identity, one
writer, truthful non-finite/collapse reports, Ctrl-C, disk full. Faults are injected."""

from __future__ import annotations

import errno
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from forgetkit.identity import identity_diff, run_identity, training_identity
from forgetkit.locking import LockHeld, dir_lock
from forgetkit.train import loop
from forgetkit.train.loop import (
    CheckpointMismatch,
    DiskFull,
    NonFiniteLoss,
    TrainingInterrupted,
    train,
    write_manifest,
)


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "model" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), f"weight names differ: {sorted(a.keys() ^ b.keys())[:5]}"
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, f"{len(bad)} tensors differ, e.g. {bad[:3]} (max abs diff " \
                    f"{max((a[k] - b[k]).abs().max().item() for k in bad):.3e})"


def log_records(out_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (out_dir / "train_log.jsonl").read_text().splitlines()]


def tmp_leftovers(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.tmp"))


class Evil:
    """Unpickling this runs a command that creates ``marker``: the exploit of issue 12."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Hook:
    """A regularizer-seam test double that acts in ``grad_term`` at chosen steps."""

    def __init__(self, zero_grads: bool = False, interrupt_at: int | None = None) -> None:
        self.name = "hook"
        self.steps = 0
        self.zero_grads, self.interrupt_at = zero_grads, interrupt_at

    def prepare(self, ctx):
        pass

    def penalty(self, ctx, batch):
        return None

    def grad_term(self, ctx):
        self.steps += 1
        if self.interrupt_at is not None and self.steps == self.interrupt_at:
            signal.raise_signal(signal.SIGINT)  # what Ctrl-C sends; Python raises it here
        if self.zero_grads:
            for _, p in ctx.named_params():
                p.grad.zero_()
        return None

    def after_step(self, ctx, lr):
        return None

    def state_dict(self):
        return {"steps": self.steps, "tensor": torch.arange(3.0)}  # a tensor: safetensors

    def load_state_dict(self, state):
        assert torch.equal(state["tensor"], torch.arange(3.0)), state
        self.steps = state["steps"]


SEC = {"max_steps": 6, "checkpoint_every": 2, "keep_checkpoints": 5}


@pytest.fixture
def full_run(tiny_cfg, tmp_path):
    """An uninterrupted 6-step run with checkpoints at 2, 4, 6 (the reference)."""
    return train(tiny_cfg(training=SEC, output={"dir": str(tmp_path / "full")}), progress=False)


def killed_after(tiny_cfg, tmp_path, step: int):
    """A run of the same config cut after checkpoint ``step`` (later checkpoints, model gone)."""
    cfg = tiny_cfg(training=SEC, output={"dir": str(tmp_path / "cut")})
    first = train(cfg, progress=False)
    for d in (first.out_dir / "checkpoints").glob("step-*"):
        if int(d.name.split("-")[1]) > step:
            shutil.rmtree(d)
    shutil.rmtree(first.out_dir / "model")
    return cfg, first.out_dir


# ----------------------------------------------------------------------------- 1. no pickles

def test_checkpoint_states_are_json_and_safetensors_not_pickles(tiny_cfg):
    res = train(tiny_cfg(training={"max_steps": 2}), [Hook()], progress=False)
    ck = res.out_dir / "checkpoints" / "step-00000002"
    names = sorted(p.name for p in ck.iterdir())
    assert not [n for n in names if n.endswith((".pt", ".pkl", ".bin"))], names
    rng = json.loads((ck / "rng-rank0.json").read_text())
    assert set(rng) >= {"python", "numpy", "torch"}, rng.keys()
    assert "t.torch" in load_file(str(ck / "rng-rank0.safetensors"))
    reg = json.loads((ck / "regularizers-rank0.json").read_text())
    assert reg == {"hook": {"steps": 2, "tensor": {"__tensor__": "t.hook.tensor"}}}, reg


def test_rng_state_round_trips_exactly():
    import random

    import numpy as np

    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # a cached gaussian in python's state
    st = loop._rng_state()
    a = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(2))
    loop._set_rng_state(json.loads(json.dumps({k: v for k, v in st.items() if k != "torch"}))
                        | {"torch": st["torch"]})
    b = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(2))
    assert a[:3] == b[:3] and torch.equal(a[3], b[3]), (a, b)


def test_old_format_pickle_checkpoint_is_refused_not_loaded(tiny_cfg, tmp_path):
    cfg = tiny_cfg(training={"max_steps": 2})
    train(cfg, progress=False)
    ck = cfg.output_dir() / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    for f in ck.glob("rng-rank0.*"):
        f.unlink()
    with (ck / "rng-rank0.pt").open("wb") as fh:  # what forgetkit <= issue 12 wrote
        pickle.dump(Evil(marker), fh)
    (ck / "COMPLETE").write_text("")  # the old marker: an empty file
    with pytest.raises(CheckpointMismatch, match=r"older forgetkit.*rng-rank0\.pt.*pickle"):
        train(cfg, progress=False)
    assert not marker.exists(), "the crafted pickle was executed"


def test_pickle_added_to_a_checkpoint_makes_it_damaged(tiny_cfg, tmp_path, caplog):
    cfg = tiny_cfg(training=SEC)
    train(cfg, progress=False)
    ck = cfg.output_dir() / "checkpoints"
    marker = tmp_path / "pwned"
    with (ck / "step-00000006" / "regularizers-rank0.pt").open("wb") as fh:
        pickle.dump(Evil(marker), fh)
    shutil.rmtree(cfg.output_dir() / "model")
    with caplog.at_level(logging.WARNING, "forgetkit"):
        res = train(cfg, progress=False)
    assert res.resumed_from == 4, res
    assert "regularizers-rank0.pt is not in the checkpoint's manifest" in caplog.text
    assert not marker.exists(), "the crafted pickle was executed"


def test_crafted_dcp_metadata_is_not_unpickled(tiny_cfg, tmp_path):
    """An attacker who rewrites a file *and* its manifest: torch's own DCP reader would
    unpickle ``.metadata``; forgetkit's allow-list unpickler refuses it."""
    cfg = tiny_cfg(training={"max_steps": 2})
    train(cfg, progress=False)
    ck = cfg.output_dir() / "checkpoints" / "step-00000002"
    marker = tmp_path / "pwned"
    with (ck / "state" / ".metadata").open("wb") as fh:
        pickle.dump(Evil(marker), fh)
    doc = json.loads((ck / "COMPLETE").read_text())
    write_manifest(ck, 2, doc["identity_digest"])
    with pytest.raises(CheckpointMismatch, match=r"\.metadata.*(posix|os)\.system.*refused"):
        train(cfg, progress=False)
    assert not marker.exists(), "the crafted DCP metadata was executed"


@pytest.fixture
def in_process_group():
    """DeepSpeed in this process makes a 1-process group and sets RANK/WORLD_SIZE/... in
    os.environ (forgetkit.train.distributed): undo both afterwards, or every later test's
    subprocess (lm_eval's accelerate, torchrun workers) would inherit a half-set rendezvous."""
    import os

    import torch.distributed as dist

    saved = dict(os.environ)
    try:
        yield
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved)


def test_crafted_deepspeed_file_is_not_unpickled(tiny_cfg, tmp_path, in_process_group):
    """DeepSpeed's own loader uses torch.load(weights_only=False); forgetkit's does not."""
    import importlib.util

    from conftest import skip_unless_installed

    skip_unless_installed(importlib.util.find_spec("deepspeed") is None,
                          "needs DeepSpeed: pip install 'forgetkit[deepspeed]'")
    cfg = tiny_cfg(training={"max_steps": 1}, distributed={"strategy": "deepspeed"})
    train(cfg, progress=False)
    ck = cfg.output_dir() / "checkpoints" / "step-00000001"
    marker = tmp_path / "pwned"
    optim = next((ck / "deepspeed" / "state").glob("*optim_states.pt"))
    torch.save({"optimizer_state_dict": Evil(marker)}, optim)
    write_manifest(ck, 1, json.loads((ck / "COMPLETE").read_text())["identity_digest"])
    with pytest.raises(CheckpointMismatch, match=r"names (posix|os)\.system.*refused, not loaded"):
        train(cfg, progress=False)
    assert not marker.exists(), "the crafted DeepSpeed file was executed"


# ----------------------------------------------------------------------------- 2. verified

def test_truncated_shard_resumes_from_previous_intact_checkpoint(tiny_cfg, tmp_path, full_run,
                                                                 caplog):
    cfg, out = killed_after(tiny_cfg, tmp_path, 4)
    shard = next((out / "checkpoints" / "step-00000004" / "state").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with caplog.at_level(logging.WARNING, "forgetkit"):
        res = train(cfg, progress=False)
    assert res.resumed_from == 2, res
    assert f"{shard} has" in caplog.text and "truncated" in caplog.text, caplog.text
    assert_same_weights(weights(full_run.out_dir), weights(out))
    assert [r.get("loss") for r in log_records(out)] == \
        [r.get("loss") for r in log_records(full_run.out_dir)]
    assert not (out / "checkpoints" / "step-00000004.tmp").exists()
    # the damaged checkpoint was superseded and removed; the intact ones kept
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == \
        ["step-00000002", "step-00000004", "step-00000006"]
    assert json.loads((out / "checkpoints" / "step-00000004" / "COMPLETE").read_text())["files"]


@pytest.mark.parametrize("damage", ["missing_file", "checksum", "no_marker"])
def test_damaged_checkpoints_are_skipped_naming_the_file(tiny_cfg, tmp_path, damage, caplog):
    cfg, out = killed_after(tiny_cfg, tmp_path, 4)
    ck = out / "checkpoints" / "step-00000004"
    if damage == "missing_file":
        (ck / "trainer_state.json").unlink()
        expect = f"{ck / 'trainer_state.json'} is missing"
    elif damage == "checksum":
        f = ck / "rng-rank0.json"
        text = f.read_text()
        f.write_text(text.replace("1", "2", 1))  # same size, other bytes
        expect = f"{f}: sha256 differs"
    else:
        (ck / "COMPLETE").unlink()
        expect = "COMPLETE is missing"
    with caplog.at_level(logging.WARNING, "forgetkit"):
        res = train(cfg, progress=False)
    assert res.resumed_from == 2, res
    assert expect in caplog.text, caplog.text


def test_no_intact_checkpoint_trains_from_scratch_with_a_warning(tiny_cfg, caplog):
    cfg = tiny_cfg(training={"max_steps": 2})
    train(cfg, progress=False)
    (cfg.output_dir() / "checkpoints" / "step-00000002" / "trainer_state.json").unlink()
    with caplog.at_level(logging.WARNING, "forgetkit"):
        res = train(cfg, progress=False)
    assert res.resumed_from is None, res
    assert "no intact checkpoint" in caplog.text and "training from scratch" in caplog.text


# ----------------------------------------------------------------------------- 3. identity

@pytest.mark.parametrize("change,key", [({"lr": 2e-3}, "training.lr"),
                                        ({"max_steps": 3}, "training.max_steps")])
def test_resume_refuses_a_changed_config_and_touches_nothing(tiny_cfg, change, key):
    cfg = tiny_cfg(training={"max_steps": 2})
    train(cfg, progress=False)
    out = cfg.output_dir()
    before = {f: (out / f).read_bytes() for f in ("config.yaml", "train_result.json",
                                                   "train_log.jsonl")}
    assert json.loads(before["train_result.json"])["collapsed"] is False
    with pytest.raises(CheckpointMismatch) as ei:
        train(tiny_cfg(training={"max_steps": 2, **change}), progress=False)
    msg = str(ei.value)
    assert key in msg and "training.resume=false" in msg and "output.dir" in msg, msg
    assert "\n" not in msg, msg
    after = {f: (out / f).read_bytes() for f in before}
    assert after == before, "a refused resume rewrote the output's files"
    # the documented way on works, and then the output describes the new run
    res = train(tiny_cfg(training={"max_steps": 2, **change, "resume": False}), progress=False)
    assert res.resumed_from is None
    assert str(list(change.values())[0]) in (out / "config.yaml").read_text()
    # ... and its checkpoints replaced the old run's: the new config now resumes them
    again = train(tiny_cfg(training={"max_steps": 2, **change}), progress=False)
    assert again.resumed_from == again.steps, again


def test_changed_data_file_is_a_different_run(tiny_cfg, tmp_path):
    cfg = tiny_cfg(training={"max_steps": 2})
    old = run_identity(cfg)
    data = Path(cfg.data.train.path)
    data.write_text(data.read_text() + json.dumps({"instruction": "x", "input": "y",
                                                   "output": "z"}) + "\n")
    diff = identity_diff(old, run_identity(cfg))
    assert len(diff) == 1 and diff[0].startswith(f"data_sha256.{data}: "), diff


def test_identity_ignores_where_and_how_often_not_what(tiny_cfg, tmp_path):
    a = tiny_cfg()
    b = tiny_cfg(output={"dir": str(tmp_path / "elsewhere")},
                 training={"log_every": 2, "checkpoint_every": 3, "resume": False},
                 distributed={"cpu": True})
    assert identity_diff(run_identity(a), run_identity(b)) == []
    c = tiny_cfg(evaluation={"batch_size": 2})
    assert identity_diff(run_identity(a), run_identity(c)) == \
        ["evaluation.batch_size: 8 -> 2"]
    assert identity_diff(training_identity(a), training_identity(c)) == []
    assert identity_diff(training_identity(a, world_size=1), training_identity(a, world_size=2))\
        == ["runtime.world_size: 1 -> 2"]


# ----------------------------------------------------------------------------- 4. one writer

def test_second_writer_gets_lock_held_before_anything_is_written(tiny_cfg):
    cfg = tiny_cfg(training={"max_steps": 1})
    out = cfg.output_dir()
    with dir_lock(out, "training output"):
        with pytest.raises(LockHeld, match=rf"training output {out} is in use by forgetkit pid "
                                            rf"{os.getpid()} .*wait for it to finish"):
            train(cfg, progress=False)
        assert sorted(p.name for p in out.iterdir()) == [".forgetkit.lock"]


def test_lock_held_by_another_process_and_released_when_it_dies(tmp_path):
    d = tmp_path / "out"
    code = ("import sys, time; from pathlib import Path; from forgetkit.locking import dir_lock\n"
            "with dir_lock(Path(sys.argv[1]), 'training output'):\n"
            "    print('locked', flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(d)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(LockHeld, match=f"pid {proc.pid} "):
            with dir_lock(d, "training output"):
                pass
    finally:
        proc.kill()
        proc.wait()
    with dir_lock(d, "training output"):  # the kernel released it: no stale lock
        pass


# ----------------------------------------------------------------------------- 5. non-finite

@pytest.mark.parametrize("every,expect", [(0, "Last good checkpoint: none"),
                                          (1, "Last good checkpoint: step 2 in ")])
def test_nonfinite_message_names_the_checkpoint_truly(tiny_cfg, every, expect):
    from test_loop import Recorder

    cfg = tiny_cfg(training={"max_steps": 5, "checkpoint_every": every, "keep_checkpoints": 10})
    with pytest.raises(NonFiniteLoss) as ei:
        train(cfg, [Recorder(nan_at_step=3)], progress=False)
    assert expect in str(ei.value), str(ei.value)
    assert "at step 3" in str(ei.value), str(ei.value)
    assert not (cfg.output_dir() / "train_result.json").exists()


def test_collapse_is_warned_and_recorded(tiny_cfg, caplog):
    cfg = tiny_cfg(training={"max_steps": 4})  # shorter than COLLAPSE_STEPS: the whole run
    with caplog.at_level(logging.WARNING, "forgetkit"):
        res = train(cfg, [Hook(zero_grads=True)], progress=False)
    info = json.loads((res.out_dir / "train_result.json").read_text())
    assert info["collapsed"] is True, info
    assert info["collapse"] == {"reason": "gradient norm exactly 0", "from_step": 1,
                                "to_step": 4}, info["collapse"]
    assert "training collapsed" in caplog.text


def test_collapse_watch_constant_loss_and_threshold():
    w = loop.CollapseWatch(total_steps=1000)
    for done in range(10, 60, 10):  # log every 10 steps, loss exactly repeated
        w.update(done, done - 9, 0, 5.5)
    assert w.found == {"reason": "loss constant at 5.5", "from_step": 1, "to_step": 50}, w.found
    w = loop.CollapseWatch(total_steps=1000)
    for done in range(1, 50):
        w.update(done, done, done, 1.0 + done)  # grad norm 0 for 49 < 50 steps
    assert w.found is None
    w.update(50, 50, 50, 0.5)
    assert w.found is not None and w.found["from_step"] == 1


# ----------------------------------------------------------------------------- 6. interrupt

def test_ctrl_c_says_where_and_rerun_resumes_without_duplicate_lines(tiny_cfg, tmp_path,
                                                                   full_run, ctrl_c_raises):
    cfg = tiny_cfg(training=SEC, output={"dir": str(tmp_path / "cut")})
    with pytest.raises(TrainingInterrupted) as ei:
        train(cfg, [Hook(interrupt_at=4)], progress=False)
    e = ei.value
    assert isinstance(e, KeyboardInterrupt)
    assert (e.step, e.checkpoint) == (3, 2), (e.step, e.checkpoint)
    assert str(e) == "interrupted at step 3 (last checkpoint: step 2); rerun the same command " \
                     "to resume", str(e)
    res = train(cfg, [Hook()], progress=False)
    assert res.resumed_from == 2
    assert_same_weights(weights(full_run.out_dir), weights(res.out_dir))
    for _ in range(2):  # a finished run rerun: still one line per step and one "final"
        steps = [r["step"] for r in log_records(res.out_dir)]
        assert steps == [1, 2, 3, 4, 5, 6, 6], steps
        assert sum(1 for r in log_records(res.out_dir) if r.get("final")) == 1
        train(cfg, [Hook()], progress=False)


def test_ctrl_c_before_any_checkpoint(tiny_cfg, ctrl_c_raises):
    with pytest.raises(TrainingInterrupted, match=r"at step 1 \(last checkpoint: none\)"):
        train(tiny_cfg(), [Hook(interrupt_at=2)], progress=False)


# ----------------------------------------------------------------------------- 7. disk full

def _enospc(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_disk_full_while_saving_the_model_names_the_disk_and_cleans_up(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(training={"max_steps": 1})

    def half_written(model, tok, path, state_dict=None):
        Path(path).mkdir(parents=True)
        (Path(path) / "model.safetensors").write_bytes(b"x" * 100)
        _enospc()

    monkeypatch.setattr(loop, "save_hf_checkpoint", half_written)
    with pytest.raises(DiskFull) as ei:
        train(cfg, progress=False)
    out = cfg.output_dir()
    assert str(out) in str(ei.value) and "MiB free" in str(ei.value), str(ei.value)
    assert ei.value.errno == errno.ENOSPC
    assert tmp_leftovers(out) == [] and not (out / "model.tmp").exists()
    assert not (out / "train_result.json").exists()


def test_disk_full_while_checkpointing_removes_the_partial_checkpoint(tiny_cfg, monkeypatch):
    cfg = tiny_cfg(training={"max_steps": 2, "checkpoint_every": 1})
    real = loop.save_plain
    calls = {"n": 0}

    def flaky(stem, obj, where):
        calls["n"] += 1
        if calls["n"] == 3:  # step 2's RNG state
            _enospc()
        return real(stem, obj, where)

    monkeypatch.setattr(loop, "save_plain", flaky)
    with pytest.raises(DiskFull, match="no space left on the disk of .*checkpoints"):
        train(cfg, progress=False)
    root = cfg.output_dir()
    assert tmp_leftovers(root) == [], tmp_leftovers(root)
    assert sorted(p.name for p in (root / "checkpoints").iterdir()) == ["step-00000001"]


@pytest.fixture
def small_tmpfs(tmp_path):
    d = tmp_path / "small"
    d.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(d)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a 2 MiB tmpfs here (needs root): {r.stderr.strip()}")
    try:
        yield d
    finally:
        for _ in range(5):
            if subprocess.run(["umount", str(d)]).returncode == 0:
                break
            time.sleep(0.2)


def test_disk_full_on_a_real_small_tmpfs(tiny_cfg, small_tmpfs):
    cfg = tiny_cfg(training={"max_steps": 3, "checkpoint_every": 1},
                   output={"dir": str(small_tmpfs / "run")})
    with pytest.raises(DiskFull) as ei:
        train(cfg, progress=False)
    assert str(small_tmpfs) in str(ei.value) and "free" in str(ei.value), str(ei.value)
    assert tmp_leftovers(small_tmpfs) == [], tmp_leftovers(small_tmpfs)
    assert not (small_tmpfs / "run" / "train_result.json").exists()


# ----------------------------------------------------------------------------- real regularizers

def test_l2_ewc_kl_states_round_trip_without_pickle(tiny_cfg, tmp_path):
    """The shipped regularizers' states go through JSON (+ safetensors) and resume exactly."""
    data = str(tmp_path / "task.jsonl")
    regs = [{"type": "l2", "lambda": 0.1},
            {"type": "ewc", "lambda": 1.0, "fisher_data": {"path": data}, "fisher_examples": 8,
             "fisher_path": str(tmp_path / "fisher.safetensors")},
            {"type": "kl", "lambda": 0.1, "data": {"path": data}}]
    sec = {"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": 5}

    def run(out: str):
        cfg = tiny_cfg(training=sec, regularizers=regs, output={"dir": str(tmp_path / out)})
        return train(cfg, progress=False)

    full = run("full")
    cut = run("cut")
    shutil.rmtree(cut.out_dir / "checkpoints" / "step-00000004")
    shutil.rmtree(cut.out_dir / "model")
    state = json.loads((cut.out_dir / "checkpoints" / "step-00000002" /
                        "regularizers-rank0.json").read_text())
    assert set(state) == {"l2", "ewc", "kl"} and state["kl"]["calls"] > 0, state
    again = run("cut")
    assert again.resumed_from == 2, again
    assert_same_weights(weights(full.out_dir), weights(again.out_dir))


def test_ctrl_c_inside_a_dcp_save_is_an_interrupt_not_a_crash(tiny_cfg, tmp_path, monkeypatch):
    """torch.distributed.checkpoint wraps a KeyboardInterrupt raised while it writes into its
    CheckpointException (a BaseException): the loop still reports TrainingInterrupted with the
    last good checkpoint, and leaves no temporary directory."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from forgetkit.train.loop import TrainingInterrupted

    def zip_writer_error() -> RuntimeError:  # what torch.save's clean-up raised in CI
        try:
            try:
                raise KeyboardInterrupt
            except KeyboardInterrupt:
                raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos")  # noqa: B904 (as torch does)
        except RuntimeError as e:
            return e

    for name, failure in (("direct", KeyboardInterrupt()), ("inside_save", zip_writer_error())):
        real, calls = dcp.save, []

        def save(*a, real=real, calls=calls, failure=failure, **k):
            calls.append(1)
            if len(calls) == 2:  # the second checkpoint: "Ctrl-C" inside DCP's write
                raise CheckpointException("save", {0: (failure, None)})
            return real(*a, **k)

        monkeypatch.setattr(dcp, "save", save)
        cfg = tiny_cfg(training={"max_steps": 4, "checkpoint_every": 1, "keep_checkpoints": 3},
                       output={"dir": str(tmp_path / name)})
        with pytest.raises(TrainingInterrupted) as ei:
            train(cfg, progress=False)
        assert ei.value.checkpoint == 1, (name, str(ei.value))
        assert not list((tmp_path / name / "checkpoints").glob("*.tmp"))
        monkeypatch.setattr(dcp, "save", real)
    # a real error inside DCP is not an interrupt
    from forgetkit.train.loop import _interrupt_inside

    assert not _interrupt_inside(CheckpointException("save", {0: (OSError("disk"), None)}))
