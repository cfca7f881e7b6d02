"""Config -> regularizer objects (and the replay source, which the data layer mixes in)."""

from __future__ import annotations

from typing import Any

from forgetkit.config import Config, ConfigError, DatasetSpec
from forgetkit.regularizers.base import Regularizer


def build_regularizers(cfg: Config) -> tuple[list[Regularizer], DatasetSpec | None, float]:
    """(loss/gradient regularizers, replay data spec or None, replay ratio)."""
    regs: list[Any] = []
    replay, ratio = None, 0.0
    for i, rc in enumerate(cfg.regularizers):
        if rc.type == "replay":
            if replay is not None:
                raise ConfigError(f"regularizers[{i}]: only one replay source is supported")
            replay, ratio = rc.data, rc.ratio
        else:
            raise ConfigError(f"regularizers[{i}].type: '{rc.type}' is not implemented yet")
    return regs, replay, ratio
