"""forgetkit.train.tracking: accelerate's trackers behind output.trackers (TensorBoard here)."""

from __future__ import annotations

import numpy as np
import pytest

from forgetkit.config import ConfigError
from forgetkit.train.tracking import Trackers, TrackerUnavailable, check_trackers, flat_config

CONFIG = {"name": "tiny", "seed": 0, "training": {"lr": 1e-3, "betas": [0.9, 0.999],
                                                  "warmup_steps": None, "resume": True}}


@pytest.fixture(autouse=True)
def _own_accelerate_state():
    """Trackers create accelerate's shared PartialState when none exists (a plain process):
    drop it again after the test, so later tests start as a new process would."""
    from accelerate.state import PartialState

    existed = bool(PartialState._shared_state)
    yield
    if not existed:
        PartialState._reset_state()


def _scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _f32(x: float) -> float:
    return float(np.float32(x))  # TensorBoard stores scalars as float32


RECORDS = [
    {"step": 1, "epoch": 0.0, "loss": 5.574470123, "lr": 0.0, "grad_norm": 1.25,
     "tokens": 1234, "reg/l2": 0.5},
    {"step": 2, "epoch": 0.25, "loss": 5.43, "lr": 5e-4, "grad_norm": None, "tokens": 2468,
     "reg/l2": 0.25, "note": "text is not a scalar"},
    {"step": 3, "final": True, "val_loss": 4.75},
]


def test_tensorboard_scalars_read_back(tmp_path):
    run = tmp_path / "run"
    with Trackers(["tensorboard"], "forgetkit", run, CONFIG, is_main=True) as tr:
        assert tr.active
        for rec in RECORDS:
            tr.log(rec, step=rec["step"])
    got = _scalars(run / "tensorboard")
    expected: dict[str, list[tuple[int, float]]] = {}
    for rec in RECORDS:
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                expected.setdefault(k, []).append((rec["step"], _f32(v)))
    assert set(expected) == {"epoch", "loss", "lr", "grad_norm", "tokens", "reg/l2", "val_loss"}
    assert got == expected  # None, bools ("final") and strings were not logged


def test_tensorboard_resume_purges_steps_after_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    with Trackers(["tensorboard"], "forgetkit", run, CONFIG, is_main=True) as tr:
        for s in (1, 2, 3):
            tr.log({"loss": float(s)}, step=s)
    # resumed from the checkpoint at step 1: steps 2 and 3 are trained (and logged) again
    with Trackers(["tensorboard"], "forgetkit", run, CONFIG, is_main=True, start_step=1) as tr:
        for s in (2, 3):
            tr.log({"loss": 10.0 * s}, step=s)
    assert _scalars(run / "tensorboard")["loss"] == [(1, 1.0), (2, 20.0), (3, 30.0)]


def test_other_ranks_and_no_trackers_do_nothing(tmp_path):
    tr = Trackers(["tensorboard"], "forgetkit", tmp_path / "r1", CONFIG, is_main=False)
    tr.log({"loss": 1.0}, step=1)
    tr.finish()
    assert not tr.active and not (tmp_path / "r1").exists()
    tr = Trackers([], "forgetkit", tmp_path / "r2", CONFIG, is_main=True)
    tr.log({"loss": 1.0}, step=1)
    tr.finish()
    assert not tr.active and not (tmp_path / "r2").exists()


@pytest.mark.parametrize("is_main", [True, False])
def test_missing_package_fails_at_construction(tmp_path, monkeypatch, is_main):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    monkeypatch.setattr(accelerate.utils, "is_mlflow_available", lambda: False)
    with pytest.raises(TrackerUnavailable) as e:
        Trackers(["tensorboard", "wandb", "mlflow"], "forgetkit", tmp_path / "run", CONFIG,
                 is_main=is_main)
    msg = str(e.value)
    assert "wandb, mlflow" in msg and "pip install wandb mlflow" in msg
    assert isinstance(e.value, ConfigError)  # the faces print it as one line, exit 2
    assert not (tmp_path / "run").exists()  # nothing was started before the check


def test_check_trackers_dedupes_and_rejects_unknown():
    assert check_trackers(["tensorboard", "tensorboard"]) == ["tensorboard"]
    with pytest.raises(TrackerUnavailable, match="unknown tracker"):
        check_trackers(["tensorbored"])


def test_flat_config():
    assert flat_config(CONFIG) == {"name": "tiny", "seed": 0, "training.lr": 1e-3,
                                   "training.betas": "[0.9, 0.999]",
                                   "training.warmup_steps": "None", "training.resume": True}


def test_the_loop_logs_every_record_to_tensorboard(tiny_cfg, tmp_path):
    """``output.trackers: [tensorboard]``: every train_log.jsonl record's numbers reach
    TensorBoard at its step (JSONL is written as always), the final validation loss too."""
    import json

    from forgetkit.train.loop import train

    cfg = tiny_cfg(training={"max_steps": 3, "log_every": 1},
                   output={"dir": str(tmp_path / "run"), "trackers": ["tensorboard"]})
    res = train(cfg, progress=False)
    recs = [json.loads(x) for x in (res.out_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert len(steps) == 3
    sc = _scalars(res.out_dir / "tensorboard")
    assert [s for s, _ in sc["loss"]] == [1, 2, 3]
    for (s, v), r in zip(sc["loss"], steps, strict=True):
        assert v == _f32(r["loss"]) and s == r["step"]
    assert [v for _, v in sc["lr"]] == [_f32(r["lr"]) for r in steps]
    final = [r for r in recs if r.get("final")][0]
    assert sc["val_loss"][-1] == (3, _f32(final["val_loss"]))
