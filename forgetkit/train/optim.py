"""Parameter groups, optimizers and learning-rate schedules (pure functions of the config).

The schedules are transformers' own (``transformers.optimization``), so forgetkit's loop and a
``transformers.Trainer`` given :func:`trainer_schedule_args` use the same learning rate on every
optimizer step. ``training.scheduler`` maps to:

==========  ==============================================  ===========================
forgetkit   transformers function                           ``lr_scheduler_type``
==========  ==============================================  ===========================
cosine      ``get_cosine_with_min_lr_schedule_with_warmup``  ``cosine_with_min_lr``
            (``min_lr_rate = training.min_lr_ratio``)
linear      ``get_linear_schedule_with_warmup``             ``linear``
constant    ``get_constant_schedule_with_warmup``           ``constant_with_warmup``
==========  ==============================================  ===========================

Their numerics, for optimizer step ``s`` (0-based: the factor the step ``s`` update uses),
``W`` warmup steps and ``N`` total steps: warmup ``s / W`` for ``s < W`` -- so step 0 uses
lr 0 and the peak is first reached at step ``W`` --, then with ``p = (s - W) / max(1, N - W)``:
cosine ``r + (1 - r) * 0.5 * (1 + cos(pi * p))`` (``r`` = min_lr_ratio; the floor itself is
reached only at ``s = N``, one past the last step), linear ``max(0, (N - s) / max(1, N - W))``,
constant ``1``. With ``0 < W < N`` the peak is used by exactly one step for cosine
(``r < 1``) and linear. (forgetkit before issue 13 used ``(s + 1) / W`` during warmup, which
matches neither scheduler and used the peak on two consecutive steps.)
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import torch

from forgetkit.config import ConfigError, TrainingConfig

_LAYER_RE = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_depth(name: str, n_layers: int) -> int:
    """Depth from the top used by discriminative learning rates.

    0 for the head and final norm, ``n_layers - i`` for decoder layer ``i`` (0-based from the
    bottom), ``n_layers + 1`` for the embeddings (the lowest learning rate).
    """
    m = _LAYER_RE.search("." + name)
    if m:
        return n_layers - int(m.group(1))
    if "embed" in name or "wte" in name or "wpe" in name:
        return n_layers + 1
    return 0


def count_layers(names: Iterable[str]) -> int:
    idx = [int(m.group(1)) for n in names if (m := _LAYER_RE.search("." + n))]
    return max(idx) + 1 if idx else 0


def param_groups(named_params: list[tuple[str, torch.nn.Parameter]], cfg: TrainingConfig
                 ) -> list[dict]:
    """AdamW groups: no weight decay for 1-D tensors (norms, biases); per-depth lr scales.

    Each group carries ``lr_scale`` and starts at ``lr = cfg.lr * lr_scale``; the schedule sets
    ``lr = peak * lr_scale * factor(step)`` (:func:`set_lr`, :func:`build_scheduler`).

    Frozen parameters (``requires_grad=False``: ``training.freeze``, see
    :mod:`forgetkit.train.freeze`, or LoRA's base weights) are in no group, so the optimizer
    allocates no state for them and weight decay never touches them. The depths are still
    counted over *all* names, so freezing the bottom layers leaves the other layers' lr scales
    as they were. Raises ConfigError when no parameter is trainable.
    """
    n_layers = count_layers(n for n, _ in named_params)
    groups: dict[tuple[bool, int], dict] = {}
    for name, p in named_params:
        if not p.requires_grad:
            continue
        decay = p.ndim >= 2 and cfg.weight_decay > 0
        depth = layer_depth(name, n_layers) if cfg.layer_lr_decay is not None else 0
        key = (decay, depth)
        if key not in groups:
            scale = (cfg.layer_lr_decay ** depth) if cfg.layer_lr_decay is not None else 1.0
            groups[key] = {"params": [], "names": [], "weight_decay":
                           cfg.weight_decay if decay else 0.0, "lr_scale": scale,
                           "lr": cfg.lr * scale}
        groups[key]["params"].append(p)
        groups[key]["names"].append(name)
    if not groups:
        raise ConfigError("no trainable parameter: every parameter has requires_grad=False "
                          "(training.freeze or training.lora leave nothing to optimize)")
    return [groups[k] for k in sorted(groups)]


def build_optimizer(groups: list[dict], cfg: TrainingConfig, device: torch.device
                    ) -> torch.optim.Optimizer:
    # torch optimizers reject unknown keys? No: extra keys ("names", "lr_scale") are kept.
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               foreach=True)
    if cfg.optimizer == "adamw_8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise RuntimeError("training.optimizer=adamw_8bit needs bitsandbytes: "
                               "pip install 'forgetkit[bnb]' (CUDA only)") from None
        return bnb.optim.AdamW8bit(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    kw = {"lr": cfg.lr, "betas": tuple(cfg.betas), "eps": cfg.eps}
    if cfg.fused == "off":
        return torch.optim.AdamW(groups, foreach=True, **kw)
    if cfg.fused == "on":
        return torch.optim.AdamW(groups, fused=True, **kw)
    # auto: fused kernels exist for CUDA and (torch >= 2.4) CPU fp32/bf16 tensors.
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, foreach=True, **kw)


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    """Number of warmup steps: ``training.warmup_steps`` if set, else
    ``ceil(warmup_ratio * total_steps)``.

    transformers 5 has no ``warmup_ratio`` argument any more: ``TrainingArguments.warmup_steps``
    below 1 is read as a ratio, ``math.ceil(num_training_steps * warmup_steps)`` -- the same
    product (IEEE multiplication commutes), hence the same count, including its rounding up of
    float noise (ratio 0.07 of 100 steps: ``0.07 * 100 = 7.000000000000001`` -> 8, in both).
    They differ at ratio 1.0, which transformers reads as *one* step (``int(1.0)``) and forgetkit
    as all ``total_steps``; :func:`trainer_schedule_args` therefore always passes the integer.
    """
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(math.ceil(cfg.warmup_ratio * total_steps))


# forgetkit's ``training.scheduler`` -> transformers' ``SchedulerType`` giving the same schedule.
# ("constant" in transformers ignores warmup; "constant_with_warmup" with 0 steps is 1.0 always.)
TRAINER_SCHEDULER_TYPE: dict[str, str] = {"cosine": "cosine_with_min_lr", "linear": "linear",
                                          "constant": "constant_with_warmup"}


def _transformers_scheduler(optimizer: torch.optim.Optimizer, kind: str, warmup: int,
                            total_steps: int, min_ratio: float
                            ) -> torch.optim.lr_scheduler.LambdaLR:
    # Imported here: transformers.optimization is slow to import and only needed once a
    # schedule is built.
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    if kind == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(
            optimizer, num_warmup_steps=warmup, num_training_steps=total_steps,
            min_lr_rate=min_ratio)
    if kind == "linear":
        return get_linear_schedule_with_warmup(optimizer, num_warmup_steps=warmup,
                                               num_training_steps=total_steps)
    if kind == "constant":
        return get_constant_schedule_with_warmup(optimizer, num_warmup_steps=warmup)
    raise ValueError(f"unknown schedule {kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainingConfig, total_steps: int
                    ) -> torch.optim.lr_scheduler.LambdaLR:
    """transformers' scheduler for ``training.scheduler`` over ``total_steps`` optimizer steps.

    A ``LambdaLR``: each group's lr becomes ``initial_lr * factor(s)``, where ``initial_lr`` is
    the group's lr when the scheduler is built (``cfg.lr * lr_scale`` for the groups of
    :func:`param_groups`: build it on a fresh optimizer) and ``s`` counts ``scheduler.step()``
    calls (one after every ``optimizer.step()``, as the Trainer does). Construction already sets
    the lr of step 0. :func:`lr_at` gives the same factors statelessly.
    """
    return _transformers_scheduler(optimizer, cfg.scheduler, warmup_steps(cfg, total_steps),
                                   total_steps, cfg.min_lr_ratio)


@functools.lru_cache(maxsize=32)
def _schedule_lambda(kind: str, warmup: int, total_steps: int, min_ratio: float
                     ) -> Callable[[int], float]:
    """The very ``lr_lambda`` transformers builds, taken from a scheduler on a 1-element probe
    optimizer (only public transformers functions are used)."""
    probe = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    return _transformers_scheduler(probe, kind, warmup, total_steps, min_ratio).lr_lambdas[0]


def lr_at(cfg: TrainingConfig, total_steps: int, step: int) -> float:
    """Factor of the peak lr used by optimizer step ``step`` (0-based), out of ``total_steps``.

    Exactly transformers' lambda (see the module docstring), stateless: a resumed run computes
    the factor of any step without scheduler state. ``lr_at(cfg, N, s) * cfg.lr`` equals the lr
    a ``Trainer`` with :func:`trainer_schedule_args` uses at step ``s`` (bit for bit).
    """
    return float(_schedule_lambda(cfg.scheduler, warmup_steps(cfg, total_steps), total_steps,
                                  float(cfg.min_lr_ratio))(step))


def trainer_schedule_args(cfg: TrainingConfig, total_steps: int) -> dict[str, Any]:
    """``TrainingArguments`` keywords that give a ``transformers.Trainer`` this schedule.

    ``learning_rate``, ``lr_scheduler_type``, ``lr_scheduler_kwargs`` (``min_lr_rate`` for
    cosine), ``warmup_steps`` (always the integer count, see :func:`warmup_steps`) and
    ``max_steps``. Only the schedule: a Trainer has no per-layer lrs (``layer_lr_decay``).
    """
    kwargs: dict[str, Any] = ({"min_lr_rate": float(cfg.min_lr_ratio)}
                              if cfg.scheduler == "cosine" else {})
    return {"learning_rate": cfg.lr, "lr_scheduler_type": TRAINER_SCHEDULER_TYPE[cfg.scheduler],
            "lr_scheduler_kwargs": kwargs, "warmup_steps": warmup_steps(cfg, total_steps),
            "max_steps": total_steps}


def set_lr(optimizer: torch.optim.Optimizer, peak: float, factor: float) -> float:
    """Set every group's lr to ``peak * lr_scale * factor``; return ``peak * factor``.

    ``lr_scale`` is the group's discriminative scale from :func:`param_groups` (1.0 when
    absent). The product is evaluated as ``(peak * lr_scale) * factor``, the order of a
    ``LambdaLR`` (``initial_lr * factor`` with ``initial_lr = cfg.lr * lr_scale``), so each group
    gets bit for bit the lr :func:`build_scheduler` would give it. The returned value is the lr
    of a scale-1 group (what the log records and decoupled regularizers use).
    """
    for g in optimizer.param_groups:
        g["lr"] = peak * g.get("lr_scale", 1.0) * factor
    return peak * factor
