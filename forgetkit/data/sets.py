"""Every example set a run trains with, built in one place from the config.

The task's train and validation examples, the replay pool (``data.replay``: its ``data`` and
then a seeded buffer of each of its ``sources``, :func:`replay_buffer`), each EWC
regularizer's Fisher examples (``fisher_data``, a seeded subset of ``fisher_examples``) and each
KL regularizer's examples (``data``) are tokenised here with the run's tokenizer, ``max_length``
and prompt masking. Regularizers never load data: :func:`forgetkit.regularizers.build_regularizers`
hands them the batches built from these sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from forgetkit.config import Config, ConfigError, DatasetSpec
from forgetkit.data.sources import build_examples, load_records, select, split_records
from forgetkit.data.templates import Example

__all__ = ["ExampleSets", "build_example_sets", "load_examples", "replay_buffer",
           "subset_records"]


@dataclass
class ExampleSets:
    """The tokenised example sets of one run.

    Attributes:
        train, validation: the task's examples.
        replay: the replay pool (``source=1``), empty without ``data.replay``.
        replay_ratio: the fraction of the training stream that is replay (0 without).
        fisher: EWC regularizer index in ``cfg.regularizers`` -> its Fisher examples.
        kl: KL regularizer index in ``cfg.regularizers`` -> its examples.
    """

    train: list[Example]
    validation: list[Example]
    replay: list[Example] = field(default_factory=list)
    replay_ratio: float = 0.0
    fisher: dict[int, list[Example]] = field(default_factory=dict)
    kl: dict[int, list[Example]] = field(default_factory=dict)


FISHER_SALT = 0xF15E  # EWC's Fisher examples
REPLAY_SALT = 0x8E7A  # replay buffers (another subset than a Fisher of the same data)


def subset_records(records: list[dict[str, Any]], limit: int | None, seed: int,
                   salt: int = FISHER_SALT) -> list[dict[str, Any]]:
    """A seeded subset of at most ``limit`` records, kept in their order (EWC's Fisher
    examples: ``default_rng([seed, salt]).permutation(n)[:limit]``, sorted)."""
    if limit is None or len(records) <= limit:
        return list(records)
    idx = np.random.default_rng([int(seed), int(salt)]).permutation(len(records))[:limit]
    return [records[i] for i in sorted(idx)]


def replay_buffer(src: Any, tokenizer: Any, *, max_length: int, train_on_prompt: bool,
                  seed: int) -> list[Example]:
    """The replay examples of one :class:`forgetkit.config.ReplaySource`: the source's records
    (its own ``limit`` and shuffle first, as its stage read them), then a seeded subset of
    ``src.examples`` of them (:func:`subset_records` with :data:`REPLAY_SALT`: the same seed
    gives the same buffer), tokenised with ``source=1``, in file order."""
    records = select(load_records(src.data), src.data, seed)
    records = subset_records(records, src.examples, seed, REPLAY_SALT)
    return build_examples(records, src.data, tokenizer, max_length, train_on_prompt,
                          packed=False, source=1)


def load_examples(spec: DatasetSpec, tokenizer: Any, *, max_length: int,
                  train_on_prompt: bool = False, seed: int = 0, limit: int | None = None,
                  source: int = 0) -> list[Example]:
    """Tokenised examples of a ``DatasetSpec`` (its own ``limit`` first, then a seeded subset
    of ``limit`` examples), in file order.

    Args:
        spec: the data source.
        tokenizer: the run's tokenizer.
        max_length: truncation length (the run's ``data.max_length``).
        train_on_prompt: targets on prompt tokens as well (the run's ``data.train_on_prompt``).
        seed: seed of the record shuffle (``spec.shuffle_before_limit``) and the subset.
        limit: keep at most this many records (a seeded subset, kept in file order).
        source: the examples' ``source`` tag (1 marks replay in the loss bookkeeping).

    Returns:
        A list of ``Example`` (records without any target token are dropped).
    """
    records = subset_records(select(load_records(spec), spec, seed), limit, seed)
    return build_examples(records, spec, tokenizer, max_length, train_on_prompt, packed=False,
                          source=source)


def build_example_sets(cfg: Config, tokenizer: Any) -> ExampleSets:
    """Tokenise every example set of ``cfg`` (see the module docstring).

    Raises:
        ConfigError: the task has no example with a target token within ``data.max_length``,
            or a regularizer's data gives no example.
    """
    d = cfg.data
    packed = d.batching == "packed"
    records = select(load_records(d.train), d.train, cfg.seed)
    if d.validation is not None:
        train_r = records
        val_r = select(load_records(d.validation), d.validation, cfg.seed)
    else:
        train_r, val_r = split_records(records, d.validation_fraction, cfg.seed)
    mk = dict(tokenizer=tokenizer, max_length=d.max_length, train_on_prompt=d.train_on_prompt,
              packed=packed)
    train = build_examples(train_r, d.train, **mk)
    val = build_examples(val_r, d.validation or d.train, **mk)
    if not train:
        raise ConfigError(f"data.train: no example keeps a target token within "
                          f"data.max_length={d.max_length}; raise data.max_length")
    sets = ExampleSets(train, val)
    rp = getattr(d, "replay", None)
    if rp is not None:
        if rp.data is not None:
            rec = select(load_records(rp.data), rp.data, cfg.seed)
            sets.replay = build_examples(rec, rp.data, tokenizer, d.max_length,
                                         d.train_on_prompt, packed=False, source=1)
            if not sets.replay:
                raise ConfigError("data.replay.data: gave no example with a target token "
                                  f"within data.max_length={d.max_length}")
        for i, src in enumerate(rp.sources):  # e.g. a task sequence's earlier stages
            buf = replay_buffer(src, tokenizer, max_length=d.max_length,
                                train_on_prompt=d.train_on_prompt, seed=cfg.seed)
            if not buf:
                raise ConfigError(f"data.replay.sources[{i}].data: gave no example with a "
                                  f"target token within data.max_length={d.max_length}")
            sets.replay += buf
        sets.replay_ratio = float(rp.ratio)
    kw = dict(max_length=d.max_length, train_on_prompt=d.train_on_prompt, seed=cfg.seed)
    for i, rc in enumerate(cfg.regularizers):
        if rc.type == "ewc" and rc.fisher_data is not None:
            sets.fisher[i] = load_examples(rc.fisher_data, tokenizer, limit=rc.fisher_examples,
                                           **kw)
            if not sets.fisher[i]:
                raise ConfigError(f"regularizers[{i}].fisher_data: gave no example with a "
                                  f"target token within data.max_length={d.max_length}")
        elif rc.type == "kl":
            sets.kl[i] = load_examples(rc.data, tokenizer, **kw)
            if not sets.kl[i]:
                raise ConfigError(f"regularizers[{i}].data: gave no example with a target "
                                  f"token within data.max_length={d.max_length}")
    return sets
