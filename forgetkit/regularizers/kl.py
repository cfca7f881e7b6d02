"""KL to the initial model on general data (LwF-style distillation; Li & Hoiem, 2017).

For every micro-batch of the fine-tuning task, ``penalty`` draws its *own* batch from a
:class:`forgetkit.data.batching.BatchStream` over the general data (built by the data layer) and
returns::

    lambda * mean_{target tokens t} KL( p_theta0(. | x_<t) || p_theta(. | x_<t) )

with both distributions at temperature ``T`` (``softmax(z / T)``; no ``T^2`` factor -- lambda
absorbs it). The mean is over the target tokens of this rank's KL batch, so lambda is on the
same per-token scale as the task loss. The reference ``p_theta0`` is a frozen copy of the model as
it is in ``prepare`` (the initial weights) -- or as it was at ``capture_reference(model)``, for
loops that load a checkpoint into the model before ``prepare`` -- run under ``no_grad``.

Memory and compute cost: one full extra copy of the weights in the model dtype (no gradients, no
optimizer state) plus, per micro-batch, an extra forward of the reference and an extra
forward+backward of the trained model on the KL batch -- roughly 1.5-2x the compute of plain
fine-tuning when ``batch_size`` equals the micro-batch size.

Data order: KL batch ``k = call * world_size + rank`` is the stream's batch ``k`` (examples
``[k*B, (k+1)*B)`` of an endless stream of seeded permutations); ``state_dict`` holds the call
counter,
so a resumed run continues with exactly the batches the uninterrupted run would have used. The
returned value is averaged over ranks (a scalar all-reduce per call) so the logged ``reg/<name>``
is global, while its gradient stays local (DDP averages gradients anyway).

Supported: single process, DDP, DeepSpeed ZeRO-1/2. FSDP and ZeRO-3 raise at ``prepare`` (a
sharded frozen reference is not implemented).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F

from forgetkit.data.batching import BatchStream
from forgetkit.data.templates import IGNORE_INDEX
from forgetkit.regularizers.base import RegContext
from forgetkit.regularizers.fisher import is_dtensor
from forgetkit.regularizers.l2 import zero_stage

log = logging.getLogger("forgetkit")


def kl_divergence(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor,
                  temperature: float = 1.0) -> torch.Tensor:
    """Mean over masked positions of ``KL(softmax(ref/T) || softmax(logits/T))`` (fp32).

    Args:
        ref_logits: (..., V) logits of the reference (no gradient needed).
        logits: (..., V) logits of the trained model.
        mask: (...) boolean positions to average over.
        temperature: softmax temperature T.

    Returns:
        A 0-dim fp32 tensor (0 when the mask is empty).
    """
    ref = F.log_softmax(ref_logits[mask].float() / temperature, dim=-1)
    cur = F.log_softmax(logits[mask].float() / temperature, dim=-1)
    if ref.shape[0] == 0:
        return logits.sum() * 0.0
    kl = (ref.exp() * (ref - cur)).sum(-1)
    return kl.mean()


class KLToInit:
    """LwF-style KL to the frozen initial model on general data (see the module docstring).

    Args:
        lam: strength lambda.
        batches: the stream of general-data batches (pre-shifted labels: targets are the
            positions whose label is not ignored).
        temperature: softmax temperature.
        name: the name logged as ``reg/<name>`` (default ``kl``).
    """

    name = "kl"
    kind = "kl"

    def __init__(self, lam: float, batches: BatchStream, *, temperature: float = 1.0,
                 name: str | None = None) -> None:
        if batches is None:
            raise ValueError("the KL regularizer needs a stream of general-data batches")
        if lam < 0:
            raise ValueError(f"lambda must be >= 0, got {lam}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.lam, self.batches, self.temperature = float(lam), batches, float(temperature)
        if name is not None:
            self.name = name
        self.calls = 0
        self.reference: torch.nn.Module | None = None

    def capture_reference(self, model: torch.nn.Module) -> None:
        """Freeze a copy of ``model`` as it is now as the reference (one full model copy)."""
        self.reference = copy.deepcopy(model).eval()
        self.reference.requires_grad_(False)

    def prepare(self, ctx: RegContext) -> None:
        if ctx.strategy == "fsdp" or any(is_dtensor(p) for _, p in ctx.params()):
            raise NotImplementedError("the KL regularizer is not supported under FSDP yet "
                                      "(a sharded frozen reference is not implemented)")
        if zero_stage(ctx) == 3:
            raise NotImplementedError("the KL regularizer is not supported under ZeRO-3")
        if self.reference is None:
            model = ctx.model
            model = getattr(model, "module", model)  # DDP/DeepSpeed wrappers hold the module
            self.capture_reference(model)
        self.reference.to(ctx.device)  # type: ignore[union-attr]
        log.info("regularizer %s: KL to the initial model on %d examples, lambda=%g, T=%g",
                 self.name, len(self.batches), self.lam, self.temperature)

    def penalty(self, ctx: RegContext, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        k = self.calls * ctx.world_size + ctx.rank
        self.calls += 1
        kb = self.batches.batch(k)
        ids = kb["input_ids"].to(ctx.device)
        am = kb["attention_mask"].to(ctx.device)
        mask = kb["labels"].to(ctx.device) != IGNORE_INDEX
        with ctx.autocast():
            with torch.no_grad():
                ref = self.reference(input_ids=ids, attention_mask=am)  # type: ignore[misc]
            out = ctx.model(input_ids=ids, attention_mask=am)
        ref_l = ref.logits if hasattr(ref, "logits") else ref
        cur_l = out.logits if hasattr(out, "logits") else out
        val = self.lam * kl_divergence(ref_l, cur_l, mask, self.temperature)
        if ctx.world_size > 1:  # a global logged value; the gradient stays local
            g = val.detach().clone()
            ctx.all_reduce_sum(g)
            val = val + (g / ctx.world_size - val.detach())
        return val

    def grad_term(self, ctx: RegContext) -> torch.Tensor | None:
        return None

    def after_step(self, ctx: RegContext, lr: float) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "kl", "calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state.get("calls", 0))
