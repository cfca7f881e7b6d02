"""forgetkit's regularizers (L2-SP, EWC, KL to the base model) inside ``transformers.Trainer``
and its subclasses (``trl.SFTTrainer``, LLaMA-Factory's and Axolotl's trainers).

A user swaps the class and passes the regularizers::

    trainer = RegularizedSFTTrainer(model=model, args=args, train_dataset=ds,
                                    regularizers=[EWC(lam, batches=fisher_batches(general, tok))])

Where each term enters, per optimizer step of ``Trainer._run_epoch`` (transformers 5)::

    for each micro-batch m of the step:
        training_step -> compute_loss: task loss  (+ "before_clip" terms, through autograd)
        backward                                   (DDP/FSDP reduce on the last micro-batch)
    clip_grad_norm_(args.max_grad_norm)            the Trainer's gradient clip
    on_pre_optimizer_step:  "after_clip" terms     p.grad += lam * F * (theta - theta0)
    optimizer.step()
    on_optimizer_step:      "after_step" terms     decoupled L2-SP: theta -= lr*lam*(theta - theta0)
    lr_scheduler.step(); log (reg/<name>); save (regularizer state into the checkpoint)

``before_clip`` (default for L2-SP coupled and EWC): the regularizer is prepared with
``RegContext.grads_in_params=False``, so ``penalty()`` returns ``lam/2 * sum F (theta -
theta0)^2`` with autograd; it is added to the loss the Trainer back-propagates as
``loss + (P*c - (P*c).detach())`` -- the loss *value* (what the Trainer logs as ``loss``) is
unchanged, the gradient gains ``c * grad P``. The factor ``c`` makes the term's gradient per
optimizer step exactly ``lam * F * (theta - theta0)`` whatever the Trainer does with the loss.
From ``Trainer.training_step``/``compute_loss``: the loss ``compute_loss`` returns is divided by
``current_gradient_accumulation_steps`` (``n``, the micro-batches of this step) unless it
counts as already scaled for accumulation (``loss_is_scaled_for_ga``, else
``model_accepts_loss_kwargs and num_items_in_batch is not None`` or a ``compute_loss_func``);
``num_items_in_batch`` normalisation and ``average_tokens_across_devices`` (``loss *=
num_processes``) are applied inside ``compute_loss``, before the term is added, so they do not
touch it; DeepSpeed gets ``scale_wrt_gas=False``. Then DDP (and DeepSpeed) *average* the
gradients over the ``W`` ranks. L2-SP and EWC do not depend on the batch and the weights do not
change within a step, so their penalty is added once per step, on the last micro-batch
(``accelerator.sync_gradients``), with ``c = n`` if the Trainer divides by ``n`` else ``1``:
every rank adds ``grad P`` and the average over ranks is ``grad P``. Under FSDP2 the penalty's
gradient lands on the local shard of each parameter, which no reduce-scatter touches, so each
rank's shard gets exactly its term. A batch-dependent penalty (KL, or any other regularizer) is
added on every micro-batch ``m`` as ``P_m / n`` (times ``n`` where the Trainer divides), as in
forgetkit's own loop: the step's term is the mean over the micro-batches of all ranks.

``after_clip`` (forgetkit's ``training.clip_scope: loss``): prepared with
``grads_in_params=True``; ``grad_term()`` adds its gradient into ``p.grad`` in place (foreach
kernels, no autograd graph) in ``on_pre_optimizer_step``, which the Trainer runs after its clip,
so a stiff EWC term cannot shrink the task gradient through the clip factor. The Trainer's
logged ``grad_norm`` is then the norm without the term. Not available under DeepSpeed (its
gradients live in its partitions, and accelerate runs DeepSpeed's ``step`` -- clip included --
inside ``backward``): refused at construction.

KL always enters through the loss (``before_clip``); decoupled L2-SP always acts after the
optimizer step (``after_step``), with each parameter's current learning rate
(``RegContext.param_lr``, read from the optimizer before the scheduler steps).

theta0, EWC's Fisher and KL's frozen reference are captured when the Trainer is built, from the
model the user passed (before the Trainer wraps or shards it, or loads a checkpoint into it on
resume): ``capture_reference``. ``prepare`` runs at ``on_train_begin``, after accelerate has
prepared the model, and maps them onto the local parameters (DTensor shards under FSDP2). EWC's
Fisher is thus estimated at construction, on the device the model is on then, with each rank
taking its share of the batches (all-reduced). The Trainer moves the model to its device at construction except under
DeepSpeed and FSDP: there move it yourself first (``model.to("cuda")``, if it fits) or give EWC a
``fisher_path`` computed earlier, else the estimate runs on the CPU. An EWC
without ``run_dir`` gets the Trainer's ``output_dir``: its Fisher is written there as
``fisher-<name>.safetensors`` and a resumed Trainer reads it back instead of estimating again.

Logging: each regularizer's value (the penalty ``lam/2 * sum F (theta - theta0)^2``, KL's
``lam * KL``) is logged as ``reg/<name>``: the mean per optimizer step since the last log, added
to the Trainer's ``log`` so it reaches every ``report_to`` integration.

Checkpoints: ``_save_checkpoint`` writes every regularizer's ``state_dict`` into the checkpoint
folder (``forgetkit-regularizers-rank<r>.json`` plus ``.safetensors`` for tensors, no pickle),
and ``train(resume_from_checkpoint=...)`` restores it after ``prepare`` (checking theta0's and
F's fingerprints): a resumed run takes the same steps as an uninterrupted one.

Tested (tests/test_integrations.py, CPU): one process, DDP and DeepSpeed ZeRO-2 (2 gloo
processes equal 1). FSDP2 is wired (shards via ``prepare``) but untested: accelerate on CPU
ignores the FSDP plugin (it wraps DDP), so it needs GPUs. Refused (clear errors): DeepSpeed
ZeRO-3 and FSDP1 (parameters are not per-name tensors), ``after_clip`` under DeepSpeed,
``nn.DataParallel`` (``n_gpu > 1``: use torchrun), tensor/context/sequence parallelism, models
sharded at load time, ``model_init`` (theta0 is captured at construction).
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from forgetkit.regularizers.base import RegContext, optimizer_lr_lookup

log = logging.getLogger("forgetkit")

__all__ = ["PLACEMENTS", "RegularizedTrainer", "RegularizerMixin", "regularize"]

#: Where a coupled L2-SP / EWC term enters relative to the Trainer's gradient clip.
PLACEMENTS = ("before_clip", "after_clip")
#: Stem of the per-rank regularizer state in a checkpoint folder.
STATE_STEM = "forgetkit-regularizers"
STATE_FORMAT = "forgetkit-trainer-regularizers/1"


def _kind(reg: Any) -> str:
    return str(getattr(reg, "kind", type(reg).__name__))


def _once_per_step(reg: Any) -> bool:
    """Penalties that do not depend on the batch (L2-SP, EWC): added once per optimizer step."""
    from forgetkit.regularizers.l2 import AnchoredRegularizer

    return isinstance(reg, AnchoredRegularizer)


def _resolve_placements(regs: list[Any], placement: str | dict[str, str]) -> dict[str, str]:
    """name -> ``before_clip`` | ``after_clip`` | ``after_step`` (see the module docstring)."""
    names = [r.name for r in regs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"regularizer names must be unique (they key reg/<name> and the "
                         f"checkpoint state), got {dupes} twice: pass name=... to tell them apart")
    if isinstance(placement, str):
        asked, explicit = dict.fromkeys(names, placement), set()
    else:
        unknown = sorted(set(placement) - set(names))
        if unknown:
            raise ValueError(f"placement names {unknown}, which are not among the regularizers "
                             f"{names}")
        asked = {n: placement.get(n, "before_clip") for n in names}
        explicit = set(placement)
    out = {}
    for r in regs:
        want = asked[r.name]
        if want not in PLACEMENTS:
            raise ValueError(f"placement of {r.name!r}: expected one of {PLACEMENTS}, got "
                             f"{want!r}")
        if _kind(r) == "kl":
            if r.name in explicit and want != "before_clip":
                raise ValueError(f"regularizer {r.name!r} (KL) enters through the loss, i.e. "
                                 "before the clip; it has no 'after_clip' placement")
            out[r.name] = "before_clip"
        elif getattr(r, "variant", None) == "decoupled":
            if r.name in explicit:
                raise ValueError(f"regularizer {r.name!r} (decoupled L2-SP) acts after the "
                                 "optimizer step, not through the gradient: it takes no "
                                 "placement")
            out[r.name] = "after_step"
        else:
            out[r.name] = want
    return out


def _check_deepspeed(placements: dict[str, str], hf_config: Any) -> None:
    """Refuse what cannot run under DeepSpeed: ``after_clip`` and ZeRO-3."""
    after = [n for n, p in placements.items() if p == "after_clip"]
    if after:
        raise NotImplementedError(
            f"placement 'after_clip' of {after} is not available under DeepSpeed: its "
            "gradients are not in p.grad and accelerate runs DeepSpeed's step (clip included) "
            "inside backward; use placement='before_clip'")
    cfg = getattr(hf_config, "config", None) or {}
    if int((cfg.get("zero_optimization") or {}).get("stage", 0) or 0) == 3:
        raise NotImplementedError(
            "regularizers under DeepSpeed ZeRO-3 are not supported (parameters are "
            "partitioned outside forward); use ZeRO-1/2 or FSDP2 (fsdp_version 2)")


def _device_all_reduce(device: torch.device) -> Any:
    """An in-place sum over ranks that also takes CPU tensors under NCCL: under FSDP/DeepSpeed
    the Trainer leaves the model on the CPU at construction, so a Fisher estimated there has CPU
    partial sums, which NCCL cannot reduce; they travel through ``device`` and back."""
    from forgetkit.regularizers.base import _dist_all_reduce_sum

    def reduce(t: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        if (t.device.type == "cpu" and device.type != "cpu" and dist.is_initialized()
                and dist.get_backend() == "nccl"):
            g = t.to(device)
            _dist_all_reduce_sum(g)
            t.copy_(g.to(t.device))
            return t
        return _dist_all_reduce_sum(t)

    return reduce


class _State:
    """Per-trainer bookkeeping of the integration (not part of the Trainer's own state)."""

    def __init__(self) -> None:
        self.ctx: dict[str, RegContext] = {}
        self.resume_from: str | None = None
        self.in_training_step = False
        self.sums: dict[str, torch.Tensor] = {}
        self.steps = 0
        self.prepared = False
        self.param_ids: list[int] = []

    def add(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().float()
        self.sums[name] = self.sums[name] + v if name in self.sums else v

    def drain(self) -> dict[str, float]:
        out = {f"reg/{n}": float(s) / self.steps for n, s in self.sums.items()} \
            if self.steps else {}
        self.sums, self.steps = {}, 0
        return out


class _Hooks(TrainerCallback):
    """Routes the Trainer's events to the integration (holds the trainer weakly)."""

    def __init__(self, trainer: Any) -> None:
        self._trainer = weakref.ref(trainer)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer()._fk_train_begin()  # type: ignore[union-attr]

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer()._fk_grad_terms()  # type: ignore[union-attr]

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self._trainer()._fk_after_step()  # type: ignore[union-attr]


class RegularizerMixin:
    """Adds forgetkit regularizers to a ``transformers.Trainer`` subclass (put it first:
    ``class MyTrainer(RegularizerMixin, SFTTrainer)``, or use :func:`regularize`).

    Args (keyword, in addition to the Trainer's own):
        regularizers: forgetkit regularizer objects (``L2SP``, ``EWC``, ``KLToInit``, or any
            object following :class:`forgetkit.regularizers.base.Regularizer`), unique names.
        placement: ``"before_clip"`` (default) or ``"after_clip"`` for every coupled L2-SP /
            EWC term, or a dict ``{name: placement}`` (unnamed ones: ``before_clip``). KL is
            always ``before_clip``, decoupled L2-SP always ``after_step``.

    With no regularizer the Trainer is unchanged, bit for bit. Attributes after construction:
    ``regularizers`` (the list) and ``placements`` (name -> where its term enters).
    See the module docstring for the numerics.
    """

    regularizers: list[Any]
    placements: dict[str, str]

    def __init__(self, *args: Any, regularizers: Any = (), placement: str | dict[str, str] =
                 "before_clip", **kwargs: Any) -> None:
        regs = list(regularizers or ())
        placements = _resolve_placements(regs, placement)
        self.regularizers, self.placements = regs, placements
        self._fk = _State()
        targs = kwargs.get("args", args[1] if len(args) > 1 else None)
        if regs and getattr(targs, "deepspeed", None):  # refuse before anything is built
            _check_deepspeed(placements, getattr(targs, "hf_deepspeed_config", None))
        super().__init__(*args, **kwargs)  # type: ignore[call-arg]
        if not regs:
            return
        strategy, stage = self._fk_strategy()
        if strategy == "deepspeed":
            _check_deepspeed(placements, None)
        if getattr(self, "model_init", None) is not None:
            raise NotImplementedError("regularizers with model_init (or hyperparameter_search) "
                                      "are not supported: theta0 is captured from the model "
                                      "given at construction")
        self._fk_capture()
        self.add_callback(_Hooks(self))  # type: ignore[attr-defined]
        for r in regs:
            log.info("forgetkit: regularizer %s (%s) -> %s", r.name, _kind(r), placements[r.name])

    # ---- set-up
    def _fk_strategy(self) -> tuple[str, int | None]:
        """("single"|"ddp"|"fsdp"|"deepspeed", ZeRO stage), refusing what does not compose."""
        t: Any = self
        acc = t.accelerator
        if getattr(t.args, "n_gpu", 1) > 1:
            raise NotImplementedError("regularizers under nn.DataParallel (n_gpu > 1 in one "
                                      "process) are not supported: launch with torchrun (DDP)")
        for what in ("tp", "cp", "sp"):
            size = getattr(t, f"get_{what}_size", lambda: 1)()
            if size and size > 1:
                raise NotImplementedError(f"regularizers under {what.upper()} parallelism "
                                          f"({what}_size={size}) are not supported")
        if getattr(t, "is_distributed_loading_by_transformers", False):
            raise NotImplementedError("regularizers with a model sharded at load time "
                                      "(DistributedConfig) are not supported")
        if t.is_deepspeed_enabled:
            stage = int(getattr(acc.state.deepspeed_plugin, "zero_stage", 2))
            if stage == 3:
                raise NotImplementedError(
                    "regularizers under DeepSpeed ZeRO-3 are not supported (parameters are "
                    "partitioned outside forward); use ZeRO-1/2 or FSDP2 (fsdp_version 2)")
            return "deepspeed", stage
        if t.is_fsdp_enabled:
            version = int(getattr(acc.state.fsdp_plugin, "fsdp_version", 1) or 1)
            if version != 2:
                raise NotImplementedError("regularizers under FSDP1 are not supported (flat "
                                          "parameters); set fsdp_config fsdp_version: 2")
            return "fsdp", None
        return ("ddp" if acc.num_processes > 1 else "single"), None

    def _fk_capture(self) -> None:
        """theta0 / Fisher / KL reference from the model as given (see the module docstring)."""
        t: Any = self
        acc = t.accelerator
        world = int(acc.num_processes)
        for reg in self.regularizers:
            if hasattr(reg, "run_dir") and getattr(reg, "run_dir", 1) is None:
                reg.run_dir = Path(t.args.output_dir)  # EWC's own Fisher copy (resume reads it)
            fn = getattr(reg, "capture_reference", None)
            if fn is None:  # a Regularizer without it snapshots from the parameters in prepare
                continue
            kw: dict[str, Any] = {}
            if "rank" in inspect.signature(fn).parameters:
                kw = {"rank": int(acc.process_index), "world_size": world,
                      "all_reduce": _device_all_reduce(acc.device) if world > 1 else None}
            fn(t.model, **kw)

    def _fk_context(self, grads_in_params: bool) -> RegContext:
        t: Any = self
        acc = t.accelerator
        strategy, stage = self._fk_strategy()
        model = t.model_wrapped
        unwrapped = acc.unwrap_model(model)
        return RegContext(model=model, params=unwrapped.named_parameters, device=acc.device,
                          rank=int(acc.process_index), world_size=int(acc.num_processes),
                          strategy=strategy, zero_stage=stage,  # type: ignore[arg-type]
                          grads_in_params=grads_in_params and strategy != "deepspeed",
                          autocast=acc.autocast, param_lr=optimizer_lr_lookup(t.optimizer))

    def _fk_train_begin(self) -> None:
        st = self._fk
        before, after = self._fk_context(False), self._fk_context(True)
        ids = [id(p) for _, p in before.params()]
        if st.prepared:  # train() again: theta0 stays the one captured at construction
            if ids != st.param_ids:
                raise RuntimeError(
                    "the Trainer's parameters changed since the regularizers were prepared "
                    "(train() called again after the model was re-wrapped or re-sharded, or "
                    "auto_find_batch_size retried): theta0 cannot be mapped onto them; build a "
                    "new Trainer from the base model")
            for ctx in st.ctx.values():  # the new wrapper and optimizer
                ctx.model, ctx.param_lr = before.model, before.param_lr
        else:
            for reg in self.regularizers:
                place = self.placements[reg.name]
                ctx = after if place in ("after_clip", "after_step") and _kind(reg) != "kl" \
                    else before
                reg.prepare(ctx)
                st.ctx[reg.name] = ctx
        st.param_ids, st.sums, st.steps, st.prepared = ids, {}, 0, True
        if st.resume_from is not None:
            self._fk_load_state(st.resume_from)

    # ---- the loss path ("before_clip", KL)
    def _fk_loss_scaled_for_ga(self, num_items_in_batch: Any) -> bool:
        """Whether ``training_step`` leaves the loss undivided by the accumulation steps: the
        Trainer's own rule (transformers 5 ``training_step``)."""
        t: Any = self
        flag = getattr(t, "loss_is_scaled_for_ga", None)
        if flag is not None:
            return bool(flag)
        return bool((t.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or t.compute_loss_func is not None)

    def _fk_loss_terms(self, inputs: Any, num_items_in_batch: Any) -> torch.Tensor | None:
        """The regularizers' loss terms for this micro-batch, scaled for the Trainer (module
        docstring), or None."""
        t: Any = self
        st = self._fk
        n = int(getattr(t, "current_gradient_accumulation_steps", 0)
                or t.args.gradient_accumulation_steps)
        undo = 1.0 if self._fk_loss_scaled_for_ga(num_items_in_batch) else float(n)
        last = bool(t.accelerator.sync_gradients)
        total = None
        for reg in self.regularizers:
            once = _once_per_step(reg)
            if once and not last:
                continue
            p = reg.penalty(st.ctx[reg.name], inputs)
            if p is None:
                continue
            share = p if once else p / n  # this micro-batch's part of the step's gradient
            st.add(reg.name, share)
            term = share * undo
            total = term if total is None else total + term
        return total

    def training_step(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """The Trainer's ``training_step``; the ``compute_loss`` it calls gets the terms."""
        self._fk.in_training_step = bool(self.regularizers)
        try:
            return super().training_step(*args, **kwargs)  # type: ignore[misc]
        finally:
            self._fk.in_training_step = False

    def compute_loss(self, model: Any, inputs: Any, return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        """The Trainer's ``compute_loss``, plus (inside ``training_step``) the loss-path terms
        as ``loss + (T - T.detach())``: the value is the task loss, the gradient gains T's."""
        out = super().compute_loss(model, inputs, return_outputs=return_outputs,  # type: ignore[misc]
                                   num_items_in_batch=num_items_in_batch)
        st = self._fk
        if not st.in_training_step:
            return out
        st.in_training_step = False  # one compute_loss per training_step gets the terms
        total = self._fk_loss_terms(inputs, num_items_in_batch)
        if total is None:
            return out
        loss = out[0] if return_outputs else out
        loss = loss + (total - total.detach()).to(loss.dtype)
        return (loss, *out[1:]) if return_outputs else loss

    # ---- the gradient path ("after_clip") and the update path ("after_step")
    def _fk_grad_terms(self) -> None:
        st = self._fk
        for reg in self.regularizers:
            v = reg.grad_term(st.ctx[reg.name])
            if v is None:
                continue
            if self.placements[reg.name] == "before_clip":
                raise RuntimeError(
                    f"regularizer {reg.name!r} added a gradient term after the clip although it "
                    "is placed before_clip (its context says grads_in_params=False): it must "
                    "put that term in penalty()")
            st.add(reg.name, v)

    def _fk_after_step(self) -> None:
        t: Any = self
        st = self._fk
        st.steps += 1
        if t.accelerator.optimizer_step_was_skipped:  # fp16 overflow: no update happened
            return
        lr = float(t.optimizer.param_groups[0]["lr"])
        for reg in self.regularizers:
            v = reg.after_step(st.ctx[reg.name], lr)
            if v is not None:
                st.add(reg.name, v)

    # ---- logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log``; a training log (one with ``loss``) gains ``reg/<name>``."""
        if self.regularizers and "loss" in logs:
            logs.update(self._fk.drain())
        super().log(logs, *args, **kwargs)  # type: ignore[misc]

    # ---- checkpoints and resume
    def train(self, resume_from_checkpoint: str | bool | None = None, *args: Any,
              **kwargs: Any) -> Any:
        """The Trainer's ``train``; the checkpoint it resumes from also restores the
        regularizers' state (after ``prepare``)."""
        t: Any = self
        path = resume_from_checkpoint
        if isinstance(path, bool):
            path = None
            if resume_from_checkpoint and os.path.isdir(t.args.output_dir):
                from transformers.trainer_utils import get_last_checkpoint

                path = get_last_checkpoint(t.args.output_dir)
        self._fk.resume_from = str(path) if path is not None else None
        return super().train(path if path is not None else resume_from_checkpoint,  # type: ignore[misc]
                             *args, **kwargs)

    def _fk_state_stem(self, folder: str | Path, rank: int) -> Path:
        return Path(folder) / f"{STATE_STEM}-rank{rank}"

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        t: Any = self
        if self.regularizers and self._fk.prepared:
            from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

            from forgetkit.train.loop import save_plain

            folder = Path(t._get_output_dir(trial=trial)) / \
                f"{PREFIX_CHECKPOINT_DIR}-{t.state.global_step}"
            folder.mkdir(parents=True, exist_ok=True)
            rank = int(t.accelerator.process_index)
            doc = {"format": STATE_FORMAT, "global_step": int(t.state.global_step),
                   "world_size": int(t.accelerator.num_processes),
                   "placements": dict(self.placements),
                   "regularizers": {r.name: r.state_dict() for r in self.regularizers}}
            save_plain(self._fk_state_stem(folder, rank), doc, "regularizer state_dict")
        super()._save_checkpoint(model, trial)  # type: ignore[misc]

    def _fk_load_state(self, folder: str) -> None:
        from forgetkit.train.loop import load_plain

        t: Any = self
        rank = int(t.accelerator.process_index)
        stem = self._fk_state_stem(folder, rank)
        if not stem.with_suffix(".json").exists():
            stem0 = self._fk_state_stem(folder, 0)
            if not stem0.with_suffix(".json").exists():
                raise FileNotFoundError(
                    f"resume: checkpoint {folder} holds no forgetkit regularizer state "
                    f"({stem.name}.json): it was written without these regularizers (a plain "
                    "Trainer?) or its write was interrupted; resume from another checkpoint")
            stem = stem0  # another world size: the states are identical on every rank
        doc = load_plain(stem)
        states = doc.get("regularizers", {})
        mine = [r.name for r in self.regularizers]
        if sorted(states) != sorted(mine):
            raise ValueError(f"resume: checkpoint {folder} was trained with regularizers "
                             f"{sorted(states)}, this Trainer has {sorted(mine)}")
        changed = {n: (doc.get("placements", {}).get(n), p) for n, p in self.placements.items()
                   if doc.get("placements", {}).get(n) not in (None, p)}
        if changed:
            log.warning("resume: placements changed since the checkpoint (%s): the resumed run "
                        "differs from an uninterrupted one", changed)
        for r in self.regularizers:
            r.load_state_dict(states[r.name])


_CLASSES: dict[type, type] = {}


def regularize(trainer_cls: type) -> type:
    """A subclass of ``trainer_cls`` (a ``transformers.Trainer`` subclass: SFTTrainer,
    LLaMA-Factory's ``CustomSeq2SeqTrainer``, Axolotl's ``AxolotlTrainer``, ...) that takes
    ``regularizers=[...]`` and ``placement=...``: ``(RegularizerMixin, trainer_cls)``, named
    ``Regularized<Name>``, one class per ``trainer_cls``."""
    if isinstance(trainer_cls, type) and issubclass(trainer_cls, RegularizerMixin):
        return trainer_cls
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, Trainer)):
        raise TypeError(f"regularize() takes a transformers.Trainer subclass, got {trainer_cls!r}")
    if trainer_cls not in _CLASSES:
        _CLASSES[trainer_cls] = type(
            f"Regularized{trainer_cls.__name__}", (RegularizerMixin, trainer_cls),
            {"__module__": __name__,
             "__doc__": f"``{trainer_cls.__module__}.{trainer_cls.__qualname__}`` with forgetkit "
                        "regularizers (``regularizers=[...]``, ``placement=...``; see "
                        ":class:`forgetkit.integrations.RegularizerMixin`)."})
    return _CLASSES[trainer_cls]


class RegularizedTrainer(RegularizerMixin, Trainer):
    """``transformers.Trainer`` with forgetkit regularizers (``regularizers=[...]``,
    ``placement=...``; see :class:`RegularizerMixin` and the module docstring)."""


_CLASSES[Trainer] = RegularizedTrainer


def sft_trainer_class() -> type:
    """``RegularizedSFTTrainer``: ``trl.SFTTrainer`` with forgetkit regularizers (needs trl:
    ``pip install 'forgetkit[trl]'``)."""
    try:
        from trl import SFTTrainer
    except ImportError as e:
        raise ImportError("RegularizedSFTTrainer needs trl: pip install 'forgetkit[trl]'"
                          ) from e
    return regularize(SFTTrainer)
