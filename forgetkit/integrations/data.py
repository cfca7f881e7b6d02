"""Data for forgetkit's regularizers inside a ``transformers.Trainer``: Fisher batches, KL's
batch stream and a replay mixer, built from an HF ``datasets.Dataset`` (or a list of records)
through forgetkit's own data layer.

Records are read in one of forgetkit's formats (:mod:`forgetkit.data.templates`):

* ``chat`` -- a ``messages`` column (list of ``{"role", "content"}``, ending with the assistant
  turn), rendered with the tokenizer's chat template; the loss is on the last assistant turn;
* ``instruction`` -- ``instruction`` / ``input`` / ``output`` columns (the Alpaca template);
* ``text`` -- a ``text`` column, every token carries loss.

``format=None`` picks it from the columns (``messages`` -> chat, ``instruction`` -> instruction,
``text`` -> text). ``fields`` maps template fields to other column names, as in a forgetkit
config. The batches hold forgetkit's *pre-shifted* labels (``labels[t]`` is the target of the
logits at ``t``), the convention the regularizers expect; they never go to the Trainer's loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from forgetkit.data.templates import Example

__all__ = ["fisher_batches", "kl_stream", "mix_replay", "to_examples"]

# Column that decides the format when ``format`` is not given, in this order.
_FORMAT_COLUMNS = (("messages", "chat"), ("instruction", "instruction"), ("text", "text"))


def _records(data: Any) -> list[dict[str, Any]]:
    """A list of plain dict records from a ``datasets.Dataset`` or a sequence of mappings."""
    if hasattr(data, "to_list") and hasattr(data, "column_names"):  # datasets.Dataset
        return list(data.to_list())
    if isinstance(data, (str, bytes)) or not isinstance(data, Sequence):
        raise TypeError(f"expected a datasets.Dataset or a list of records, got "
                        f"{type(data).__name__}")
    out = []
    for i, r in enumerate(data):
        if not isinstance(r, Mapping):
            raise TypeError(f"record {i} is a {type(r).__name__}, expected a mapping")
        out.append(dict(r))
    return out


def _format_of(records: Sequence[Mapping[str, Any]], fmt: str | None,
               fields: Mapping[str, str] | None) -> str:
    if fmt is not None:
        if fmt not in ("chat", "instruction", "text"):
            raise ValueError(f"format must be 'chat', 'instruction' or 'text', got {fmt!r}")
        return fmt
    if not records:
        raise ValueError("no records")
    cols = set(records[0])
    fields = fields or {}
    for key, name in _FORMAT_COLUMNS:
        if fields.get(key, key) in cols:
            return name
    raise ValueError(f"cannot tell the format from the columns {sorted(cols)}: pass "
                     "format='chat' (a 'messages' column), 'instruction' or 'text', and "
                     "fields={template field: column} for other column names")


def _pad_id(tokenizer: Any) -> int:
    """The pad id of the batches: the tokenizer's, else its EOS (padding carries no loss and
    is masked out of attention, so sharing EOS is safe -- forgetkit's own tokenizer rule)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an EOS token")
    return int(pad)


def to_examples(data: Any, tokenizer: Any, *, format: str | None = None,
                fields: Mapping[str, str] | None = None, max_length: int = 512,
                train_on_prompt: bool = False, examples: int | None = None, seed: int = 0
                ) -> list[Example]:
    """Tokenise records with forgetkit's templates (prompt masked, labels pre-shifted).

    Args:
        data: a ``datasets.Dataset`` or a list of records.
        tokenizer: the model's tokenizer (``chat`` needs its chat template).
        format: ``"chat"``, ``"instruction"``, ``"text"``, or None to pick it from the columns.
        fields: template field -> column name, when the columns are named otherwise.
        max_length: truncation length in tokens.
        train_on_prompt: put loss on prompt tokens too.
        examples: keep a seeded subset of at most this many records (None: all).
        seed: seed of that subset.

    Returns:
        forgetkit ``Example`` objects; records left without a target token after truncation
        are dropped (with a warning).
    """
    from forgetkit.config import DatasetSpec
    from forgetkit.data.sets import subset_records
    from forgetkit.data.sources import build_examples

    records = _records(data)
    fmt = _format_of(records, format, fields)
    # the rule forgetkit's loop uses for fisher_examples: same records and seed, same subset
    records = subset_records(records, examples, seed)
    # ``name`` only labels build_examples' messages (nothing is loaded from it)
    spec = DatasetSpec(name=f"the given {type(data).__name__}", format=fmt,  # type: ignore[arg-type]
                       fields=dict(fields or {}))
    return build_examples(records, spec, tokenizer, max_length, train_on_prompt)


def fisher_batches(data: Any, tokenizer: Any, *, format: str | None = None,
                   fields: Mapping[str, str] | None = None, max_length: int = 512,
                   batch_size: int = 8, examples: int = 256, seed: int = 0,
                   train_on_prompt: bool = False, pad_to_multiple_of: int = 8
                   ) -> list[dict[str, torch.Tensor]]:
    """The batches EWC's Fisher is estimated on: ``EWC(lam, batches=fisher_batches(...))``.

    A seeded subset of ``examples`` records of ``data`` (the general data whose abilities are
    to be kept -- not the fine-tuning task), tokenised by :func:`to_examples` and collated by
    :func:`forgetkit.data.batching.make_batches` (right-padded, sorted by length, longest
    first). The Fisher's per-example estimators square each example's own gradient, so
    ``batch_size`` only sets how many examples share one forward pass, not the result.

    Returns:
        A list of dicts of CPU tensors ``input_ids``, ``labels`` (pre-shifted),
        ``attention_mask``, ``source``.
    """
    from forgetkit.data.batching import make_batches

    exs = to_examples(data, tokenizer, format=format, fields=fields, max_length=max_length,
                      train_on_prompt=train_on_prompt, examples=examples, seed=seed)
    if not exs:
        raise ValueError("fisher_batches: no record keeps a target token within "
                         f"max_length={max_length}")
    return make_batches(exs, batch_size, _pad_id(tokenizer), pad_to_multiple_of)


def kl_stream(data: Any, tokenizer: Any, *, format: str | None = None,
              fields: Mapping[str, str] | None = None, max_length: int = 512,
              batch_size: int = 8, seed: int = 0, train_on_prompt: bool = False,
              pad_to_multiple_of: int = 8) -> Any:
    """KL's batches: ``KLToInit(lam, batches=kl_stream(...))``.

    A :class:`forgetkit.data.batching.BatchStream` over every record of ``data``: batch ``k``
    is a pure function of ``k`` (endless seeded permutations), so a resumed Trainer continues
    with the batches the uninterrupted run would have drawn.
    """
    from forgetkit.data.batching import BatchStream

    exs = to_examples(data, tokenizer, format=format, fields=fields, max_length=max_length,
                      train_on_prompt=train_on_prompt)
    if not exs:
        raise ValueError(f"kl_stream: no record keeps a target token within "
                         f"max_length={max_length}")
    return BatchStream(exs, batch_size, _pad_id(tokenizer), pad_to_multiple_of, seed)


def _as_dataset(data: Any) -> Any:
    import datasets

    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, datasets.IterableDataset):
        raise TypeError("mix_replay needs map-style datasets (their length decides the number "
                        "of replay examples), got an IterableDataset")
    return datasets.Dataset.from_list(_records(data))


def mix_replay(task_dataset: Any, replay_dataset: Any, ratio: float, seed: int = 0,
               epochs: int = 1) -> Any:
    """The task dataset with replay records mixed in, exactly as forgetkit's loop mixes them.

    ``ratio`` is the fraction of the *training stream* that is replay (forgetkit's
    ``data.replay.ratio``, :func:`forgetkit.data.batching.epoch_stream`): every task record
    stays, and ``n_replay = round(ratio * T)`` of the ``T = n_task + n_replay`` records are
    replay, ``T`` the smallest total for which that holds (so ratio 0.2 of 100 task records
    adds 25: 25/125 = 0.2). The replay records are drawn without replacement from a seeded
    permutation of ``replay_dataset`` (cycling through it again when more are needed than it
    holds) and interleaved evenly with the seeded shuffle of the task records -- epoch ``e``
    is forgetkit's ``epoch_stream(n_task, len(replay), ratio, seed, e)``, record for record.

    Several epochs: the Trainer reshuffles this fixed dataset every epoch, so with
    ``num_train_epochs=E`` the *same* ``n_replay`` replay records come back every epoch
    (forgetkit's loop draws fresh ones each epoch). To get forgetkit's behaviour, pass
    ``epochs=E`` and train one epoch: the result concatenates epochs ``0..E-1`` (each with its
    own shuffle of the task records and the next ``n_replay`` replay draws), ``E * T`` rows.

    Args:
        task_dataset: the fine-tuning data (a ``datasets.Dataset`` or a list of records).
        replay_dataset: the general data to replay; must have every column of the task
            dataset (extra columns are dropped; values are cast to the task's features).
        ratio: replay fraction of the stream, ``0 <= ratio < 1`` (0 with ``epochs=1``: the
            task data as is; 0 with more epochs: that many shuffled task-only epochs).
        seed: seed of the task shuffle and the replay draws.
        epochs: number of forgetkit epochs to lay out one after another.

    Returns:
        A ``datasets.Dataset`` with exactly the task dataset's columns and features and
        ``epochs * (n_task + n_replay)`` rows, accepted by ``Trainer`` and ``SFTTrainer``.
    """
    import datasets

    from forgetkit.data.batching import epoch_stream

    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"replay ratio must be in [0, 1), got {ratio}")
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    task = _as_dataset(task_dataset)
    if ratio == 0.0 and epochs == 1:
        return task  # the task data as is (the Trainer shuffles it)
    if ratio == 0.0:  # task-only epochs, each shuffled as forgetkit's loop does
        rows = [int(i) for e in range(epochs)
                for i in epoch_stream(len(task), 0, 0.0, seed, e).task_idx.tolist()]
        return task.select(rows).flatten_indices()
    replay = _as_dataset(replay_dataset)
    missing = [c for c in task.column_names if c not in replay.column_names]
    if missing:
        raise ValueError(f"the replay dataset lacks the task's column(s) {missing} (it has "
                         f"{replay.column_names}): map it to the task's columns first, e.g. "
                         "replay.map(lambda r: {'messages': ...})")
    if len(replay) == 0:
        raise ValueError("the replay dataset is empty")
    replay = replay.select_columns(task.column_names)
    if replay.features != task.features:
        replay = replay.cast(task.features)
    n_task = len(task)
    task_rows: list[int] = []
    replay_rows: list[int] = []
    order: list[int] = []  # index into concatenate([task.select(task_rows), replay...])
    for e in range(epochs):
        s = epoch_stream(n_task, len(replay), ratio, seed, e)
        for ti, ri in zip(s.task_idx.tolist(), s.replay_idx.tolist(), strict=True):
            if ti >= 0:
                order.append(len(task_rows))
                task_rows.append(ti)
            else:
                order.append(-1 - len(replay_rows))
                replay_rows.append(ri)
    n_t = len(task_rows)
    order = [o if o >= 0 else n_t + (-1 - o) for o in order]
    mixed = datasets.concatenate_datasets([task.select(task_rows), replay.select(replay_rows)])
    return mixed.select(order).flatten_indices()
