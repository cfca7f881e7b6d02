"""Config -> regularizer objects (and the replay source, which the data layer mixes in)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgetkit.config import Config, ConfigError, DatasetSpec
from forgetkit.regularizers.base import Regularizer


def build_regularizers(cfg: Config) -> tuple[list[Regularizer], DatasetSpec | None, float]:
    """(loss/gradient regularizers, replay data spec or None, replay ratio).

    Replay is not a regularizer object: its spec and ratio go to the data layer, which mixes the
    replay examples into the training stream (``forgetkit.train.loop.train(replay=, ...)``).
    Regularizers are named by their type (``l2``, ``ewc``, ``kl``), with the index appended when
    a type occurs more than once (``l2_0``, ``l2_2``); the name keys the log (``reg/<name>``),
    the checkpoint state and EWC's own Fisher file.

    Args:
        cfg: the validated run config.

    Returns:
        (regularizers, replay spec or None, replay ratio).
    """
    from forgetkit.regularizers.ewc import EWC
    from forgetkit.regularizers.kl import KLToInit
    from forgetkit.regularizers.l2 import L2SP

    regs: list[Any] = []
    replay, ratio = None, 0.0
    counts: dict[str, int] = {}
    for rc in cfg.regularizers:
        counts[rc.type] = counts.get(rc.type, 0) + 1
    d = cfg.data
    run = {"max_length": d.max_length, "train_on_prompt": d.train_on_prompt,
           "pad_to_multiple_of": d.pad_to_multiple_of, "seed": cfg.seed}
    for i, rc in enumerate(cfg.regularizers):
        where = f"regularizers[{i}]"
        name = rc.type if counts[rc.type] == 1 else f"{rc.type}_{i}"
        if rc.type == "replay":
            if replay is not None:
                raise ConfigError(f"{where}: only one replay source is supported")
            replay, ratio = rc.data, rc.ratio
        elif rc.type == "l2":
            regs.append(L2SP(rc.lam, rc.variant, rc.include, rc.exclude, rc.anchor_dtype,
                             name=name))
        elif rc.type == "ewc":
            if rc.fisher_data is None and not (rc.fisher_path and Path(rc.fisher_path).exists()):
                raise ConfigError(
                    f"{where}.fisher_data: an 'ewc' regularizer needs the data its Fisher is "
                    "estimated on (general data whose abilities should be kept, not the "
                    "fine-tuning task) or an existing fisher_path, got neither")
            if rc.fisher_postprocess == "clamp" and rc.fisher_clamp is None:
                raise ConfigError(f"{where}.fisher_clamp: fisher_postprocess 'clamp' needs a "
                                  "cap, got nothing")
            if rc.fisher_postprocess != "clamp" and rc.fisher_clamp is not None:
                raise ConfigError(f"{where}.fisher_clamp: only used with fisher_postprocess "
                                  f"'clamp', got postprocess '{rc.fisher_postprocess}'")
            regs.append(EWC(rc.lam, fisher_data=rc.fisher_data,
                            fisher_examples=rc.fisher_examples,
                            fisher_batch_size=rc.fisher_batch_size, estimator=rc.estimator,
                            fisher_samples=rc.fisher_samples, fisher_path=rc.fisher_path,
                            postprocess=rc.fisher_postprocess, clamp=rc.fisher_clamp,
                            online_gamma=rc.online_gamma, include=rc.include,
                            exclude=rc.exclude, anchor_dtype=rc.anchor_dtype,
                            run_dir=cfg.output_dir(), name=name, **run))
        elif rc.type == "kl":
            regs.append(KLToInit(rc.lam, rc.data, batch_size=rc.fisher_batch_size,
                                 temperature=rc.temperature, name=name, **run))
        else:
            raise ConfigError(f"{where}.type: '{rc.type}' is not implemented")
    return regs, replay, ratio
