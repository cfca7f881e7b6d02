"""forgetkit's regularizers in your own ``transformers.Trainer`` / ``trl.SFTTrainer``.

* :class:`RegularizedTrainer`, :class:`RegularizedSFTTrainer` (needs ``trl``) and
  :func:`regularize` (for any Trainer subclass) take ``regularizers=[L2SP(...), EWC(...),
  KLToInit(...)]`` and ``placement="before_clip" | "after_clip"`` (see
  :mod:`forgetkit.integrations.trainer` for where each term enters and its numerics);
* :func:`fisher_batches` (EWC's Fisher data), :func:`kl_stream` (KL's batches) and
  :func:`to_examples` turn an HF dataset or a list of records into forgetkit's batches;
* :func:`mix_replay` mixes replay records into the training dataset at forgetkit's ratio.

The Trainer classes are imported on first use (importing ``transformers.Trainer`` takes
seconds); the data helpers import no Trainer.
"""

from __future__ import annotations

from typing import Any

from forgetkit.integrations.data import fisher_batches, kl_stream, mix_replay, to_examples

__all__ = [
    "PLACEMENTS",
    "RegularizedSFTTrainer",
    "RegularizedTrainer",
    "RegularizerMixin",
    "fisher_batches",
    "kl_stream",
    "mix_replay",
    "regularize",
    "to_examples",
]

_LAZY = {"PLACEMENTS", "RegularizedTrainer", "RegularizerMixin", "regularize"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from forgetkit.integrations import trainer

        return getattr(trainer, name)
    if name == "RegularizedSFTTrainer":
        from forgetkit.integrations.trainer import sft_trainer_class

        return sft_trainer_class()
    raise AttributeError(f"module 'forgetkit.integrations' has no attribute {name!r}")
