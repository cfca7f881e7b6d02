"""Deterministic batch planning, replay mixing and collation.

The planner decides, for each optimizer step, which examples form its *global* batch
(``micro_batch_size * gradient_accumulation_steps * world_size`` examples). Every rank computes
the same plan from the seed, then takes its own micro-batches. Because the loss is normalised by
the global number of target tokens (see ``forgetkit.train.loop``), the gradient of a step depends
only on *which* examples it holds, not on how they are split over ranks or micro-steps: a
2-process run and a 1-process run with the same global batch reach the same weights.

Length-grouped batching: examples are shuffled, cut into mega-batches of
``GROUP_FACTOR`` global batches, sorted by length inside each mega-batch, and the resulting
batches are shuffled again, so each batch holds similar lengths (little padding) while the order
stays random. The batch holding the longest example goes first, so an out-of-memory error shows
up on step 1 rather than hours in.

Padding-free batching (``data.batching: padding_free``) plans exactly as ``length_grouped``
(the same examples per step, in the same seeded order); only collation differs:
:func:`collate_flat` concatenates a micro-batch's examples into one row (B = 1) with
``position_ids`` restarting at 0 for each example, so no padding token is ever computed. The
training loop (``forgetkit.train.loop``) keeps attention inside each example (see there).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from forgetkit.data.templates import IGNORE_INDEX, Example

GROUP_FACTOR = 16


def _rng(seed: int, epoch: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), int(epoch), 0x5EED])


def replay_positions(n_task: int, ratio: float) -> np.ndarray:
    """Boolean mask over a stream of ``n_task + n_replay`` slots: True where a replay example goes.

    ``n_replay`` is chosen so that the replay fraction of the stream is exactly
    ``round(ratio * total)`` of ``total = n_task + n_replay``; the replay slots are spread
    evenly (Bresenham-style: slot i is replay when floor((i+1)·R/T) > floor(i·R/T)).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"replay ratio must be in [0, 1), got {ratio}")
    if ratio == 0.0:
        return np.zeros(n_task, dtype=bool)
    # Smallest total T with T - round(ratio*T) == n_task (T - round(rT) grows by 0 or 1 per T).
    total = n_task
    while total - round(ratio * total) < n_task:
        total += 1
    n_replay = round(ratio * total)
    i = np.arange(total)
    mask = ((i + 1) * n_replay // total) > (i * n_replay // total)
    assert int(mask.sum()) == n_replay and total - n_replay == n_task
    return mask


@dataclass
class Stream:
    """The examples of one epoch in order: indices into the task pool and the replay pool."""

    task_idx: np.ndarray  # (n,) index into the task examples, -1 where replay
    replay_idx: np.ndarray  # (n,) index into the replay examples, -1 where task


def epoch_stream(n_task: int, n_replay_pool: int, ratio: float, seed: int, epoch: int) -> Stream:
    """Shuffle the task examples and interleave replay draws at exactly the configured ratio.

    Replay examples are drawn without replacement from a seeded permutation of the replay pool
    (cycling through it again if an epoch needs more than the pool holds).
    """
    rng = _rng(seed, epoch)
    order = rng.permutation(n_task)
    mask = replay_positions(n_task, ratio)
    task_idx = np.full(mask.shape[0], -1, dtype=np.int64)
    replay_idx = np.full(mask.shape[0], -1, dtype=np.int64)
    task_idx[~mask] = order
    n_rep = int(mask.sum())
    if n_rep:
        if n_replay_pool <= 0:
            raise ValueError("replay ratio > 0 but the replay pool is empty")
        # Different replay items each epoch: continue through a per-seed permutation.
        perm = np.random.default_rng([int(seed), 0xF00D]).permutation(n_replay_pool)
        start = epoch * n_rep
        replay_idx[mask] = perm[(start + np.arange(n_rep)) % n_replay_pool]
    return Stream(task_idx, replay_idx)


def plan_batches(lengths: Sequence[int], global_batch: int, mode: str, seed: int,
                 epoch: int) -> list[list[int]]:
    """Split stream positions ``0..len(lengths)-1`` into global batches (incomplete one dropped).

    ``lengths`` are the token lengths of the stream's examples *in stream order*.
    """
    n = len(lengths)
    n_batches = n // global_batch
    if mode == "random" or mode == "packed":
        pos = np.arange(n)  # the stream is already shuffled
        return [pos[i * global_batch:(i + 1) * global_batch].tolist() for i in range(n_batches)]
    if mode == "padding_free":  # same plan as length_grouped; only the collation differs
        mode = "length_grouped"
    if mode != "length_grouped":
        raise ValueError(f"unknown batching mode {mode!r}")
    rng = _rng(seed, epoch + 7919)
    lens = np.asarray(lengths)
    mega = global_batch * GROUP_FACTOR
    pos = np.arange(n_batches * global_batch)  # stream order; the tail is dropped
    batches: list[list[int]] = []
    for s in range(0, len(pos), mega):
        chunk = pos[s:s + mega]
        chunk = chunk[np.argsort(-lens[chunk], kind="stable")]
        batches += [chunk[i:i + global_batch].tolist() for i in range(0, len(chunk), global_batch)]
    order = rng.permutation(len(batches))
    batches = [batches[i] for i in order]
    if batches:
        longest = max(range(len(batches)), key=lambda b: max(lens[batches[b]]))
        batches.insert(0, batches.pop(longest))
    return batches


def split_step(batch: list[int], lengths: Sequence[int], world_size: int, rank: int,
               accum: int) -> list[list[int]]:
    """This rank's ``accum`` micro-batches of one global batch.

    The global batch is sorted by length and cut into ``world_size*accum`` contiguous micro-
    batches (similar lengths together: less padding); micro-batch ``a*world_size + r`` goes to
    rank ``r`` as its ``a``-th micro-step.
    """
    n_micro = world_size * accum
    if len(batch) % n_micro:
        raise ValueError(f"global batch of {len(batch)} does not split into {n_micro} micro-batches")
    size = len(batch) // n_micro
    srt = sorted(batch, key=lambda i: -lengths[i])
    micro = [srt[k * size:(k + 1) * size] for k in range(n_micro)]
    return [micro[a * world_size + rank] for a in range(accum)]


def collate(examples: Sequence[Example], pad_id: int, pad_to_multiple_of: int = 8
            ) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example (rounded up to a multiple): (B, T) tensors."""
    longest = max(len(e.input_ids) for e in examples)
    T = int(math.ceil(longest / pad_to_multiple_of) * pad_to_multiple_of)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((B, T), dtype=torch.long)
    source = torch.zeros(B, dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
        source[i] = e.source
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask,
            "source": source}


def collate_flat(examples: Sequence[Example]) -> dict[str, torch.Tensor | int]:
    """Concatenate examples into one row (B = 1): the padding-free micro-batch.

    Returns ``input_ids``, ``labels``, ``position_ids`` and ``source`` as (1, N) tensors with
    ``N = sum(len(e.input_ids))`` (no padding), ``cu_seq_lens`` (n+1,) int32 (the example
    boundaries, for varlen attention kernels) and ``max_length`` (int: the longest example).
    ``position_ids`` restart at 0 for each example (``0..len-1``); ``source`` is the example's
    tag repeated over its tokens.

    Labels are forgetkit's pre-shifted labels copied per example: ``labels[t]`` is the target of
    position ``t`` inside its own example, and every example's last label is ``IGNORE_INDEX``
    (``tokenize_record`` appends it), so no target crosses a boundary: the last position of an
    example never predicts the first token of the next. A sequence whose last label is not
    ignored (the blocks of ``pack_examples``) is refused.
    """
    if not examples:
        raise ValueError("collate_flat: no examples")
    ids: list[int] = []
    labels: list[int] = []
    pos: list[int] = []
    src: list[int] = []
    cu = [0]
    for e in examples:
        n = len(e.input_ids)
        if n == 0 or len(e.labels) != n:
            raise ValueError(f"collate_flat: example with {n} tokens and {len(e.labels)} labels")
        if e.labels[-1] != IGNORE_INDEX:
            raise ValueError("collate_flat: an example's last label must be IGNORE_INDEX (its "
                             "target would be the next example's first token); packed text "
                             "blocks are not padding-free examples")
        ids += e.input_ids
        labels += e.labels
        pos += range(n)
        src += [e.source] * n
        cu.append(cu[-1] + n)
    return {"input_ids": torch.tensor([ids], dtype=torch.long),
            "labels": torch.tensor([labels], dtype=torch.long),
            "position_ids": torch.tensor([pos], dtype=torch.long),
            "source": torch.tensor([src], dtype=torch.long),
            "cu_seq_lens": torch.tensor(cu, dtype=torch.int32),
            "max_length": max(len(e.input_ids) for e in examples)}


def make_batches(examples: Sequence[Example], batch_size: int, pad_id: int,
                 pad_to_multiple_of: int = 8) -> list[dict[str, torch.Tensor]]:
    """Collated, right-padded batches of similar lengths (deterministic: sorted by length,
    longest first) -- the batches EWC's Fisher is estimated on.

    Args:
        examples: the examples.
        batch_size: examples per batch (the last batch may be smaller).
        pad_id: the tokenizer's pad id.
        pad_to_multiple_of: padding multiple of the sequence length.

    Returns:
        A list of dicts with ``input_ids``, ``labels``, ``attention_mask``, ``source`` tensors.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    return [collate([examples[i] for i in order[s:s + batch_size]], pad_id, pad_to_multiple_of)
            for s in range(0, len(order), batch_size)]


class BatchStream:
    """An endless, seeded, resumable stream of batches over a fixed example set (KL's batches).

    Batch ``k`` holds the examples at stream positions ``[k*B, (k+1)*B)`` of the concatenation
    of epoch permutations ``perm_e = default_rng([seed, e, 0x4B1]).permutation(n)``: a pure
    function of ``k``, so a resumed run that knows how many batches it drew continues with
    exactly the batches of the uninterrupted run, and rank ``r`` of ``W`` drawing batch
    ``call * W + r`` never shares a batch with another rank.

    Args:
        examples: the example set (tokenised by the data layer).
        batch_size: examples per batch B.
        pad_id: the tokenizer's pad id.
        pad_to_multiple_of: padding multiple of the sequence length.
        seed: seed of the permutations.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int,
                 pad_to_multiple_of: int = 8, seed: int = 0) -> None:
        if not examples:
            raise ValueError("BatchStream: no examples")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.examples = list(examples)
        self.batch_size, self.pad_id = batch_size, pad_id
        self.pad_to_multiple_of, self.seed = pad_to_multiple_of, seed
        self._perm: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        """The number of distinct examples (the stream itself is endless)."""
        return len(self.examples)

    def indices(self, k: int) -> list[int]:
        """Example indices of batch ``k``."""
        n, out = len(self.examples), []
        for j in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, i = divmod(j, n)
            if epoch not in self._perm:
                self._perm = {epoch: np.random.default_rng([self.seed, epoch, 0x4B1]
                                                           ).permutation(n)}
            out.append(int(self._perm[epoch][i]))
        return out

    def batch(self, k: int) -> dict[str, torch.Tensor]:
        """Batch ``k``, collated on the CPU."""
        return collate([self.examples[i] for i in self.indices(k)], self.pad_id,
                       self.pad_to_multiple_of)
