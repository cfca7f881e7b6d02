"""The seam between a training loop and the regularizers.

A loop (forgetkit's own, ``transformers.Trainer`` through :mod:`forgetkit.integrations`, or
yours) calls every regularizer at fixed, visible points, in this order::

    prepare(ctx)                      once, after the model is placed/sharded, before training
    for each optimizer step:
        penalty(ctx, batch) -> loss   per micro-batch, added to the task loss (autograd), or None
        ... backward over all micro-batches (gradients now reduced across ranks) ...
        grad_term(ctx) -> value       adds its gradient into p.grad in place (no autograd graph)
        ... clip, optimizer step ...
        after_step(ctx, lr)           e.g. a decoupled pull toward theta0
    state_dict() / load_state_dict()  checkpoints and resume

What a regularizer may use is exactly the typed fields of :class:`RegContext`: it never sees the
loop, its backend object, its optimizer or its data pipeline. Every example set it needs (EWC's
Fisher batches, KL's batches) is built by the data layer (:mod:`forgetkit.data`) and handed to
its constructor as batches.

Every method returns the *value* it wants logged (a 0-dim tensor, kept on device), or None. The
value must be global: identical on every rank (a regularizer over sharded parameters all-reduces
its partial sums with ``ctx.all_reduce_sum``). The loop logs it as ``reg/<name>`` without a host
sync per step. Regularizers never import a loop.

``state_dict()`` holds plain values only (dicts with string keys, lists, str, numbers, bools,
None) and, where needed, tensors: the loop writes it as JSON plus a safetensors file, never as a
pickle (a pickled checkpoint runs whatever a crafted file names on resume). Tuples come back as
lists.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import torch

Strategy = Literal["single", "ddp", "fsdp", "deepspeed"]


def _dist_all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """In-place sum over the default process group (nothing when there is none)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


@dataclass
class RegContext:
    """Everything a regularizer may use, as typed fields a loop supplies.

    Attributes:
        model: the model as the loop runs it forward (wrapped by DDP/FSDP/DeepSpeed where it
            is): a penalty that needs a forward pass (KL) calls it.
        params: ``() -> iterator of (name, parameter)`` as the optimizer sees them: full
            tensors for a single process and DDP, local DTensor shards under FSDP. Names are the
            unwrapped model's (``model.layers.0.mlp.up_proj.weight``).
        device: where the parameters live.
        rank, world_size: this process and the number of processes.
        strategy: ``single``, ``ddp``, ``fsdp`` or ``deepspeed``.
        zero_stage: the DeepSpeed ZeRO stage (None otherwise).
        grads_in_params: after backward, ``p.grad`` holds the reduced gradient (False under
            DeepSpeed, whose gradients live in its partitions: a gradient-space term must then go
            through the loss instead).
        all_reduce_sum: in-place sum of a tensor over ranks (identity for one process).
        autocast: ``() -> context manager`` the loop runs forward passes in.
        param_lr: ``(parameter) -> its optimizer group's current learning rate``, or None when
            the loop cannot say (a decoupled pull then uses the ``lr`` passed to ``after_step``).
    """

    model: torch.nn.Module
    params: Callable[[], Iterator[tuple[str, torch.nn.Parameter]]]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    strategy: Strategy = "single"
    zero_stage: int | None = None
    grads_in_params: bool = True
    all_reduce_sum: Callable[[torch.Tensor], Any] = _dist_all_reduce_sum
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    param_lr: Callable[[torch.nn.Parameter], float | None] | None = None

    def named_params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self.params()


def optimizer_lr_lookup(optimizer: Any) -> Callable[[torch.nn.Parameter], float | None]:
    """``param_lr`` for a ``torch.optim.Optimizer``: the current lr of the group holding a
    parameter (read at call time, so schedulers are followed), None if no group holds it."""
    cache: dict[int, dict[str, Any]] = {}

    def lookup(p: torch.nn.Parameter) -> float | None:
        groups = getattr(optimizer, "param_groups", None) or []
        if not cache:
            cache.update({id(q): g for g in groups for q in g["params"]})
        g = cache.get(id(p))
        return float(g["lr"]) if g is not None else None

    return lookup


@runtime_checkable
class Regularizer(Protocol):
    name: str

    def prepare(self, ctx: RegContext) -> None: ...

    def penalty(self, ctx: RegContext, batch: dict[str, torch.Tensor]) -> torch.Tensor | None: ...

    def grad_term(self, ctx: RegContext) -> torch.Tensor | None: ...

    def after_step(self, ctx: RegContext, lr: float) -> torch.Tensor | None: ...

    def state_dict(self) -> dict[str, Any]: ...  # plain values and tensors (see above)

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
