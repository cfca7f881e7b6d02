"""Config -> regularizer objects, fed with the batches the data layer built.

Replay is not a regularizer: it is data (``data.replay``), mixed into the training stream by
the data layer (:func:`forgetkit.data.sets.build_example_sets`, :func:`~forgetkit.data.batching.epoch_stream`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forgetkit.config import Config, ConfigError
from forgetkit.regularizers.base import Regularizer


def regularizer_names(cfg: Config) -> list[str]:
    """The name of each regularizer of ``cfg``: its type (``l2``, ``ewc``, ``kl``), with the
    index appended when a type occurs more than once (``l2_0``, ``l2_2``). The name keys the log
    (``reg/<name>``), the checkpoint state and EWC's own Fisher file."""
    counts: dict[str, int] = {}
    for rc in cfg.regularizers:
        counts[rc.type] = counts.get(rc.type, 0) + 1
    return [rc.type if counts[rc.type] == 1 else f"{rc.type}_{i}"
            for i, rc in enumerate(cfg.regularizers)]


def check_regularizers(cfg: Config) -> None:
    """What can be checked about the regularizers before any data or model is loaded.

    Raises:
        ConfigError: an EWC regularizer has neither Fisher data nor an existing fisher_path.
    """
    for i, rc in enumerate(cfg.regularizers):
        if rc.type == "ewc" and rc.fisher_data is None and not (
                rc.fisher_path and Path(rc.fisher_path).exists()):
            raise ConfigError(
                f"regularizers[{i}].fisher_data: an 'ewc' regularizer needs the data its Fisher "
                "is estimated on (general data whose abilities should be kept, not the "
                "fine-tuning task) or an existing fisher_path, got neither")
        if rc.type == "ewc" and rc.fisher_postprocess == "clamp" and rc.fisher_clamp is None:
            raise ConfigError(f"regularizers[{i}].fisher_clamp: fisher_postprocess 'clamp' "
                              "needs a cap, got nothing")
        if rc.type == "ewc" and rc.fisher_postprocess != "clamp" and rc.fisher_clamp is not None:
            raise ConfigError(f"regularizers[{i}].fisher_clamp: only used with "
                              f"fisher_postprocess 'clamp', got '{rc.fisher_postprocess}'")


def build_regularizers(cfg: Config, sets: Any, pad_id: int) -> list[Regularizer]:
    """The regularizers of ``cfg``, each given its batches from ``sets``.

    Args:
        cfg: the validated run config.
        sets: the run's :class:`forgetkit.data.sets.ExampleSets` (Fisher and KL examples by
            regularizer index).
        pad_id: the tokenizer's pad id (the batches' padding).

    Returns:
        The regularizers, in config order.
    """
    from forgetkit.data.batching import BatchStream, make_batches
    from forgetkit.identity import fisher_identity
    from forgetkit.regularizers.ewc import EWC
    from forgetkit.regularizers.kl import KLToInit
    from forgetkit.regularizers.l2 import L2SP

    check_regularizers(cfg)
    pad_mult = cfg.data.pad_to_multiple_of
    regs: list[Any] = []
    for i, (rc, name) in enumerate(zip(cfg.regularizers, regularizer_names(cfg), strict=True)):
        if rc.type == "l2":
            regs.append(L2SP(rc.lam, rc.variant, rc.include, rc.exclude, rc.anchor_dtype,
                             anchor=rc.anchor, anchor_path=rc.anchor_path, name=name))
        elif rc.type == "ewc":
            examples = sets.fisher.get(i)
            batches = (make_batches(examples, rc.fisher_batch_size, pad_id, pad_mult)
                       if examples else None)
            regs.append(EWC(rc.lam, batches=batches, estimator=rc.estimator,
                            fisher_samples=rc.fisher_samples, fisher_path=rc.fisher_path,
                            postprocess=rc.fisher_postprocess, clamp=rc.fisher_clamp,
                            online_gamma=rc.online_gamma, include=rc.include,
                            exclude=rc.exclude, anchor_dtype=rc.anchor_dtype, seed=cfg.seed,
                            identity=fisher_identity(cfg, rc), run_dir=cfg.output_dir(),
                            name=name))
        elif rc.type == "kl":
            stream = BatchStream(sets.kl[i], rc.batch_size, pad_id, pad_mult, cfg.seed)
            regs.append(KLToInit(rc.lam, stream, temperature=rc.temperature, name=name))
        else:
            raise ConfigError(f"regularizers[{i}].type: '{rc.type}' is not implemented")
    return regs
