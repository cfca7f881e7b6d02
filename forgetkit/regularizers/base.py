"""The seam between the training loop and the regularizers.

The loop calls every regularizer at fixed, visible points, in this order::

    prepare(ctx)                      once, after the model is placed/sharded, before wrapping
    for each optimizer step:
        penalty(ctx, batch) -> loss   per micro-batch, added to the task loss (autograd), or None
        ... backward over all micro-batches (gradients now reduced across ranks) ...
        grad_term(ctx) -> value       adds its gradient into p.grad in place (no autograd graph)
        ... clip, optimizer step ...
        after_step(ctx, lr)           e.g. a decoupled pull toward theta0
    state_dict() / load_state_dict()  checkpoints and resume

Every method returns the *value* it wants logged (a 0-dim tensor, kept on device), or None. The
value must be global: identical on every rank (a regularizer over sharded parameters all-reduces
its partial sums). The loop logs it as ``reg/<name>`` without a host sync per step.
Regularizers never import the loop.

``state_dict()`` holds plain values only (dicts with string keys, lists, str, numbers, bools,
None) and, where needed, tensors: the loop writes it as JSON plus a safetensors file, never as a
pickle (a pickled checkpoint runs whatever a crafted file names on resume). Tuples come back as
lists.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass
class RegContext:
    """What a regularizer may use. ``params`` yields (name, parameter) as the optimizer sees
    them: full tensors for single/DDP, local DTensor shards under FSDP."""

    model: torch.nn.Module
    params: Any  # callable () -> Iterator[tuple[str, torch.nn.Parameter]]
    device: torch.device
    rank: int = 0
    world_size: int = 1
    tokenizer: Any = None
    backend: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def named_params(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return self.params()


@runtime_checkable
class Regularizer(Protocol):
    name: str

    def prepare(self, ctx: RegContext) -> None: ...

    def penalty(self, ctx: RegContext, batch: dict[str, torch.Tensor]) -> torch.Tensor | None: ...

    def grad_term(self, ctx: RegContext) -> torch.Tensor | None: ...

    def after_step(self, ctx: RegContext, lr: float) -> torch.Tensor | None: ...

    def state_dict(self) -> dict[str, Any]: ...  # plain values and tensors (see above)

    def load_state_dict(self, state: dict[str, Any]) -> None: ...
