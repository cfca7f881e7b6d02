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
