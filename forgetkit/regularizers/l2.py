"""L2-SP: pull the weights toward their starting point theta0 (Li et al., 2018).

Penalty ``lambda/2 * ||theta - theta0||^2`` over the selected parameters, in one of two places:

``coupled`` (default)
    ``grad_term`` adds ``lambda * (theta - theta0)`` to ``p.grad`` after the backward pass (when
    gradients are reduced across ranks) and before clipping, with ``torch._foreach`` kernels.
    This is exactly the gradient of the penalty added to the loss; Adam then rescales it with
    everything else: a weight whose task gradient is small gets its pull *amplified* (the update
    of a pure pull is ~ lr * sign(theta - theta0)), a weight with large task gradients has it
    drowned. Gradient clipping sees the pull too.
``decoupled``
    ``after_step`` applies ``theta <- theta - lr * lambda * (theta - theta0)`` after the optimizer
    step, like AdamW's decoupled weight decay but toward theta0 (Loshchilov & Hutter, 2019): the
    pull is exactly ``lr * lambda * (theta - theta0)`` whatever Adam's statistics, not clipped,
    and follows the learning-rate schedule (each parameter group's current lr, so
    ``layer_lr_decay`` scales it too). ``lr * lambda`` must stay <= 1.

theta0 is snapshotted in ``prepare`` from ``ctx.params()`` (after placement/sharding, so under
FSDP each rank keeps only its local shard) in ``anchor_dtype`` on the parameter's device: memory
cost one extra copy of the selected weights in that dtype. The logged value ``reg/<name>`` is the
penalty ``lambda/2 * ||theta - theta0||^2`` over *all* ranks (local shard sums are all-reduced).

DeepSpeed ZeRO-1/2 does not leave gradients in ``p.grad`` after backward (they live in its
partitions; the loop says so with ``RegContext.grads_in_params=False``, as does a loop that wants
the term before its own gradient clip, e.g. :mod:`forgetkit.integrations`), so there the coupled
variant is applied through the loss instead: ``penalty``
returns ``lambda/2 * ||theta - theta0||^2`` with autograd, whose gradient is the same
``lambda * (theta - theta0)`` (it is computed once per micro-batch and divided by the number of
micro-batches by the loop). ZeRO-3 (parameters partitioned outside forward) and the decoupled
variant under DeepSpeed (the fp32 master weights live inside the optimizer) are not supported and
raise at ``prepare``.

Which weights theta0 is (``anchor``, ``anchor_path``): by default the weights the run starts
from. With ``anchor_path`` (a local safetensors checkpoint directory, or one ``.safetensors``
file) theta0 is read from there instead: each selected parameter's tensor by its name (the
unwrapped model's ``named_parameters`` name, as ``save_pretrained`` writes it), checked for
presence and shape, cast to the parameter's dtype (exactly the weights that checkpoint loads as
in this run) and then to ``anchor_dtype``; under FSDP each rank keeps its shard of it. A task
sequence's runner sets it for ``anchor: base`` (L2-SP toward the sequence's base model, not the
stage's initial model). A checkpoint that lacks a selected parameter, or holds it with another
shape, is refused (no approximation).

Resume: theta0 is *recomputed* in ``prepare`` (the loop reloads the initial model from the same
config before restoring the checkpoint), not stored in every checkpoint (that would cost a full
model copy per checkpoint). ``state_dict`` holds a global fingerprint of theta0 (sum, sum of
squares, count) and ``load_state_dict`` checks it, so a resume against different initial weights
fails loudly instead of silently changing the anchor.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from forgetkit.regularizers.base import RegContext
from forgetkit.regularizers.fisher import is_dtensor, local_tensor
from forgetkit.regularizers.functional import decoupled_pull_, l2_grad_, l2_penalty

log = logging.getLogger("forgetkit")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_params(named: Sequence[tuple[str, torch.nn.Parameter]], include: Sequence[str] = (),
                  exclude: Sequence[str] = ()) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters whose name matches an ``include`` regex (all when empty) and no
    ``exclude`` regex (``re.search`` semantics).

    Args:
        named: (name, parameter) pairs.
        include: regex patterns; empty means every parameter.
        exclude: regex patterns removed afterwards.

    Returns:
        The selected (name, parameter) pairs, in the given order.
    """
    inc = [re.compile(p) for p in include]
    exc = [re.compile(p) for p in exclude]
    out = []
    for n, p in named:
        if not p.requires_grad:
            continue
        if inc and not any(r.search(n) for r in inc):
            continue
        if any(r.search(n) for r in exc):
            continue
        out.append((n, p))
    return out


def zero_stage(ctx: RegContext) -> int | None:
    """The DeepSpeed ZeRO stage the loop runs under (None when not DeepSpeed)."""
    if ctx.strategy != "deepspeed":
        return None
    return int(ctx.zero_stage) if ctx.zero_stage is not None else 2


def local_from_full(full: torch.Tensor, p: torch.nn.Parameter) -> torch.Tensor:
    """A full tensor (saved by name) -> this rank's local part of parameter ``p``: the shard of
    an FSDP2 DTensor (``distribute_tensor`` with ``p``'s mesh and placements), else the tensor
    itself, on ``p``'s device."""
    if tuple(full.shape) != tuple(p.shape):
        raise ValueError(f"saved tensor of shape {tuple(full.shape)} for a parameter of shape "
                         f"{tuple(p.shape)}: another model?")
    if is_dtensor(p):
        from torch.distributed.tensor import distribute_tensor

        return distribute_tensor(full.to(p.device), p.device_mesh, p.placements).to_local()
    return full.to(p.device)


class AnchoredRegularizer:
    """Shared machinery of L2-SP and EWC: parameter selection, theta0, sharding, fingerprints."""

    name = "anchored"
    kind = "anchored"

    def __init__(self, lam: float, include: Sequence[str] = (), exclude: Sequence[str] = (),
                 anchor_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 name: str | None = None) -> None:
        if lam < 0:
            raise ValueError(f"lambda must be >= 0, got {lam}")
        self.lam = float(lam)
        self.include, self.exclude = list(include), list(exclude)
        self.anchor_dtype = _DTYPES[anchor_dtype]
        if name is not None:
            self.name = name
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.anchor: list[torch.Tensor] = []
        self.sharded = False
        self.mode: Literal["grad", "loss"] = "grad"
        self.fingerprint: dict[str, list[float]] = {}
        self._ctx: RegContext | None = None
        self._reference: dict[str, torch.Tensor] | None = None  # full theta0 by name

    # ---- set-up
    def capture_reference(self, model: torch.nn.Module) -> None:
        """Snapshot theta0 *now* from the unwrapped, full ``model`` (in ``anchor_dtype``, on
        the parameters' device), keyed by parameter name.

        For loops that shard the model or load a checkpoint into it before ``prepare`` (a
        ``transformers.Trainer`` resuming from a checkpoint): ``prepare`` then takes theta0 from
        this snapshot, cut to the local shard of each parameter, instead of from the current
        weights. Memory: one full copy of the selected weights until ``prepare`` has run.
        """
        chosen = select_params(list(model.named_parameters()), self.include, self.exclude)
        if not chosen:
            raise ValueError(f"regularizer {self.name!r}: include/exclude patterns select no "
                             f"trainable parameter (include={self.include}, "
                             f"exclude={self.exclude})")
        with torch.no_grad():
            self._reference = {n: local_tensor(p).detach().to(dtype=self.anchor_dtype,
                                                              copy=True) for n, p in chosen}

    def _setup(self, ctx: RegContext, decoupled: bool = False) -> None:
        self._ctx = ctx
        chosen = select_params(list(ctx.params()), self.include, self.exclude)
        if not chosen:
            raise ValueError(f"regularizer {self.name!r}: include/exclude patterns select no "
                             f"trainable parameter (include={self.include}, "
                             f"exclude={self.exclude})")
        self.names = [n for n, _ in chosen]
        self.params = [p for _, p in chosen]
        self.sharded = any(is_dtensor(p) for p in self.params)
        stage = zero_stage(ctx)
        if stage is not None:
            if stage == 3:
                raise NotImplementedError(
                    f"regularizer {self.name!r} ({self.kind}) under DeepSpeed ZeRO-3 is not "
                    "supported (parameters are partitioned outside forward); use "
                    "distributed.strategy=fsdp or zero_stage 1/2")
            if decoupled:
                raise NotImplementedError(
                    f"regularizer {self.name!r}: the decoupled L2-SP variant is not supported "
                    "under DeepSpeed (the fp32 master weights live inside its optimizer); use "
                    "variant: coupled, or distributed.strategy ddp/fsdp")
        # Where p.grad does not hold the reduced gradient (DeepSpeed), or a loop asks for the
        # penalty through its loss, the gradient term goes through autograd instead.
        self.mode = "grad" if ctx.grads_in_params else "loss"
        ref = self._reference
        if ref is not None:
            missing = [n for n in self.names if n not in ref]
            if missing:
                raise ValueError(f"regularizer {self.name!r}: the captured theta0 has no "
                                 f"parameter {missing[0]!r} (captured from another model?)")
        with torch.no_grad():
            self.anchor = ([local_from_full(ref[n], p).to(self.anchor_dtype)
                            for n, p in zip(self.names, self.params, strict=True)]
                           if ref is not None else
                           [local_tensor(p).detach().to(dtype=self.anchor_dtype, copy=True)
                            for p in self.params])
        self._reference = None  # the full copy is no longer needed
        self.fingerprint = {"theta0": self._global_fingerprint(ctx, self.anchor)}
        n = sum(p.numel() for p in self.params)
        log.info("regularizer %s: %d tensors (%s weights), lambda=%g, mode=%s", self.name,
                 len(self.params), f"{n:,}", self.lam, self.mode)

    def _global_fingerprint(self, ctx: RegContext, tensors: Sequence[torch.Tensor]
                            ) -> list[float]:
        """[sum, sum of squares, count] over all ranks (fp64): independent of the sharding."""
        dev = tensors[0].device if tensors else ctx.device
        t = torch.zeros(3, dtype=torch.float64, device=dev)
        for a in tensors:
            t[0] += a.sum(dtype=torch.float64)
            t[1] += torch.linalg.vector_norm(a, dtype=torch.float64).pow(2)
            t[2] += a.numel()
        self._all_reduce(ctx, t)
        return t.tolist()

    def _all_reduce(self, ctx: RegContext, t: torch.Tensor) -> torch.Tensor:
        """Sum over ranks, only where the tensors are shards (full replicas need nothing)."""
        if self.sharded and ctx.world_size > 1:
            ctx.all_reduce_sum(t)
        return t

    def _local_params(self) -> list[torch.Tensor]:
        return [local_tensor(p) for p in self.params]

    def _differentiable_local(self) -> list[torch.Tensor]:
        """The local parts of the parameters as autograd sees them: an FSDP2 DTensor's
        ``to_local()`` view (its gradient lands on the local shard, which the rank owns)."""
        return [p.to_local() if is_dtensor(p) else p for p in self.params]

    def _global_value(self, ctx: RegContext, v: torch.Tensor) -> torch.Tensor:
        """A loss-mode penalty over shards: the value becomes the global sum (logged), the
        gradient stays the local one (each rank owns its shard's term)."""
        if self.sharded and ctx.world_size > 1:
            g = v.detach().clone()
            ctx.all_reduce_sum(g)
            v = v + (g - v.detach())
        return v

    def _local_grads(self) -> list[torch.Tensor]:
        out = []
        for p in self.params:
            if p.grad is None:  # unused in this step's forward: its gradient is the pull alone
                p.grad = torch.zeros_like(p)
            out.append(local_tensor(p.grad))
        return out

    # ---- resume
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "lam": self.lam, "names": list(self.names),
                "fingerprint": {k: list(v) for k, v in self.fingerprint.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("fingerprint", {})
        for key, mine in self.fingerprint.items():
            theirs = saved.get(key)
            if theirs is None:
                continue
            for a, b in zip(mine, theirs, strict=True):
                if not math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9):
                    raise RuntimeError(
                        f"resume: regularizer {self.name!r}: the {key} recomputed at start-up "
                        f"differs from the one the checkpoint was trained with ({mine} vs "
                        f"{theirs}); the initial model or the regularizer data changed")
        if state.get("names") is not None and list(state["names"]) != self.names:
            raise RuntimeError(f"resume: regularizer {self.name!r} selects different parameters "
                               "than the checkpointed run (include/exclude changed?)")


def _safetensors_files(path: Path) -> list[Path]:
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        raise FileNotFoundError(
            f"L2-SP anchor_path {path}: not a safetensors checkpoint (a directory holding "
            "*.safetensors, or one such file); the anchor cannot be loaded exactly")
    return files


def load_anchor(path: str | Path, named: Sequence[tuple[str, torch.nn.Parameter]],
                dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """theta0 from a checkpoint: for each ``(name, parameter)`` the checkpoint's tensor of that
    name, cast to the parameter's dtype and then to ``dtype`` (on the CPU; full, not sharded).

    Raises:
        FileNotFoundError: ``path`` holds no safetensors file.
        ValueError: a parameter is missing from the checkpoint or has another shape there.
    """
    from safetensors import safe_open

    files = _safetensors_files(Path(path))
    where: dict[str, Path] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():  # noqa: SIM118 (safe_open has no __iter__)
                where.setdefault(k, f)
    missing = [n for n, _ in named if n not in where]
    if missing:
        raise ValueError(f"L2-SP anchor_path {path}: has no tensor {missing[0]!r} (of "
                         f"{len(missing)} missing parameter(s)); a checkpoint of another model "
                         "(or of a LoRA-wrapped one)?")
    out: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[tuple[str, torch.nn.Parameter]]] = {}
    for n, p in named:
        by_file.setdefault(where[n], []).append((n, p))
    for f, items in by_file.items():
        with safe_open(str(f), framework="pt") as fh:
            for n, p in items:
                t = fh.get_tensor(n)
                if tuple(t.shape) != tuple(p.shape):
                    raise ValueError(f"L2-SP anchor_path {path}: tensor {n!r} has shape "
                                     f"{tuple(t.shape)}, the parameter {tuple(p.shape)}: a "
                                     "checkpoint of another model?")
                out[n] = t.to(p.dtype).to(dtype)
    return out


class L2SP(AnchoredRegularizer):
    """``lambda/2 * ||theta - theta0||^2`` toward the starting weights (see the module docstring).

    Args:
        lam: strength lambda.
        variant: ``"coupled"`` (gradient term, rescaled by Adam) or ``"decoupled"``
            (``theta -= lr * lambda * (theta - theta0)`` after the step).
        include: regex patterns of parameter names (default: all trainable parameters).
        exclude: regex patterns removed from the selection.
        anchor_dtype: dtype theta0 is kept in.
        anchor: ``"previous"`` or ``"base"``: which model theta0 is in a task sequence (a
            record of the config's choice; the runner turns ``base`` into ``anchor_path``).
        anchor_path: read theta0 from this safetensors checkpoint (see the module docstring);
            None: the starting weights.
        name: the name logged as ``reg/<name>`` (default ``l2``).
    """

    name = "l2"
    kind = "l2"

    def __init__(self, lam: float, variant: Literal["coupled", "decoupled"] = "coupled",
                 include: Sequence[str] = (), exclude: Sequence[str] = (),
                 anchor_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 anchor: Literal["previous", "base"] = "previous",
                 anchor_path: str | Path | None = None, name: str | None = None) -> None:
        super().__init__(lam, include, exclude, anchor_dtype, name)
        if variant not in ("coupled", "decoupled"):
            raise ValueError(f"unknown L2-SP variant {variant!r}")
        if anchor not in ("previous", "base"):
            raise ValueError(f"unknown L2-SP anchor {anchor!r}")
        self.variant = variant
        self.anchor_choice = anchor
        self.anchor_path = Path(anchor_path) if anchor_path else None

    def _load_reference(self, named: Sequence[tuple[str, torch.nn.Parameter]]) -> None:
        chosen = select_params(list(named), self.include, self.exclude)
        assert self.anchor_path is not None
        self._reference = load_anchor(self.anchor_path, chosen, self.anchor_dtype)
        log.info("regularizer %s: theta0 read from %s (%d tensors)", self.name,
                 self.anchor_path, len(chosen))

    def capture_reference(self, model: torch.nn.Module) -> None:
        if self.anchor_path is None:
            super().capture_reference(model)
        else:
            self._load_reference(list(model.named_parameters()))

    def prepare(self, ctx: RegContext) -> None:
        if self.anchor_path is not None and self._reference is None:
            self._load_reference(list(ctx.params()))
        self._setup(ctx, decoupled=self.variant == "decoupled")

    def value(self, ctx: RegContext) -> torch.Tensor:
        """The current global penalty ``lambda/2 * ||theta - theta0||^2`` (no gradient)."""
        with torch.no_grad():
            local = {str(i): p for i, p in enumerate(self._local_params())}
            anchor = {str(i): a for i, a in enumerate(self.anchor)}
            v = self.lam * l2_penalty(local, anchor)
        return self._all_reduce(ctx, v)

    def penalty(self, ctx: RegContext, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.mode != "loss":
            return None
        params = {str(i): p for i, p in enumerate(self._differentiable_local())}
        anchor = {str(i): a for i, a in enumerate(self.anchor)}
        return self._global_value(ctx, self.lam * l2_penalty(params, anchor))

    def grad_term(self, ctx: RegContext) -> torch.Tensor | None:
        if self.mode != "grad" or self.variant != "coupled":
            return None
        v = l2_grad_(self._local_grads(), self._local_params(), self.anchor, self.lam)
        return self._all_reduce(ctx, v)

    def _lrs(self, ctx: RegContext, lr: float) -> list[float]:
        """Each parameter's current lr (``ctx.param_lr``: its optimizer group's), else the
        scheduled ``lr`` the loop passed."""
        if ctx.param_lr is None:
            return [lr] * len(self.params)
        out = []
        for p in self.params:
            v = ctx.param_lr(p)
            out.append(lr if v is None else float(v))
        return out

    def after_step(self, ctx: RegContext, lr: float) -> torch.Tensor | None:
        if self.variant != "decoupled":
            return None
        v = self.value(ctx)
        decoupled_pull_(self._local_params(), self.anchor,
                        [x * self.lam for x in self._lrs(ctx, lr)])
        return v

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "variant": self.variant}
