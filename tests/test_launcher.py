"""What an ``accelerate launch`` passes through the environment vs the forgetkit config: the
config wins for the precision (with a warning on conflict), launcher strategy flags are refused."""

from __future__ import annotations

import logging

import pytest

from forgetkit.config import ConfigError, DistributedConfig, TrainingConfig
from forgetkit.train.distributed import check_launcher_settings, make_backend


def test_launcher_bf16_against_config_no_warns_and_the_config_wins(monkeypatch, caplog):
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    with caplog.at_level(logging.WARNING, logger="forgetkit"):
        backend = make_backend(DistributedConfig(cpu=True), TrainingConfig())
    assert backend.accelerator.mixed_precision == "no"  # the config's default, fp32
    msgs = [r.getMessage() for r in caplog.records]
    assert any("'bf16'" in m and "training.mixed_precision=bf16" in m and "fp32" in m
               for m in msgs), msgs


def test_agreeing_or_absent_launcher_precision_is_silent(caplog):
    with caplog.at_level(logging.WARNING, logger="forgetkit"):
        check_launcher_settings(DistributedConfig(), TrainingConfig(mixed_precision="bf16"),
                                env={"ACCELERATE_MIXED_PRECISION": "bf16"})
        check_launcher_settings(DistributedConfig(), TrainingConfig(), env={})
    assert not caplog.records


@pytest.mark.parametrize("var,strategy", [("ACCELERATE_USE_FSDP", "fsdp"),
                                          ("ACCELERATE_USE_DEEPSPEED", "deepspeed")])
def test_launcher_strategy_flags_are_refused_with_the_config_key(var, strategy):
    for configured in ("auto", strategy):
        with pytest.raises(ConfigError, match=f"distributed.strategy={strategy}"):
            check_launcher_settings(DistributedConfig(strategy=configured), TrainingConfig(),
                                    env={var: "true"})
    check_launcher_settings(DistributedConfig(), TrainingConfig(), env={var: "false"})


def test_auto_precision_follows_the_measured_matmul(monkeypatch):
    """mixed_precision 'auto' on a CPU: bf16 only where a bf16 matmul is measurably faster
    (AUTO_BF16_MIN_SPEEDUP) than fp32; the other values are taken as configured."""
    import torch

    from forgetkit.train import distributed as d

    for b16, want in ((300.0, "bf16"), (110.0, "no"), (20.0, "no")):
        monkeypatch.setattr(d, "matmul_gflops",
                            lambda dtype, *a, b=b16, **k: b if dtype == torch.bfloat16 else 100.0)
        assert d.resolve_mixed_precision("auto", cpu=True)[0] == want, b16
    assert d.resolve_mixed_precision("bf16", cpu=True) == ("bf16", "as configured")
    assert d.resolve_mixed_precision("no", cpu=True)[0] == "no"
    monkeypatch.undo()  # the real measurement is a positive number:
    assert d.matmul_gflops(torch.float32, seconds=0.05) > 0


def test_bf16_trains_on_cpu_and_the_choice_is_recorded(tiny_cfg, tmp_path, monkeypatch):
    """training.mixed_precision bf16 on CPU: autocast with fp32 master weights (the saved
    weights stay fp32), losses close to fp32's; 'auto' records what it resolved to."""
    import json

    import torch
    from accelerate.state import AcceleratorState, GradientState
    from safetensors.torch import load_file

    from forgetkit.train import distributed as d
    from forgetkit.train.loop import train

    def fresh_accelerate_state() -> None:  # its precision is fixed per process otherwise
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()

    monkeypatch.setattr(d.Backend, "__init__", _with_reset(d.Backend.__init__,
                                                           fresh_accelerate_state))
    runs = {}
    for mp in ("no", "bf16"):
        cfg = tiny_cfg(training={"max_steps": 2, "mixed_precision": mp},
                       output={"dir": str(tmp_path / mp)})
        res = train(cfg, progress=False)
        log = [json.loads(x) for x in (res.out_dir / "train_log.jsonl").read_text().splitlines()]
        runs[mp] = [r["loss"] for r in log if "loss" in r]
        info = json.loads((res.out_dir / "train_result.json").read_text())
        assert info["mixed_precision"] == mp
        w = load_file(str(res.model_dir / "model.safetensors"))
        assert all(t.dtype == torch.float32 for t in w.values())  # fp32 master weights
    assert runs["bf16"] != runs["no"]  # autocast really ran in bf16
    assert runs["bf16"] == pytest.approx(runs["no"], rel=0.02)  # bf16 rounding of a 5.5 loss
    monkeypatch.setattr(d, "resolve_mixed_precision", lambda req, cpu: ("no", "test"))
    cfg = tiny_cfg(training={"max_steps": 1, "mixed_precision": "auto"},
                   output={"dir": str(tmp_path / "auto")})
    res = train(cfg, progress=False)
    assert json.loads((res.out_dir / "train_result.json").read_text())["mixed_precision"] == "no"
    fresh_accelerate_state()  # later tests start from a process's default state


def _with_reset(init, reset):
    def wrapped(self, *a, **k):
        reset()
        return init(self, *a, **k)
    return wrapped
