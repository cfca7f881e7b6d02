"""The one training loop. Read it top to bottom:

config -> backend (process group, device) -> model -> data -> optimizer -> regularizers.prepare
-> wrap -> resume -> for each optimizer step: [micro-steps: forward, token-normalised loss +
penalties, backward] -> gradient terms -> clip -> step -> lr -> log / validate / checkpoint
-> final checkpoint and HF model. (``training.clip_scope: loss`` swaps the two middle stages:
clip the loss gradient, then add the gradient terms, so a stiff EWC term cannot set the clip
factor of every weight.)

Loss normalisation (the subtle part). For one optimizer step with global batch G (all
micro-batches on all ranks), the loss is the mean over the *target tokens* of G::

    L = (1 / N_G) * sum_{examples in G} sum_{targets t} CE_t,   N_G = number of targets in G

Each rank back-propagates, per micro-batch m, ``sum_{t in m} CE_t * W / N_G`` where W is the
world size, because DDP/FSDP/DeepSpeed *average* gradients over the ranks (dividing by W).
N_G comes from the deterministic plan, which every rank knows: no communication is needed.
With this, accumulation 4 x batch 2 equals batch 8, and 2 processes equal 1.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from forgetkit.config import Config, ConfigError, dump_config
from forgetkit.data.batching import collate, epoch_stream, plan_batches, split_step
from forgetkit.data.sources import build_examples, load_records, select, split_records
from forgetkit.data.templates import IGNORE_INDEX, Example
from forgetkit.models import human_count, load_model, save_hf_checkpoint
from forgetkit.regularizers.base import RegContext, Regularizer
from forgetkit.train.distributed import Backend, DeepSpeedBackend, make_backend
from forgetkit.train.optim import (
    build_optimizer,
    lr_factor,
    param_groups,
    set_lr,
    warmup_steps,
)

log = logging.getLogger("forgetkit")


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf; the last good checkpoint is kept."""


@dataclass
class TrainData:
    train: list[Example]
    validation: list[Example]
    replay: list[Example]
    replay_ratio: float


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


def memory_report(cfg: Config, backend: Any) -> dict[str, Any]:
    """The process's measured peak memory next to forgetkit's estimate (forgetkit.memory).

    On a GPU the peak is ``torch.cuda.max_memory_allocated``; on CPU the peak RSS of the whole
    process (interpreter and libraries included, so above the estimate, which counts only
    training state). Never fails the run.
    """
    try:
        from forgetkit.memory import estimate_for_config, measured_peak_bytes

        sharded = backend.world_size > 1 and backend.name in ("fsdp", "deepspeed")
        est = estimate_for_config(cfg, backend.world_size,
                                  model=None if sharded else backend.unwrap())
        measured = measured_peak_bytes()
        log.info("memory: estimated %.2f GiB per device (weights %.2f, grads %.2f, optimizer "
                 "%.2f, regularizers %.2f, activations %.2f); measured peak %.2f GiB (%s)",
                 est.total_bytes / 2**30, est.weights_bytes / 2**30, est.gradients_bytes / 2**30,
                 est.optimizer_bytes / 2**30, est.regularizer_bytes / 2**30,
                 est.activations_bytes / 2**30, measured["peak_bytes"] / 2**30,
                 "cuda max_memory_allocated" if measured["device"] == "cuda"
                 else "CPU peak RSS of the process")
        return {"memory": measured, "memory_estimate": est.to_dict()}
    except Exception as e:  # an estimate must never fail a finished training run
        log.warning("memory report unavailable: %s", e)
        return {}


# ----------------------------------------------------------------------------- data

def build_data(cfg: Config, tokenizer: Any, replay_spec: Any = None, replay_ratio: float = 0.0
               ) -> TrainData:
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
    replay: list[Example] = []
    if replay_spec is not None:
        rec = select(load_records(replay_spec), replay_spec, cfg.seed)
        replay = build_examples(rec, replay_spec, tokenizer, d.max_length, d.train_on_prompt,
                                packed=False, source=1)
    if not train:
        raise ConfigError(f"data.train: no example keeps a target token within "
                          f"data.max_length={d.max_length}; raise data.max_length")
    return TrainData(train, val, replay, replay_ratio)


class StepPlan:
    """Which examples every optimizer step uses: a pure function of (data, config, seed)."""

    def __init__(self, data: TrainData, cfg: Config, world_size: int) -> None:
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


def _to(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def validation_loss(backend: Backend, examples: Sequence[Example], micro_batch_size: int,
                    pad_id: int, pad_multiple: int) -> float | None:
    """Mean loss per target token over ``examples``, split across ranks (all ranks call it)."""
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
        batch = _to(collate([examples[i] for i in batches[b if real else 0]], pad_id,
                            pad_multiple), backend.device)
        with backend.autocast():
            out = backend.forward(input_ids=batch["input_ids"],
                                  attention_mask=batch["attention_mask"])
        if real:
            ce = token_losses(out, batch["labels"])
            total[0] += ce.sum().double()
            total[1] += (batch["labels"] != IGNORE_INDEX).sum()
    backend.all_reduce_sum(total)
    if was_training:
        model.train()
    return float(total[0] / total[1])


# ----------------------------------------------------------------------------- checkpoints

def _rng_state() -> dict[str, Any]:
    st = {"python": random.getstate(), "numpy": np.random.get_state(),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    if not ckpt_root.is_dir():
        return None
    done = sorted(p for p in ckpt_root.glob("step-*") if (p / "COMPLETE").exists())
    return done[-1] if done else None


def save_checkpoint(backend: Backend, regs: Sequence[Regularizer], ckpt_root: Path, step: int,
                    counters: dict[str, Any], keep: int) -> Path:
    """Model + optimizer (sharded where the model is) + regularizers + RNG + data position.

    Written into ``step-N.tmp`` and renamed when every rank has finished, with a COMPLETE marker:
    a kill mid-write never leaves a checkpoint that resume would pick up.
    """
    final = ckpt_root / f"step-{step:08d}"
    tmp = ckpt_root / f"step-{step:08d}.tmp"
    if backend.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    backend.save_training_state(tmp)
    torch.save(_rng_state(), tmp / f"rng-rank{backend.rank}.pt")
    torch.save({r.name: r.state_dict() for r in regs}, tmp / f"regularizers-rank{backend.rank}.pt")
    backend.barrier()
    if backend.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **counters}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        (final / "COMPLETE").touch()
        old = sorted(p for p in ckpt_root.glob("step-*") if p.is_dir() and p.suffix != ".tmp")
        for p in old[:-keep]:
            shutil.rmtree(p, ignore_errors=True)
    backend.barrier()
    return final


def load_checkpoint(backend: Backend, regs: Sequence[Regularizer], path: Path) -> dict[str, Any]:
    backend.load_training_state(path)
    _set_rng_state(torch.load(path / f"rng-rank{backend.rank}.pt", weights_only=False))
    states = torch.load(path / f"regularizers-rank{backend.rank}.pt", weights_only=False)
    for r in regs:
        if r.name in states:
            r.load_state_dict(states[r.name])
    return json.loads((path / "trainer_state.json").read_text())


# ----------------------------------------------------------------------------- the loop

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def train(cfg: Config, regularizers: Sequence[Regularizer] = (), *, replay: Any = None,
          replay_ratio: float = 0.0, progress: bool = True) -> TrainResult:
    """Fully fine-tune ``cfg.model`` on ``cfg.data``; see the module docstring for the numerics.

    Writes into ``cfg.output_dir()``: ``config.yaml``, ``train_log.jsonl``, ``checkpoints/``
    and (``output.save_model``) ``model/``, a standard HF checkpoint.
    """
    t = cfg.training
    backend = make_backend(cfg.distributed, t)
    out_dir = cfg.output_dir()
    ckpt_root = out_dir / "checkpoints"
    seed_everything(cfg.seed)

    # -- model and data (identical on every rank: same seed, same files)
    model, tokenizer = load_model(cfg.model)
    data = build_data(cfg, tokenizer, replay, replay_ratio)
    plan = StepPlan(data, cfg, backend.world_size)
    log.info("data: %d train / %d validation examples (+%d replay pool, ratio %.3f); "
             "%d steps/epoch, %d steps, global batch %d", len(data.train), len(data.validation),
             len(data.replay), data.replay_ratio, plan.steps_per_epoch, plan.total_steps,
             plan.global_batch)

    # -- place/shard, then regularizers snapshot theta0 from the (local) parameters
    model = backend.shard(model)
    model.train()
    ctx = RegContext(model=model, params=backend.local_params, device=backend.device,
                     rank=backend.rank, world_size=backend.world_size, tokenizer=tokenizer,
                     backend=backend)
    backend.model = model
    named = list(backend.local_params())
    optimizer = build_optimizer(param_groups(named, t), t, backend.device)
    for reg in regularizers:
        reg.prepare(ctx)
    if t.clip_scope == "loss" and t.max_grad_norm:
        inside = [r.name for r in regularizers if getattr(r, "mode", "loss") == "loss"]
        if inside:
            log.warning("training.clip_scope 'loss': %s add their penalty through the loss "
                        "(autograd), so the gradient clip includes it", ", ".join(inside))
    model, optimizer = backend.wrap(model, optimizer)
    ctx.model = model
    warm = warmup_steps(t, plan.total_steps)

    # -- resume
    start_step, counters, resumed_from = 0, {"tokens": 0, "target_tokens": 0, "time_s": 0.0}, None
    last = latest_checkpoint(ckpt_root) if t.resume else None
    if backend.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.yaml").write_text(dump_config(cfg))
    log_path = out_dir / "train_log.jsonl"
    if last is not None:
        state = load_checkpoint(backend, regularizers, last)
        start_step = resumed_from = state["step"]
        counters = {k: state[k] for k in counters}
        log.info("resumed from %s (step %d of %d)", last, start_step, plan.total_steps)
        if backend.is_main and log_path.exists():  # drop log lines past the checkpoint
            keep = [ln for ln in log_path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("step", 0) <= start_step]
            log_path.write_text("".join(k + "\n" for k in keep))
    elif backend.is_main:
        log_path.write_text("")
    backend.barrier()

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
    t_last, tok_last = time.perf_counter(), counters["tokens"]
    t_start = time.perf_counter() - counters["time_s"]
    val_loss: float | None = None

    for step in range(start_step, plan.total_steps):
        micro, n_targets, n_tokens = plan.step(step, backend.rank)
        scale = backend.world_size / n_targets  # see the module docstring
        for a, examples in enumerate(micro):
            batch = _to(collate(examples, pad_id, cfg.data.pad_to_multiple_of), dev)
            with backend.sync_context(sync=a == n_micro - 1):
                with backend.autocast():
                    out = backend.forward(input_ids=batch["input_ids"],
                                          attention_mask=batch["attention_mask"])
                ce = token_losses(out, batch["labels"])  # (B, T) fp32
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
                    rep = (batch["source"] == 1)[:, None]  # (B, 1): replay examples
                    acc[2] += (ce.detach() * rep).sum().double()
                    acc[3] += (targets & rep).sum()
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
        lr = set_lr(optimizer, t.lr, lr_factor(step, plan.total_steps, warm, t.scheduler,
                                               t.min_lr_ratio))
        backend.optimizer_step()
        if isinstance(backend, DeepSpeedBackend):
            grad_norm = backend.grad_norm_after_step()
        for reg in regularizers:
            v = reg.after_step(ctx, lr)
            if v is not None:
                reg_acc[reg.name] = reg_acc.get(reg.name, 0) + v.detach()
        nonfinite |= ~torch.isfinite(grad_norm.to(dev))
        counters["tokens"] += n_tokens
        counters["target_tokens"] += n_targets
        steps_since_log += 1
        done = step + 1

        # -- log (one host sync per log point)
        if done % t.log_every == 0 or done == plan.total_steps:
            backend.all_reduce_sum(acc)
            vals = acc.tolist()
            if nonfinite.item() or not math.isfinite(vals[0]):
                raise NonFiniteLoss(
                    f"non-finite loss or gradient at step {done}; stopping. The last good "
                    f"checkpoint is kept in {ckpt_root} (lower training.lr, or check the data)")
            now = time.perf_counter()
            rec: dict[str, Any] = {
                "step": done, "epoch": step / plan.steps_per_epoch,
                "loss": vals[0] / max(vals[1], 1.0), "lr": lr,
                "grad_norm": float(grad_norm), "tokens": counters["tokens"],
                "target_tokens": counters["target_tokens"],
                "tokens_per_s": (counters["tokens"] - tok_last) / max(now - t_last, 1e-9),
                "elapsed_s": now - t_start,
            }
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
                                           cfg.data.pad_to_multiple_of)
                rec["val_loss"] = val_loss
            if backend.is_main:
                with log_path.open("a") as fh:
                    fh.write(json.dumps(rec) + "\n")
        elif t.eval_every and done % t.eval_every == 0 and done != plan.total_steps:
            val_loss = validation_loss(backend, data.validation, t.micro_batch_size, pad_id,
                                       cfg.data.pad_to_multiple_of)
        if bar is not None:
            bar.update(1)
        counters["time_s"] = time.perf_counter() - t_start
        if t.checkpoint_every and done % t.checkpoint_every == 0 and done != plan.total_steps:
            if nonfinite.item():
                raise NonFiniteLoss(f"non-finite gradient before step {done}'s checkpoint; the "
                                    f"last good checkpoint is kept in {ckpt_root}")
            save_checkpoint(backend, regularizers, ckpt_root, done, counters, t.keep_checkpoints)

    if bar is not None:
        bar.close()
    # -- the end: validation, final checkpoint, HF model
    val_loss = validation_loss(backend, data.validation, t.micro_batch_size, pad_id,
                               cfg.data.pad_to_multiple_of)
    if backend.is_main:
        with log_path.open("a") as fh:
            fh.write(json.dumps({"step": plan.total_steps, "final": True,
                                 "val_loss": val_loss}) + "\n")
    if plan.total_steps > start_step or last is None:
        save_checkpoint(backend, regularizers, ckpt_root, plan.total_steps, counters,
                        t.keep_checkpoints)
    model_dir = None
    if cfg.output.save_model:
        sd = backend.full_state_dict()  # collective under FSDP / ZeRO-3
        model_dir = out_dir / "model"
        if backend.is_main:
            tmp = out_dir / "model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            save_hf_checkpoint(backend.unwrap(), tokenizer, tmp, state_dict=sd)
            shutil.rmtree(model_dir, ignore_errors=True)
            os.replace(tmp, model_dir)
        backend.barrier()
    result = TrainResult(out_dir, model_dir, plan.total_steps, counters["tokens"],
                         counters["target_tokens"], counters["time_s"], val_loss, resumed_from)
    if backend.is_main:
        info = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(result).items()}
        info.update(world_size=backend.world_size, strategy=backend.name,
                    n_train_examples=len(data.train), n_validation_examples=len(data.validation),
                    n_replay_pool=len(data.replay), global_batch=plan.global_batch)
        info.update(memory_report(cfg, backend))
        tmp = out_dir / "train_result.json.tmp"
        tmp.write_text(json.dumps(info, indent=1))
        os.replace(tmp, out_dir / "train_result.json")
    log.info("trained %d steps, %s tokens (%s targets) in %.1fs; validation loss %s",
             plan.total_steps, human_count(counters["tokens"]),
             human_count(counters["target_tokens"]), counters["time_s"],
             f"{val_loss:.4f}" if val_loss is not None else "n/a")
    return result
