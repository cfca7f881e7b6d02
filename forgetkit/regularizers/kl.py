"""KL to the initial model on general data (LwF-style distillation; Li & Hoiem, 2017).

For every micro-batch of the fine-tuning task, ``penalty`` draws its *own* batch of
``batch_size`` examples from the general data ``data`` and returns::

    lambda * mean_{target tokens t} KL( p_theta0(. | x_<t) || p_theta(. | x_<t) )

with both distributions at temperature ``T`` (``softmax(z / T)``; no ``T^2`` factor -- lambda
absorbs it). The mean is over the target tokens of this rank's KL batch, so lambda is on the
same per-token scale as the task loss. The reference ``p_theta0`` is a frozen copy of the model as
it is in ``prepare`` (the initial weights), run under ``no_grad``.

Memory and compute cost: one full extra copy of the weights in the model dtype (no gradients, no
optimizer state) plus, per micro-batch, an extra forward of the reference and an extra
forward+backward of the trained model on the KL batch -- roughly 1.5-2x the compute of plain
fine-tuning when ``batch_size`` equals the micro-batch size.

Data order: KL batch ``k = call * world_size + rank`` takes examples ``[k*B, (k+1)*B)`` of an
endless stream of seeded permutations of the examples; ``state_dict`` holds the call counter,
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

import numpy as np
import torch
import torch.nn.functional as F

from forgetkit.data.templates import IGNORE_INDEX, Example
from forgetkit.regularizers.base import RegContext
from forgetkit.regularizers.fisher import is_dtensor, load_examples
from forgetkit.regularizers.l2 import backend_name, zero_stage

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
        data: ``DatasetSpec`` of the general data.
        batch_size: KL examples per micro-batch (config key ``fisher_batch_size``).
        temperature: softmax temperature.
        max_length: tokenisation length (the run's ``data.max_length``).
        train_on_prompt: targets on prompts too (the run's ``data.train_on_prompt``).
        pad_to_multiple_of: padding multiple.
        seed: seed of the example order.
        name: the name logged as ``reg/<name>`` (default ``kl``).
    """

    name = "kl"

    def __init__(self, lam: float, data: Any, *, batch_size: int = 8, temperature: float = 1.0,
                 max_length: int = 512, train_on_prompt: bool = False,
                 pad_to_multiple_of: int = 8, seed: int = 0, name: str | None = None) -> None:
        if data is None:
            raise ValueError("the KL regularizer needs a data source")
        self.lam, self.data, self.batch_size = float(lam), data, batch_size
        self.temperature, self.max_length = temperature, max_length
        self.train_on_prompt, self.pad_to_multiple_of, self.seed = (train_on_prompt,
                                                                    pad_to_multiple_of, seed)
        if name is not None:
            self.name = name
        self.calls = 0
        self.pad_id = 0
        self.examples: list[Example] = []
        self.reference: torch.nn.Module | None = None
        self._perm: dict[int, np.ndarray] = {}

    def prepare(self, ctx: RegContext) -> None:
        if backend_name(ctx) == "fsdp" or any(is_dtensor(p) for _, p in ctx.params()):
            raise NotImplementedError("the KL regularizer is not supported under FSDP yet "
                                      "(a sharded frozen reference is not implemented)")
        if zero_stage(ctx) == 3:
            raise NotImplementedError("the KL regularizer is not supported under ZeRO-3")
        self.examples = load_examples(self.data, ctx.tokenizer, max_length=self.max_length,
                                      train_on_prompt=self.train_on_prompt, seed=self.seed)
        if not self.examples:
            raise ValueError(f"KL: data {self.data} gave no examples")
        self.reference = copy.deepcopy(ctx.model).eval()
        self.reference.requires_grad_(False)
        self.pad_id = ctx.tokenizer.pad_token_id
        log.info("regularizer %s: KL to the initial model on %d examples, lambda=%g, T=%g",
                 self.name, len(self.examples), self.lam, self.temperature)

    def _indices(self, k: int) -> list[int]:
        n, out = len(self.examples), []
        for j in range(k * self.batch_size, (k + 1) * self.batch_size):
            epoch, i = divmod(j, n)
            if epoch not in self._perm:
                self._perm = {epoch: np.random.default_rng([self.seed, epoch, 0x4B1]).permutation(n)}
            out.append(int(self._perm[epoch][i]))
        return out

    def penalty(self, ctx: RegContext, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        from forgetkit.data.batching import collate

        k = self.calls * ctx.world_size + ctx.rank
        self.calls += 1
        kb = collate([self.examples[i] for i in self._indices(k)], self.pad_id,
                     self.pad_to_multiple_of)
        ids = kb["input_ids"].to(ctx.device)
        am = kb["attention_mask"].to(ctx.device)
        mask = kb["labels"].to(ctx.device) != IGNORE_INDEX
        ac = ctx.backend.autocast() if ctx.backend is not None else torch.autocast("cpu",
                                                                                  enabled=False)
        with ac:
            with torch.no_grad():
                ref = self.reference(input_ids=ids, attention_mask=am)  # type: ignore[misc]
            out = ctx.model(input_ids=ids, attention_mask=am)
        ref_l = ref.logits if hasattr(ref, "logits") else ref
        cur_l = out.logits if hasattr(out, "logits") else out
        val = self.lam * kl_divergence(ref_l, cur_l, mask, self.temperature)
        if ctx.world_size > 1:  # a global logged value; the gradient stays local
            g = val.detach().clone()
            if ctx.backend is not None:
                ctx.backend.all_reduce_sum(g)
            else:
                import torch.distributed as dist

                dist.all_reduce(g)
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
