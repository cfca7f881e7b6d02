"""Parameter groups, optimizers and learning-rate schedules (pure functions of the config)."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch

from forgetkit.config import TrainingConfig

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

    Each group carries ``lr_scale``; the schedule sets ``lr = peak * factor(step) * lr_scale``.
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
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return int(math.ceil(cfg.warmup_ratio * total_steps))


def lr_factor(step: int, total_steps: int, warmup: int, kind: str, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based; the lr used *by* it).

    Linear warmup from peak/(warmup) at step 0 to peak at ``warmup``; then
    ``cosine``: to ``min_ratio`` at the last step, ``linear``: to 0 at the end, ``constant``: 1.
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    span = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / span)
    if kind == "linear":
        return 1.0 - progress
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {kind!r}")


def set_lr(optimizer: torch.optim.Optimizer, peak: float, factor: float) -> float:
    lr = peak * factor
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)
    return lr
