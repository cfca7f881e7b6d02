"""The one training loop. Read it top to bottom:

config -> backend (process group, device) -> lock the output -> model -> data -> pick the
checkpoint to resume (newest intact, same run identity; nothing written before this) ->
optimizer -> regularizers.prepare -> wrap -> resume -> config.yaml -> for each optimizer step:
[micro-steps: forward, token-normalised loss + penalties, backward] -> gradient terms -> clip
-> step -> lr -> log (non-finite: stop; collapse: warn) / validate / checkpoint -> final
checkpoint and HF model -> train_result.json (only on success). (``training.clip_scope: loss``
swaps the two middle stages: clip the loss gradient, then add the gradient terms, so a stiff
EWC term cannot set the clip factor of every weight.)

Faults end in one named exception each: LockHeld, CheckpointMismatch (both ConfigError),
NonFiniteLoss, TrainingInterrupted (Ctrl-C), DiskFull; a failed write leaves no ``*.tmp``.

Loss normalisation (the subtle part). For one optimizer step with global batch G (all
micro-batches on all ranks), the loss is the mean over the *target tokens* of G::

    L = (1 / N_G) * sum_{examples in G} sum_{targets t} CE_t,   N_G = number of targets in G

Each rank back-propagates, per micro-batch m, ``sum_{t in m} CE_t * W / N_G`` where W is the
world size, because DDP/FSDP/DeepSpeed *average* gradients over the ranks (dividing by W).
N_G comes from the deterministic plan, which every rank knows: no communication is needed.
With this, accumulation 4 x batch 2 equals batch 8, and 2 processes equal 1.

Padding-free batches (``data.batching: padding_free``): the plan is length_grouped's (the same
examples per step), but each micro-batch is one row of its examples concatenated
(:func:`forgetkit.data.batching.collate_flat`), with ``position_ids`` restarting at 0 per example
and attention kept inside each example (:class:`PaddingFree`, checked by a probe before
training). ``sum CE_t`` over the row is the same sum as over the padded batch and N_G is the same
count from the plan, so L is unchanged; a padding-free run takes the padded run's steps up to
float rounding (different matmul shapes reorder the sums).
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import math
import os
import pickle
import random
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from forgetkit.config import Config, ConfigError, config_to_dict, dump_config
from forgetkit.data.batching import collate, collate_flat, epoch_stream, plan_batches, split_step
from forgetkit.data.sets import ExampleSets, build_example_sets
from forgetkit.data.templates import IGNORE_INDEX, Example
from forgetkit.identity import (
    fill_added_keys,
    format_mismatch,
    identity_diff,
    identity_digest,
    sha256_file,
    training_identity,
)
from forgetkit.locking import dir_lock
from forgetkit.models import (
    count_parameters,
    human_count,
    load_model,
    save_hf_checkpoint,
    save_merged_lora,
)
from forgetkit.regularizers.base import RegContext, Regularizer, optimizer_lr_lookup
from forgetkit.regularizers.build import build_regularizers
from forgetkit.train import segment_attention
from forgetkit.train.distributed import Backend, DeepSpeedBackend, make_backend
from forgetkit.train.freeze import apply_freeze, check_freeze, freeze_active
from forgetkit.train.lora import apply_lora, check_lora_config
from forgetkit.train.optim import build_optimizer, lr_at, param_groups, set_lr
from forgetkit.train.tracking import Trackers, check_trackers

log = logging.getLogger("forgetkit")


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf; the message says which checkpoint (if any) is
    the last good one."""


class CheckpointMismatch(ConfigError):
    """The output's checkpoint belongs to another run (config or data changed), has an older
    format, or holds a file forgetkit never writes (refused by the no-pickle loaders); the
    message names the keys or file and the ways on (the faces exit 2)."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) during training. ``step``: optimizer steps finished; ``checkpoint``: the
    step of the newest checkpoint a rerun resumes from (None: none)."""

    def __init__(self, step: int, checkpoint: int | None) -> None:
        self.step, self.checkpoint = step, checkpoint
        last = f"step {checkpoint}" if checkpoint is not None else "none"
        super().__init__(f"interrupted at step {step} (last checkpoint: {last}); rerun the same "
                         "command to resume")

    def __str__(self) -> str:
        return str(self.args[0])


class DiskFull(OSError):
    """ENOSPC while writing training output; temporary files were removed."""

    def __init__(self, directory: Path, free: str | None = None) -> None:
        super().__init__(errno.ENOSPC, f"no space left on the disk of {directory} "
                         f"({free or _free(directory)}): free space there or set output.dir to "
                         "another disk; the previous checkpoint and results are kept")
        self.directory = directory

    def __str__(self) -> str:
        return str(self.strerror)


@dataclass
class TrainResult:
    out_dir: Path
    model_dir: Path | None
    steps: int
    tokens: int
    target_tokens: int
    train_time_s: float
    final_val_loss: float | None
    resumed_from: int | None
    collapsed: bool = False
    collapse: dict[str, Any] | None = None  # reason, from_step, to_step (see CollapseWatch)


def memory_report(cfg: Config, backend: Any, baseline_rss: int | None = None,
                  trainable_params: int | None = None, logit_positions: int | None = None
                  ) -> dict[str, Any]:
    """The process's measured memory next to forgetkit's estimate (forgetkit.memory).

    On a GPU ``torch.cuda.max_memory_allocated`` (tensors: comparable with the estimate); on
    CPU the RSS growth over ``baseline_rss`` (read after the model loaded: comparable with the
    estimate beyond the loaded weights) and the whole-process peak RSS (interpreter, libraries,
    caches: not an estimate check). The logged line says which is which. Never fails the run.
    """
    try:
        import dataclasses

        from forgetkit.memory import estimate_for_config, measured_peak_bytes, memory_line

        cfg = dataclasses.replace(cfg, training=backend.tcfg)  # the precision that trained
        sharded = backend.world_size > 1 and backend.name in ("fsdp", "deepspeed")
        est = estimate_for_config(cfg, backend.world_size,
                                  model=None if sharded else backend.unwrap(),
                                  trainable_params=trainable_params,
                                  logit_positions=logit_positions)
        measured = measured_peak_bytes(baseline_rss)
        log.info("%s", memory_line(est, measured))
        return {"memory": measured, "memory_estimate": est.to_dict()}
    except Exception as e:  # an estimate must never fail a finished training run
        log.warning("memory report unavailable: %s", e)
        return {}


# ----------------------------------------------------------------------------- data

def build_data(cfg: Config, tokenizer: Any) -> ExampleSets:
    """Every example set of the run (task, validation, replay, Fisher, KL): the data layer's
    :func:`forgetkit.data.sets.build_example_sets`."""
    return build_example_sets(cfg, tokenizer)


class StepPlan:
    """Which examples every optimizer step uses: a pure function of (data, config, seed)."""

    def __init__(self, data: ExampleSets, cfg: Config, world_size: int) -> None:
        t = cfg.training
        self.data, self.cfg, self.world_size = data, cfg, world_size
        self.global_batch = t.micro_batch_size * t.gradient_accumulation_steps * world_size
        self._epoch_cache: dict[int, tuple[list[Example], list[list[int]]]] = {}
        stream, batches = self.epoch(0)
        self.steps_per_epoch = len(batches)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the global batch ({self.global_batch} = micro {t.micro_batch_size} x accum "
                f"{t.gradient_accumulation_steps} x {world_size} processes) is larger than the "
                f"{len(stream)} training examples")
        self.total_steps = t.max_steps or t.epochs * self.steps_per_epoch
        dropped = len(stream) - self.steps_per_epoch * self.global_batch
        if dropped:
            log.info("each epoch drops its last %d examples (incomplete global batch of %d)",
                     dropped, self.global_batch)

    def epoch(self, e: int) -> tuple[list[Example], list[list[int]]]:
        if e not in self._epoch_cache:
            self._epoch_cache = {}  # keep one epoch in memory
            d = self.data
            s = epoch_stream(len(d.train), len(d.replay), d.replay_ratio, self.cfg.seed, e)
            stream = [d.train[i] if i >= 0 else d.replay[j]
                      for i, j in zip(s.task_idx, s.replay_idx, strict=True)]
            lengths = [len(x.input_ids) for x in stream]
            batches = plan_batches(lengths, self.global_batch, self.cfg.data.batching,
                                   self.cfg.seed, e)
            self._epoch_cache[e] = (stream, batches)
        return self._epoch_cache[e]

    def replay_trained(self, steps: int) -> tuple[int, int]:
        """(replay examples, all examples) in the first ``steps`` optimizer steps (all ranks):
        the replay share the run actually trained on (exact per epoch, not per step)."""
        n_rep = n_all = 0
        for k in range(steps):
            e, i = divmod(k, self.steps_per_epoch)
            stream, batches = self.epoch(e)
            n_rep += sum(stream[j].source == 1 for j in batches[i])
            n_all += len(batches[i])
        return n_rep, n_all

    def step(self, step: int, rank: int) -> tuple[list[list[Example]], int, int]:
        """(this rank's micro-batches, global target tokens, global input tokens) of a step."""
        e, i = divmod(step, self.steps_per_epoch)
        stream, batches = self.epoch(e)
        batch = batches[i]
        lengths = [len(x.input_ids) for x in stream]
        micro = split_step(batch, lengths, self.world_size, rank,
                           self.cfg.training.gradient_accumulation_steps)
        n_targets = sum(stream[j].n_targets for j in batch)
        n_tokens = sum(lengths[j] for j in batch)
        return [[stream[j] for j in mb] for mb in micro], n_targets, n_tokens


# ----------------------------------------------------------------------------- loss

def token_losses(model_out: Any, labels: torch.Tensor) -> torch.Tensor:
    """Per-position cross-entropy (B, T) in fp32; 0 where the label is ignored.

    ``labels`` are pre-shifted (see forgetkit.data.templates), so logits need no slicing copy.
    """
    logits = model_out.logits  # (B, T, V)
    ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                         ignore_index=IGNORE_INDEX, reduction="none")
    return ce.view(labels.shape)


def target_losses(model_out: Any, labels: torch.Tensor, keep: torch.Tensor | None
                  ) -> torch.Tensor:
    """Per-position cross-entropy in fp32: (B, T) with 0 where the label is ignored
    (:func:`token_losses`) when ``keep`` is None; else (K,) at the K positions of the boolean
    mask ``keep`` (B, T), the model's logits being those positions only (``logits_to_keep``)."""
    if keep is None:
        return token_losses(model_out, labels)
    return F.cross_entropy(model_out.logits.float(), labels[keep], ignore_index=IGNORE_INDEX,
                           reduction="none")


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v
            for k, v in batch.items()}


# ----------------------------------------------------------------------------- padding-free

# Attention implementations whose boundaries transformers enforces from ``position_ids`` alone
# (masking_utils: with ``attention_mask=None`` and no cache, ``find_packed_sequence_indices``
# turns every position reset into a block of the causal mask; transformers >= 4.56, read in
# 5.24), and those an explicit 4D block-diagonal mask can serve instead.
_MASK_IMPLS = ("sdpa", "eager")


def block_causal_mask(position_ids: torch.Tensor, attn_implementation: str) -> torch.Tensor:
    """(1, 1, N, N) causal mask that never crosses an example of a flat row (positions restart
    at 0 per example): bool (True = attend) for sdpa; additive float32 (0 or the float32
    minimum, as transformers' eager mask) for eager."""
    pos = position_ids.reshape(-1)
    seq = torch.cumsum(pos == 0, 0)
    n = pos.shape[0]
    idx = torch.arange(n, device=pos.device)
    allowed = (seq[:, None] == seq[None, :]) & (idx[None, :] <= idx[:, None])
    allowed = allowed[None, None]
    if attn_implementation == "sdpa":
        return allowed
    zero = torch.zeros((), dtype=torch.float32, device=pos.device)
    return torch.where(allowed, zero, torch.finfo(torch.float32).min)


@dataclass
class PaddingFree:
    """How a padding-free forward keeps attention inside each example of the row.

    ``how``: ``segments`` (sdpa models: attention runs once per example of the row, no mask,
    :mod:`forgetkit.train.segment_attention`; the boundaries go in as ``fk_segments``);
    ``position_ids`` (transformers detects the resets and builds the block-diagonal
    causal mask itself: sdpa, eager, flex); ``varlen`` (flash attention: the example boundaries
    go in as ``cu_seq_lens_q/k`` and ``max_length_q/k``, flash_attn_varlen_func; no mask);
    ``mask`` (an explicit 4D :func:`block_causal_mask`, for a model that ignores the resets).
    Every form passes ``use_cache=False``: with a cache transformers skips the packed-sequence
    detection (and training needs none).
    """

    how: str
    attn_implementation: str

    def inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The model's keyword arguments for a batch of :func:`collate_flat`."""
        kw: dict[str, Any] = {"input_ids": batch["input_ids"],
                              "position_ids": batch["position_ids"], "use_cache": False}
        if self.how == "segments":
            kw["fk_segments"] = tuple(int(x) for x in batch["cu_seq_lens"].tolist())
        elif self.how == "varlen":
            cu, m = batch["cu_seq_lens"], int(batch["max_length"])
            kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=m, max_length_k=m)
        elif self.how == "mask":
            kw["attention_mask"] = block_causal_mask(batch["position_ids"],
                                                     self.attn_implementation)
        return kw


def model_inputs(batch: dict[str, Any], pf: PaddingFree | None,
                 keep: torch.Tensor | None = None) -> dict[str, Any]:
    """The forward's keyword arguments: padded (``input_ids``, ``attention_mask``) or, with
    ``pf``, the padding-free ones (:meth:`PaddingFree.inputs`); with ``keep`` (a boolean mask
    of the batch's positions), ``logits_to_keep=keep``: logits at those positions only."""
    kw = ({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
          if pf is None else pf.inputs(batch))
    if keep is not None:
        kw["logits_to_keep"] = keep
    return kw


def target_mask(batch: dict[str, Any], on: bool) -> torch.Tensor | None:
    """The positions whose logits the loss needs (a target label), when ``on``."""
    return batch["labels"] != IGNORE_INDEX if on else None


def probe_eps(backend: Backend, model: torch.nn.Module) -> float:
    """Machine epsilon of the dtype a probe's forward computes in: the parameters' dtype, or
    the 16-bit type of ``training.mixed_precision`` when that is coarser (autocast and FSDP2's
    mixed-precision policy run the matmuls in 16 bits over fp32 weights, so two shapes of the
    same rows may round differently by a 16-bit ulp, e.g. cuBLAS picking another kernel)."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    eps = torch.finfo(dtype).eps
    mp = getattr(getattr(backend, "tcfg", None), "mixed_precision", "no")
    compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mp)
    return max(eps, torch.finfo(compute).eps) if compute is not None else eps


@torch.no_grad()
def target_logits_setup(backend: Backend, pf: PaddingFree | None, pad_id: int) -> bool:
    """Whether this model computes logits at target positions only (``training.logits:
    targets``), proved before training: the forward must take ``logits_to_keep`` as a boolean
    (B, T) mask (transformers >= 5: ``slice_logits_to_keep``) and return, for a probe batch of
    two examples of different lengths (padded, or one flat row with ``pf``), logits of shape
    (K, V) equal to the full forward's at those K positions within sqrt(eps) x the logit scale,
    eps of the compute dtype (:func:`probe_eps`: the same hidden states through a smaller
    matmul: rounding only). Any other answer (the
    keyword refused, another shape, other values) falls back to every position, logged. All
    ranks run it (sharded models need every rank in every forward)."""
    model = backend.unwrap()
    config = getattr(model, "config", None)
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    g = torch.Generator().manual_seed(0)
    hi = max(2, min(vocab, 1000))
    seqs = [torch.randint(0, hi, (n,), generator=g).tolist() for n in (7, 4)]
    exs = [Example(x, [IGNORE_INDEX] * 2 + x[3:] + [IGNORE_INDEX]) for x in seqs]
    batch = _to(collate_flat(exs) if pf is not None else collate(exs, pad_id, 1), backend.device)
    keep = target_mask(batch, True)
    was_training = backend.model.training
    backend.model.eval()
    why = ""
    try:
        with backend.autocast():
            full = backend.forward(**model_inputs(batch, pf)).logits
            kept = backend.forward(**model_inputs(batch, pf, keep)).logits
        want = full[keep].float()
        if tuple(kept.shape) != tuple(want.shape):
            why = f"logits of shape {tuple(kept.shape)} for {tuple(want.shape)}"
        else:
            scale = max(1.0, float(want.abs().max()))
            diff = float((kept.float() - want).abs().max())
            if diff > math.sqrt(probe_eps(backend, model)) * scale:
                why = f"logits differ by {diff:.2e} from the full forward's"
    except (TypeError, ValueError, RuntimeError, IndexError) as e:
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
    finally:
        if was_training:
            backend.model.train()
    if why:
        log.info("training.logits 'targets': this model's forward does not keep target "
                 "positions only (%s); logits are computed at every position", why)
        return False
    log.info("logits at target positions only (training.logits: targets)")
    return True


@torch.no_grad()
def _boundary_probe(forward: Callable[..., Any], pf: PaddingFree, vocab: int,
                    device: torch.device) -> tuple[float, float, float]:
    """(change of example B's logits when example A before it in the row changes, difference
    between B in the row and B alone, scale of B's logits)."""
    g = torch.Generator().manual_seed(0)
    hi = max(2, min(vocab, 1000))
    a, a2, b = (torch.randint(0, hi, (n,), generator=g).tolist() for n in (5, 5, 6))
    ign = [IGNORE_INDEX]

    def logits(*seqs: list[int]) -> torch.Tensor:
        batch = _to(collate_flat([Example(x, ign * len(x)) for x in seqs]), device)
        return forward(**pf.inputs(batch)).logits[0, -len(b):].float()

    row, row2, alone = logits(a, b), logits(a2, b), logits(b)
    return (float((row - row2).abs().max()), float((row - alone).abs().max()),
            max(1.0, float(row.abs().max())))


def padding_free_setup(backend: Backend) -> PaddingFree:
    """Pick how the padding-free forward keeps example boundaries for this model, and prove it.

    Candidates by attention implementation (``model.config._attn_implementation``): flash
    kernels take ``varlen`` then ``position_ids``; sdpa takes ``segments`` (one SDPA per example:
    the model's implementation is switched to :data:`~forgetkit.train.segment_attention.
    SEGMENT_ATTN`, which is sdpa itself for padded batches; switched back if its probe fails),
    then ``position_ids`` (transformers' packed-sequence detection: a block-diagonal mask over the
    whole row, whose attention FLOPs grow with the row's length) and an explicit ``mask``; eager
    takes ``position_ids`` then ``mask``; anything else ``position_ids``. Each is
    probed in eval mode without gradients (all ranks run it: sharded models need every rank):
    two rows ``[A, B]`` and ``[A', B]`` must give example B the same logits (within 4 float
    eps of the compute dtype times the logit scale, :func:`probe_eps`: the model's dtype, or
    bf16/fp16 under mixed precision; masked keys contribute exact zeros, so a
    kernel that keeps boundaries differs by rounding at most; attention across the boundary
    changes B by O(1): 0.44-1.6 x scale measured on random-init Llamas, against 0.031 for
    bf16's 4 eps), and B in the row must match B alone within sqrt(eps) x scale (positions
    restart; other shapes round differently). The first candidate that passes is used.

    Raises:
        ConfigError: no candidate keeps the boundaries (the message names the implementation).
    """
    model = backend.unwrap()
    config = getattr(model, "config", None)
    impl = str(getattr(config, "_attn_implementation", None) or "eager")
    vocab = int(getattr(config, "vocab_size", 2) or 2)
    if "flash" in impl:
        candidates = ["varlen", "position_ids"]
    elif impl == "sdpa" and not getattr(config, "attention_chunk_size", None):
        candidates = ["segments", "position_ids", "mask"]
    elif impl in _MASK_IMPLS:
        candidates = ["position_ids", "mask"]
    else:
        candidates = ["position_ids"]
    eps = probe_eps(backend, model)  # the compute dtype's (bf16 under bf16 autocast)
    was_training = backend.model.training
    backend.model.eval()
    tried = []
    try:
        for how in candidates:
            pf = PaddingFree(how, impl)
            if how == "segments":
                config._attn_implementation = segment_attention.register()
            try:
                with backend.autocast():
                    cross, alone, scale = _boundary_probe(backend.forward, pf, vocab,
                                                          backend.device)
            except (TypeError, ValueError, RuntimeError) as e:
                tried.append(f"{how}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                cross = alone = scale = None
            if cross is not None and cross <= 4 * eps * scale and alone <= math.sqrt(eps) * scale:
                log.info("padding-free batches: attention %s, boundaries kept by %s", impl, how)
                return pf
            if cross is not None:
                tried.append(f"{how}: logits change by {cross:.2e} across the boundary, "
                             f"{alone:.2e} against the example alone")
            if how == "segments":
                config._attn_implementation = impl
    finally:
        if was_training:
            backend.model.train()
    raise ConfigError(
        f"data.batching 'padding_free': the model's attention ({impl}) does not keep the "
        f"example boundaries of a flat row ({'; '.join(tried)}); set model.attn_implementation "
        "to sdpa or eager, or use data.batching: length_grouped")


@torch.no_grad()
def validation_loss(backend: Backend, examples: Sequence[Example], micro_batch_size: int,
                    pad_id: int, pad_multiple: int, pf: PaddingFree | None = None,
                    targets_only: bool = False) -> float | None:
    """Mean loss per target token over ``examples``, split across ranks (all ranks call it).

    Batches of ``micro_batch_size`` examples, longest first; ``pf`` (padding-free runs): each
    batch is one flat row (:func:`collate_flat`), the same examples, sums and count."""
    if not examples:
        return None
    model = backend.model
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    batches = [order[i:i + micro_batch_size] for i in range(0, len(order), micro_batch_size)]
    n_iter = math.ceil(len(batches) / backend.world_size)
    total = torch.zeros(2, dtype=torch.float64, device=backend.device)
    for k in range(n_iter):
        b = k * backend.world_size + backend.rank
        real = b < len(batches)  # sharded models need every rank in every forward
        exs = [examples[i] for i in batches[b if real else 0]]
        batch = _to(collate_flat(exs) if pf is not None else collate(exs, pad_id, pad_multiple),
                    backend.device)
        keep = target_mask(batch, targets_only)
        with backend.autocast():
            out = backend.forward(**model_inputs(batch, pf, keep))
        if real:
            ce = target_losses(out, batch["labels"], keep)
            total[0] += ce.sum().double()
            total[1] += (batch["labels"] != IGNORE_INDEX).sum()
    backend.all_reduce_sum(total)
    if was_training:
        model.train()
    return float(total[0] / total[1])


# ----------------------------------------------------------------------------- checkpoints
#
# A checkpoint is ``checkpoints/step-N/``: the backend's model + optimizer state (DCP / DeepSpeed),
# per rank ``rng-rank{r}.json|.safetensors`` and ``regularizers-rank{r}.json|.safetensors`` (no
# pickle anywhere: JSON for plain values, safetensors for tensors), ``trainer_state.json``,
# ``identity.json`` (the run it belongs to, forgetkit.identity) and ``COMPLETE``: written last
# by rank 0, once every rank has finished, with the size and sha256 of every other file. Resume
# uses the newest checkpoint whose manifest verifies and whose identity equals the requested run's.

CHECKPOINT_FORMAT = 2
MANIFEST = "COMPLETE"
IDENTITY_FILE = "identity.json"


def _split_tensors(obj: Any, key: str, tensors: dict[str, torch.Tensor], where: str) -> Any:
    """JSON-able copy of ``obj`` with every tensor moved into ``tensors`` (a safetensors file)."""
    if isinstance(obj, torch.Tensor):
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if isinstance(obj, dict):
        if not all(isinstance(k, str) for k in obj):
            raise TypeError(f"{where}: state keys must be strings, got {list(obj)[:5]}")
        return {k: _split_tensors(v, f"{key}.{k}", tensors, where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_split_tensors(v, f"{key}.{i}", tensors, where) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{where}: state holds a {type(obj).__name__}; a checkpointed state must be "
                    "plain values (dict/list/str/number/bool/None) or tensors")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        return {k: _join_tensors(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_plain(stem: Path, obj: Any, where: str) -> None:
    """``stem.json`` (+ ``stem.safetensors`` when ``obj`` holds tensors): no pickle."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    doc = _split_tensors(obj, "t", tensors, where)
    stem.with_suffix(".json").write_text(json.dumps(doc))
    if tensors:
        save_file(tensors, str(stem.with_suffix(".safetensors")))


def load_plain(stem: Path) -> Any:
    from safetensors.torch import load_file

    st = stem.with_suffix(".safetensors")
    tensors = load_file(str(st)) if st.exists() else {}
    return _join_tensors(json.loads(stem.with_suffix(".json").read_text()), tensors)


def _rng_state() -> dict[str, Any]:
    """Python, numpy and torch (CPU, CUDA) generator states as plain values and uint8 tensors."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st: dict[str, Any] = {"python": [version, list(internal), gauss],
                          "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
                          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = list(torch.cuda.get_rng_state_all())
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = st["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _files(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file()
                  and p.name != MANIFEST)


def write_manifest(d: Path, step: int, identity_digest: str | None) -> None:
    """The COMPLETE marker: format, step, identity digest and size + sha256 of every file."""
    files = {f: {"size": (d / f).stat().st_size, "sha256": sha256_file(d / f)} for f in _files(d)}
    doc = {"format": CHECKPOINT_FORMAT, "step": step, "identity_digest": identity_digest,
           "files": files}
    (d / MANIFEST).write_text(json.dumps(doc, indent=1))


def _read_manifest(d: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads((d / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and "files" in doc else None


def checkpoint_problem(d: Path) -> str | None:
    """Why checkpoint ``d`` cannot be resumed from (naming the file), or None if it is intact.

    Raises:
        CheckpointMismatch: an old-format checkpoint (pickled ``*.pt`` states, which forgetkit
            no longer loads: a crafted pickle runs code).
    """
    if not (d / MANIFEST).exists():
        return f"{d / MANIFEST} is missing (the write did not finish)"
    doc = _read_manifest(d)
    if doc is None:
        pickles = sorted(p.name for p in d.glob("*.pt"))
        if pickles:
            raise CheckpointMismatch(
                f"checkpoint {d} was written by an older forgetkit ({', '.join(pickles)} are "
                "pickles, which are never loaded: a crafted one would run code); delete "
                f"{d.parent} or set training.resume=false to train from scratch")
        return f"{d / MANIFEST} is not a valid checkpoint manifest"
    if doc.get("format") != CHECKPOINT_FORMAT:
        return f"{d / MANIFEST}: checkpoint format {doc.get('format')!r}, expected " \
               f"{CHECKPOINT_FORMAT}"
    listed = doc["files"]
    for f in _files(d):
        if f not in listed:
            return f"{d / f} is not in the checkpoint's manifest (added after it was written)"
    for f, meta in listed.items():
        p = d / f
        if not p.is_file():
            return f"{p} is missing"
        size = p.stat().st_size
        if size != meta["size"]:
            return f"{p} has {size} bytes, the manifest says {meta['size']} (truncated?)"
        if sha256_file(p) != meta["sha256"]:
            return f"{p}: sha256 differs from the manifest (the file is damaged)"
    return None


def _step_dirs(ckpt_root: Path) -> list[Path]:
    return sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.suffix != ".tmp")


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    """The newest *intact* checkpoint under ``ckpt_root``; damaged ones are skipped with a
    warning that names the file (a truncated shard, a missing file, a checksum mismatch)."""
    if not ckpt_root.is_dir():
        return None
    for d in reversed(_step_dirs(ckpt_root)):
        problem = checkpoint_problem(d)
        if problem is None:
            return d
        log.warning("checkpoint %s is skipped: %s", d.name, problem)
    return None


def resume_checkpoint(ckpt_root: Path, identity: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from, or None (train from scratch, said in a warning if
    checkpoints exist). Raises CheckpointMismatch if the newest intact one belongs to another
    run (a changed config or data file)."""
    ckpt = latest_checkpoint(ckpt_root)
    if ckpt is None:
        if ckpt_root.is_dir() and _step_dirs(ckpt_root):
            log.warning("no intact checkpoint in %s: training from scratch", ckpt_root)
        return None
    try:
        old = fill_added_keys(json.loads((ckpt / IDENTITY_FILE).read_text()), identity)
    except (OSError, ValueError, AttributeError):
        old = {}
    diff = identity_diff(old, identity)
    if diff:
        raise CheckpointMismatch(format_mismatch(
            f"checkpoint {ckpt}", diff,
            "Set training.resume=false (or delete the checkpoints directory "
            f"{ckpt_root}) to train this config from scratch, or use a new output.dir"))
    return ckpt


def _prune(ckpt_root: Path, keep: int, step: int, digest: str | None) -> None:
    """Keep the newest ``keep`` checkpoints of this run up to ``step``; remove the rest:
    older ones, stale ones of another identity or beyond this step (superseded by the one just
    written), damaged ones and leftover ``.tmp`` directories of killed writes."""
    mine = []
    for d in ckpt_root.glob("step-*"):
        doc = _read_manifest(d) if d.suffix != ".tmp" else None
        if doc is not None and doc.get("identity_digest") == digest and doc.get("step", 0) <= step:
            mine.append((doc["step"], d))
        else:
            shutil.rmtree(d, ignore_errors=True)
    for _, d in sorted(mine)[:-keep]:
        shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(backend: Backend, regs: Sequence[Regularizer], ckpt_root: Path, step: int,
                    counters: dict[str, Any], keep: int,
                    identity: dict[str, Any] | None = None) -> Path:
    """Model + optimizer (sharded where the model is) + regularizers + RNG + data position.

    Written into ``step-N.tmp`` (removed if the write fails), the manifest written by rank 0
    once every rank has finished, then renamed: a kill mid-write never leaves a checkpoint that
    resume would pick up. ``identity`` (rank 0) is the run's training identity.
    """
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f"step-{step:08d}.tmp"
    with _writing(ckpt_root, tmp):
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        backend.barrier()
        backend.save_training_state(tmp)
        save_plain(tmp / f"rng-rank{backend.rank}", _rng_state(), "rng state")
        save_plain(tmp / f"regularizers-rank{backend.rank}",
                   {r.name: r.state_dict() for r in regs}, "regularizer state_dict")
        backend.barrier()
        if backend.is_main:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **counters}))
            digest = None
            if identity is not None:
                (tmp / IDENTITY_FILE).write_text(json.dumps(identity, indent=1, default=str))
                digest = identity_digest(identity)
            write_manifest(tmp, step, digest)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _prune(ckpt_root, keep, step, digest)
    backend.barrier()
    return final


def load_checkpoint(backend: Backend, regs: Sequence[Regularizer], path: Path) -> dict[str, Any]:
    """Restore a verified checkpoint: training state, RNG, regularizers; the trainer state.

    Raises:
        CheckpointMismatch: a file names Python objects a checkpoint never holds (crafted or
            foreign): refused by the allow-list loaders, never executed.
    """
    try:
        backend.load_training_state(path)
    except pickle.UnpicklingError as e:
        text = str(e)
        # torch's weights_only messages: "Unsupported global: GLOBAL x.y" / "unsupported GLOBAL"
        found = re.search(r"[Uu]nsupported (?:global: )?GLOBAL (\S+)", text)
        what = f"names {found.group(1)}" if found else text.splitlines()[0]
        raise CheckpointMismatch(
            f"checkpoint {path}: a file {what}, which forgetkit never writes: refused, not "
            f"loaded (crafted or foreign); delete {path} to resume from an older checkpoint "
            "or set training.resume=false") from None
    _set_rng_state(load_plain(path / f"rng-rank{backend.rank}"))
    states = load_plain(path / f"regularizers-rank{backend.rank}")
    for r in regs:
        if r.name in states:
            r.load_state_dict(states[r.name])
    return json.loads((path / "trainer_state.json").read_text())


# ----------------------------------------------------------------------------- faults

def _is_enospc(e: BaseException | None) -> bool:
    """An ENOSPC anywhere in the chain (DCP wraps per-rank failures in CheckpointException)."""
    seen = 0
    while e is not None and seen < 20:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        for f in (getattr(e, "failures", None) or {}).values():
            inner = getattr(f, "exc", f)
            if isinstance(inner, BaseException) and _is_enospc(inner):
                return True
        if "No space left on device" in str(e):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def _free_bytes(directory: Path) -> int | None:
    d = directory
    while not d.exists() and d != d.parent:
        d = d.parent
    try:
        return shutil.disk_usage(d).free
    except OSError:
        return None


def _free(directory: Path) -> str:
    free = _free_bytes(directory)
    return f"{free / 2**20:.1f} MiB free" if free is not None else "free space unknown"


# A failed write with less than this left on the disk is a full disk, whatever the exception
# says: torch.save reports ENOSPC as "RuntimeError: unexpected pos ..." (seen on a 2 MiB tmpfs).
NEARLY_FULL_BYTES = 1 << 20


def _interrupt_inside(e: BaseException) -> bool:
    """Whether a Ctrl-C is the root of ``e``: a KeyboardInterrupt in its chain of causes and
    contexts, or in the per-rank failures of torch.distributed.checkpoint's CheckpointException
    (a BaseException that wraps whatever a rank raised -- an interrupt inside ``torch.save``
    even surfaces as a RuntimeError from the zip writer's clean-up, with the interrupt as its
    context)."""
    seen: set[int] = set()
    todo: list[BaseException] = [e]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, KeyboardInterrupt):
            return True
        todo += [c for c in (x.__cause__, x.__context__) if c is not None]
        failures = getattr(x, "failures", None)
        if type(x).__name__ == "CheckpointException" and isinstance(failures, dict):
            for f in failures.values():
                inner = f[0] if isinstance(f, tuple) else f
                if isinstance(inner, BaseException):
                    todo.append(inner)
    return False


@contextlib.contextmanager
def _writing(directory: Path, *tmps: Path) -> Iterator[None]:
    """Remove ``tmps`` if the block fails (or is interrupted); name a full disk as such."""
    try:
        yield
    except BaseException as e:
        full = False
        # (DCP's CheckpointException derives from BaseException, not Exception.)
        if not isinstance(e, (DiskFull, KeyboardInterrupt, SystemExit, GeneratorExit)):
            free = _free_bytes(directory)  # before the clean-up frees space again
            full = _is_enospc(e) or (free is not None and free < NEARLY_FULL_BYTES)
        for t in tmps:
            if t.is_dir():
                shutil.rmtree(t, ignore_errors=True)
            else:
                t.unlink(missing_ok=True)
        if full:
            raise DiskFull(directory, f"{(free or 0) / 2**20:.2f} MiB free when the write "
                           "failed") from e
        raise


def _write_text(path: Path, text: str) -> None:
    """Atomic: ``path.tmp`` then rename; the tmp is removed if the write fails."""
    tmp = path.with_name(path.name + ".tmp")
    with _writing(path.parent, tmp):
        tmp.write_text(text)
        os.replace(tmp, path)


def _rewrite_log(log_path: Path, start_step: int) -> None:
    """Keep the log lines up to the resumed step, and no "final" line (the run appends its own):
    a rerun of an interrupted or finished run never duplicates lines. Torn lines are dropped."""
    keep = []
    for ln in log_path.read_text().splitlines() if log_path.exists() else []:
        try:
            rec = json.loads(ln)
        except ValueError:
            continue
        if isinstance(rec, dict) and not rec.get("final") and rec.get("step", 0) <= start_step:
            keep.append(ln)
    _write_text(log_path, "".join(k + "\n" for k in keep))


def _last_checkpoint_text(step: int | None, ckpt_root: Path) -> str:
    return f"step {step} in {ckpt_root}" if step is not None else "none"


# Collapse: the gradient norm exactly 0, or the logged loss exactly constant, for this many
# consecutive optimizer steps (or the whole run, if shorter). 50 steps: a full fine-tune never
# has an exactly zero gradient even once on real data, and an exactly repeated mean loss over
# different batches means the outputs no longer depend on the input; 50 is long enough that a
# sparse, masked batch cannot trigger it, short enough to catch it early in a long run.
COLLAPSE_STEPS = 50


class CollapseWatch:
    """Detects a collapsed run from values the loop already has at its log points."""

    def __init__(self, total_steps: int) -> None:
        self.need = max(1, min(COLLAPSE_STEPS, total_steps))
        self.loss: float | None = None
        self.loss_from = 0  # first step of the run of equal logged losses
        self.loss_points = 0
        self.found: dict[str, Any] | None = None

    def update(self, done: int, first_step: int, zero_steps: int, loss: float) -> None:
        """``done``: steps finished; ``first_step``: first step (1-based) of this log interval;
        ``zero_steps``: consecutive steps up to ``done`` whose gradient norm was exactly 0."""
        if loss == self.loss:
            self.loss_points += 1
        else:
            self.loss, self.loss_from, self.loss_points = loss, first_step, 1
        if self.found is not None:
            self.found["to_step"] = done
            return
        if zero_steps >= self.need:
            self.found = {"reason": "gradient norm exactly 0", "from_step": done - zero_steps + 1,
                          "to_step": done}
        elif self.loss_points >= 2 and done - self.loss_from + 1 >= self.need:
            self.found = {"reason": f"loss constant at {loss}", "from_step": self.loss_from,
                          "to_step": done}
        if self.found is not None:
            log.warning("training collapsed: %s for %d consecutive steps (from step %d): the "
                        "weights no longer learn; check training.lr, the data's target tokens "
                        "and the regularizers (recorded as 'collapsed' in train_result.json)",
                        self.found["reason"], done - self.found["from_step"] + 1,
                        self.found["from_step"])


# ----------------------------------------------------------------------------- the loop

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def _on_main(backend: Backend, fn: Callable[[], int]) -> int:
    """Run ``fn`` on rank 0 only and give every rank its (integer) answer, or its failure:
    rank 0 re-raises the error, the other ranks stop too instead of waiting in a collective."""
    value, err = 0, None
    if backend.is_main:
        try:
            value = int(fn())
        except Exception as e:
            value, err = -1, e
    t = torch.tensor([value if value >= 0 else 0, 1 if value < 0 else 0], dtype=torch.int64,
                     device=backend.device)
    backend.all_reduce_sum(t)
    if err is not None:
        raise err
    if int(t[1]):
        raise RuntimeError("rank 0 stopped before training (its message says why)")
    return int(t[0])


@dataclass
class _Progress:
    """What an interrupt message needs: steps finished, newest checkpoint step."""

    step: int = 0
    checkpoint: int | None = None


def reg_context(backend: Backend, model: torch.nn.Module, optimizer: torch.optim.Optimizer
                ) -> RegContext:
    """The regularizers' view of this loop: the typed fields of :class:`RegContext`, taken
    from the backend (strategy, ranks, reduction, autocast) and the optimizer (lr per
    parameter). Under DeepSpeed gradients are not left in ``p.grad``."""
    is_ds = isinstance(backend, DeepSpeedBackend)
    return RegContext(model=model, params=backend.local_params, device=backend.device,
                      rank=backend.rank, world_size=backend.world_size,
                      strategy=backend.name,  # type: ignore[arg-type]
                      zero_stage=backend.dcfg.zero_stage if is_ds else None,
                      grads_in_params=not is_ds, all_reduce_sum=backend.all_reduce_sum,
                      autocast=backend.autocast, param_lr=optimizer_lr_lookup(optimizer))


def train(cfg: Config, regularizers: Sequence[Regularizer] | None = None, *,
          progress: bool = True) -> TrainResult:
    """Fully fine-tune ``cfg.model`` on ``cfg.data``; see the module docstring for the numerics.

    ``regularizers``: None (default) builds ``cfg.regularizers`` with the batches the data layer
    built (:func:`forgetkit.regularizers.build_regularizers`); a sequence (API and tests) is used
    as given, in place of the config's. Replay is data: ``cfg.data.replay``.

    Writes into ``cfg.output_dir()``: ``config.yaml``, ``train_log.jsonl``, ``checkpoints/``,
    (``output.save_model``) ``model/``, a standard HF checkpoint, and, only on success,
    ``train_result.json``; the log records also go to the experiment trackers named in
    ``output.trackers`` (``tensorboard`` writes to ``<output dir>/tensorboard``). Rank 0 holds ``dir_lock(out_dir)`` throughout: one writer.

    Raises:
        LockHeld: another process trains into the same output directory.
        CheckpointMismatch: the checkpoint to resume belongs to another config (nothing written).
        NonFiniteLoss: NaN/inf loss or gradient.
        TrainingInterrupted: Ctrl-C (a KeyboardInterrupt), with the step and last checkpoint.
        DiskFull: no space left while writing (temporary files removed).
    """
    check_freeze(cfg)  # config-only (training.freeze): before the lock or anything is written
    backend = make_backend(cfg.distributed, cfg.training)
    out_dir = cfg.output_dir()
    status = _Progress()
    with contextlib.ExitStack() as stack:
        _on_main(backend, lambda: bool(stack.enter_context(
            dir_lock(out_dir, "training output"))))
        try:
            return _train(cfg, backend, regularizers, progress, status, stack)
        except TrainingInterrupted:
            raise
        except KeyboardInterrupt:
            raise TrainingInterrupted(status.step, status.checkpoint) from None
        except BaseException as e:
            if _interrupt_inside(e):  # Ctrl-C while DCP saved/loaded: it wraps the interrupt
                raise TrainingInterrupted(status.step, status.checkpoint) from None
            raise


def _train(cfg: Config, backend: Backend, regularizers: Sequence[Regularizer] | None,
           progress: bool, status: _Progress, stack: contextlib.ExitStack) -> TrainResult:
    t = cfg.training
    out_dir = cfg.output_dir()
    ckpt_root = out_dir / "checkpoints"
    check_trackers(cfg.output.trackers)  # every rank, before anything is loaded
    check_lora_config(cfg)  # LoRA combinations that cannot work (forgetkit.train.lora)
    seed_everything(cfg.seed)

    # -- model and data (identical on every rank: same seed, same files)
    model, tokenizer = load_model(cfg.model)
    # training.freeze: requires_grad=False before sharding and the optimizer; model-dependent
    # problems raise ConfigError here, before anything is written (nothing frozen: no change)
    freeze = apply_freeze(model, cfg)
    lora_info = None  # training.lora: peft adapters train, the base is frozen (train/lora.py)
    if t.lora is not None:
        model, lora_info = apply_lora(model, t.lora)
    from forgetkit.memory import current_rss_bytes

    post_load_rss = current_rss_bytes()  # the memory report's baseline (CPU)
    data = build_data(cfg, tokenizer)
    if regularizers is None:
        regularizers = build_regularizers(cfg, data, tokenizer.pad_token_id)
    plan = StepPlan(data, cfg, backend.world_size)
    log.info("data: %d train / %d validation examples (+%d replay pool, ratio %.3f); "
             "%d steps/epoch, %d steps, global batch %d", len(data.train), len(data.validation),
             len(data.replay), data.replay_ratio, plan.steps_per_epoch, plan.total_steps,
             plan.global_batch)

    # -- which checkpoint to resume (rank 0 verifies manifests and identity; nothing written yet)
    # runtime facts a checkpoint depends on beyond the config: the processes (global batch)
    # and the precision training.mixed_precision 'auto' resolved to on this machine
    identity = (training_identity(cfg, world_size=backend.world_size, strategy=backend.name,
                                  mixed_precision=backend.tcfg.mixed_precision)
                if backend.is_main else None)

    def pick() -> int:  # the checkpoint's step (>= 1), 0 for none
        ckpt = resume_checkpoint(ckpt_root, identity) if t.resume else None
        return int(ckpt.name.split("-")[1]) if ckpt is not None else 0

    picked = _on_main(backend, pick)
    last = ckpt_root / f"step-{picked:08d}" if picked else None

    # -- place/shard, then regularizers snapshot theta0 from the (local) parameters
    n_trainable, n_params = count_parameters(model)  # unsharded, after LoRA/freeze: exact
    model = backend.shard(model)
    model.train()
    backend.model = model
    named = list(backend.local_params())
    optimizer = build_optimizer(param_groups(named, t), t, backend.device)
    ctx = reg_context(backend, model, optimizer)
    for reg in regularizers:
        reg.prepare(ctx)
    if t.clip_scope == "loss" and t.max_grad_norm:
        inside = [r.name for r in regularizers if getattr(r, "mode", "loss") == "loss"]
        if inside:
            log.warning("training.clip_scope 'loss': %s add their penalty through the loss "
                        "(autograd), so the gradient clip includes it", ", ".join(inside))
    # The loop starts from zero gradients, whatever ran before it (a regularizer's prepare, a
    # caller's own forward/backward): the first optimizer step sees only its own batch.
    for p in model.parameters():
        p.grad = None
    model, optimizer = backend.wrap(model, optimizer)
    ctx.model = model
    # Padding-free batches: how this model keeps example boundaries, probed (nothing written yet)
    pf = padding_free_setup(backend) if cfg.data.batching == "padding_free" else None
    # Logits at target positions only (training.logits: targets), where the model proves it can
    targets_only = (t.logits == "targets"
                    and target_logits_setup(backend, pf, tokenizer.pad_token_id))
    # the most logit positions of any micro-batch, for the memory estimate: its examples' target
    # counts at most (the largest ones of the stream), else every position
    logit_bound = (sum(sorted((x.n_targets for x in (*data.train, *data.replay)),
                              reverse=True)[:t.micro_batch_size])
                   if targets_only else cfg.data.max_length * t.micro_batch_size)

    # -- resume; only now, validated, does the output describe this run
    start_step, counters, resumed_from = 0, {"tokens": 0, "target_tokens": 0, "time_s": 0.0}, None
    log_path = out_dir / "train_log.jsonl"
    if last is not None:
        state = load_checkpoint(backend, regularizers, last)
        start_step = resumed_from = status.step = status.checkpoint = state["step"]
        counters = {k: state[k] for k in counters}
        log.info("resumed from %s (step %d of %d)", last, start_step, plan.total_steps)
    if backend.is_main:
        _write_text(out_dir / "config.yaml", dump_config(cfg))
        _rewrite_log(log_path, start_step)  # drop log lines past the checkpoint
    backend.barrier()
    # Experiment trackers (rank 0; train_log.jsonl is always written): closed on every exit.
    trackers = Trackers([], cfg.name, out_dir, {}, is_main=False)  # off on other ranks

    def start_trackers() -> int:  # rank 0; a failure reaches every rank (_on_main)
        nonlocal trackers
        trackers = Trackers(cfg.output.trackers, cfg.name, out_dir, config_to_dict(cfg),
                            is_main=True, start_step=start_step,
                            run_name=f"{cfg.name}/{out_dir.name}")
        stack.callback(trackers.finish)
        return 1

    if cfg.output.trackers:
        _on_main(backend, start_trackers)

    pad_id = tokenizer.pad_token_id
    bar = None
    if progress and backend.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=plan.total_steps, initial=start_step, desc="train", unit="step",
                   dynamic_ncols=True)
    n_micro = t.gradient_accumulation_steps
    has_replay = len(data.replay) > 0  # known on the host: no per-step check needed
    dev = backend.device
    # Running sums kept on device between log points: no host sync per micro-step.
    acc = torch.zeros(4, dtype=torch.float64, device=dev)  # loss sum, targets, replay sum, n
    reg_acc: dict[str, torch.Tensor] = {}  # regularizer values (global, per step), summed
    steps_since_log = 0
    nonfinite = torch.zeros((), dtype=torch.bool, device=dev)
    zero_run = torch.zeros((), dtype=torch.int64, device=dev)  # consecutive steps, grad norm 0
    collapse = CollapseWatch(plan.total_steps)
    t_last, tok_last = time.perf_counter(), counters["tokens"]
    t_start = time.perf_counter() - counters["time_s"]
    val_loss: float | None = None

    for step in range(start_step, plan.total_steps):
        micro, n_targets, n_tokens = plan.step(step, backend.rank)
        scale = backend.world_size / n_targets  # see the module docstring
        for a, examples in enumerate(micro):
            batch = _to(collate_flat(examples) if pf is not None else
                        collate(examples, pad_id, cfg.data.pad_to_multiple_of), dev)
            keep = target_mask(batch, targets_only)  # (B, T) bool, or None: every position
            with backend.sync_context(sync=a == n_micro - 1):
                with backend.autocast():
                    out = backend.forward(**model_inputs(batch, pf, keep))
                # (B, T) fp32 (padding-free (1, N)); with keep (K,), the target positions only
                ce = target_losses(out, batch["labels"], keep)
                task_sum = ce.sum()
                loss = task_sum * scale
                for reg in regularizers:  # penalty terms that need a forward pass (e.g. KL)
                    p = reg.penalty(ctx, batch)
                    if p is not None:
                        loss = loss + p / n_micro
                        reg_acc[reg.name] = reg_acc.get(reg.name, 0) + p.detach() / n_micro
                backend.backward(loss)
            with torch.no_grad():
                targets = batch["labels"] != IGNORE_INDEX
                acc[0] += task_sum.detach().double()
                acc[1] += targets.sum()
                if has_replay:  # masked sums, not `if rep.any()`: no host sync per micro-step
                    rep = batch["source"] == 1  # (B,) per example; padding-free (1, N)
                    rep = rep[:, None] if rep.dim() == 1 else rep  # (B, 1): replay examples
                    if keep is not None:  # ce is (K,): the replay flag of each kept position
                        rep = rep.expand_as(keep)[keep]
                    acc[2] += (ce.detach() * rep).sum().double()
                    acc[3] += (targets & rep).sum() if keep is None else rep.sum()
        # Gradients are now reduced across ranks. Gradient-space regularizer terms (in place),
        # clipped together with the loss gradient (clip_scope "all") or added after the clip.
        if t.clip_scope == "loss":
            grad_norm = backend.clip_grad_norm(t.max_grad_norm)
        for reg in regularizers:
            v = reg.grad_term(ctx)
            if v is not None:
                reg_acc[reg.name] = reg_acc.get(reg.name, 0) + v.detach()
        if t.clip_scope == "all":
            grad_norm = backend.clip_grad_norm(t.max_grad_norm)
        lr = set_lr(optimizer, t.lr, lr_at(t, plan.total_steps, step))
        backend.optimizer_step()
        if isinstance(backend, DeepSpeedBackend):
            grad_norm = backend.grad_norm_after_step()  # None: the engine computed none
        for reg in regularizers:
            v = reg.after_step(ctx, lr)
            if v is not None:
                reg_acc[reg.name] = reg_acc.get(reg.name, 0) + v.detach()
        if grad_norm is not None:  # on device: no host sync
            gn = grad_norm.to(dev)
            nonfinite |= ~torch.isfinite(gn)
            zero_run = torch.where(gn == 0, zero_run + 1, torch.zeros_like(zero_run))
        counters["tokens"] += n_tokens
        counters["target_tokens"] += n_targets
        steps_since_log += 1
        done = status.step = step + 1

        # -- log (one host sync per log point)
        if done % t.log_every == 0 or done == plan.total_steps:
            backend.all_reduce_sum(acc)
            vals = acc.tolist()
            if nonfinite.item() or not math.isfinite(vals[0]):
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {done}; stopping. Last good "
                    f"checkpoint: {_last_checkpoint_text(status.checkpoint, ckpt_root)}. Lower "
                    "training.lr or check the data, then rerun with training.resume=false or "
                    "a new output.dir")
            now = time.perf_counter()
            rec: dict[str, Any] = {
                "step": done, "epoch": step / plan.steps_per_epoch,
                "loss": vals[0] / max(vals[1], 1.0), "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens": counters["tokens"],
                "target_tokens": counters["target_tokens"],
                "tokens_per_s": (counters["tokens"] - tok_last) / max(now - t_last, 1e-9),
                "elapsed_s": now - t_start,
            }
            collapse.update(done, done - steps_since_log + 1, int(zero_run), rec["loss"])
            if vals[3] > 0:
                rec["loss/replay"] = vals[2] / vals[3]
                rec["loss/task"] = (vals[0] - vals[2]) / max(vals[1] - vals[3], 1.0)
            for name, v in reg_acc.items():  # mean per step since the last log point
                rec[f"reg/{name}"] = float(v) / steps_since_log
            if bar is not None:
                bar.set_postfix(loss=f"{rec['loss']:.4f}", lr=f"{lr:.2e}")
            acc.zero_()
            reg_acc, steps_since_log = {}, 0
            t_last, tok_last = now, counters["tokens"]
            if t.eval_every and done % t.eval_every == 0 and done != plan.total_steps:
                val_loss = validation_loss(backend, data.validation, t.micro_batch_size, pad_id,
                                           cfg.data.pad_to_multiple_of, pf, targets_only)
                rec["val_loss"] = val_loss
            if backend.is_main:
                with _writing(out_dir), log_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
                trackers.log(rec, step=done)
        elif t.eval_every and done % t.eval_every == 0 and done != plan.total_steps:
            val_loss = validation_loss(backend, data.validation, t.micro_batch_size, pad_id,
                                       cfg.data.pad_to_multiple_of, pf, targets_only)
        if bar is not None:
            bar.update(1)
        counters["time_s"] = time.perf_counter() - t_start
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done != plan.total_steps:
            if nonfinite.item():
                raise NonFiniteLoss(
                    f"non-finite gradient before step {done}'s checkpoint; stopping. Last good "
                    f"checkpoint: {_last_checkpoint_text(status.checkpoint, ckpt_root)}. Lower "
                    "training.lr or check the data, then rerun with training.resume=false or "
                    "a new output.dir")
            save_checkpoint(backend, regularizers, ckpt_root, done, counters, t.keep_checkpoints,
                            identity)
            status.checkpoint = done

    if bar is not None:
        bar.close()
    # -- the end: validation, final checkpoint, HF model
    val_loss = validation_loss(backend, data.validation, t.micro_batch_size, pad_id,
                               cfg.data.pad_to_multiple_of, pf, targets_only)
    if backend.is_main:
        with _writing(out_dir), log_path.open("a") as fh:
            fh.write(json.dumps({"step": plan.total_steps, "final": True,
                                 "val_loss": val_loss}) + "\n")
        trackers.log({"val_loss": val_loss}, step=plan.total_steps)
    if plan.total_steps > start_step or last is None:
        save_checkpoint(backend, regularizers, ckpt_root, plan.total_steps, counters,
                        t.keep_checkpoints, identity)
        status.checkpoint = plan.total_steps
    model_dir = None
    # LoRA: the memory report reads the peft model, which saving merges in place: read it first
    mem = memory_report(cfg, backend, post_load_rss, n_trainable, logit_bound) if lora_info and backend.is_main else None
    if cfg.output.save_model and lora_info is not None:  # rank 0 merges; single/DDP only
        model_dir = out_dir / "model"
        if backend.is_main:
            tmp, atmp = out_dir / "model.tmp", out_dir / "adapter.tmp"
            with _writing(out_dir, tmp, atmp):
                for d in (tmp, atmp):
                    shutil.rmtree(d, ignore_errors=True)
                save_merged_lora(backend.unwrap(), tokenizer, tmp, adapter_dir=atmp)
                for d, final in ((atmp, out_dir / "adapter"), (tmp, model_dir)):
                    shutil.rmtree(final, ignore_errors=True)
                    os.replace(d, final)
        backend.barrier()
    elif cfg.output.save_model:
        sd = backend.full_state_dict()  # collective under FSDP / ZeRO-3
        model_dir = out_dir / "model"
        if backend.is_main:
            tmp = out_dir / "model.tmp"
            with _writing(out_dir, tmp):
                shutil.rmtree(tmp, ignore_errors=True)
                save_hf_checkpoint(backend.unwrap(), tokenizer, tmp, state_dict=sd)
                shutil.rmtree(model_dir, ignore_errors=True)
                os.replace(tmp, model_dir)
        backend.barrier()
    result = TrainResult(out_dir, model_dir, plan.total_steps, counters["tokens"],
                         counters["target_tokens"], counters["time_s"], val_loss, resumed_from,
                         collapse.found is not None, collapse.found)
    if backend.is_main:
        info = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
        info.update(world_size=backend.world_size, strategy=backend.name,
                    mixed_precision=backend.tcfg.mixed_precision,
                    n_train_examples=len(data.train), n_validation_examples=len(data.validation),
                    n_replay_pool=len(data.replay), global_batch=plan.global_batch,
                    n_replay_trained=plan.replay_trained(plan.total_steps)[0],
                    identity_digest=identity_digest(identity) if identity else None,
                    trainable_params=n_trainable, total_params=n_params)
        if freeze_active(cfg):
            info["freeze"] = freeze.to_dict()
        info.update(mem if mem is not None else memory_report(cfg, backend, post_load_rss, n_trainable, logit_bound))
        if lora_info is not None:
            info["lora"] = lora_info
        _write_text(out_dir / "train_result.json", json.dumps(info, indent=1))
    log.info("trained %d steps, %s tokens (%s targets) in %.1fs; validation loss %s",
             plan.total_steps, human_count(counters["tokens"]),
             human_count(counters["target_tokens"]), counters["time_s"],
             f"{val_loss:.4f}" if val_loss is not None else "n/a")
    return result
