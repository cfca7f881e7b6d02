"""LoRA (peft) inside forgetkit's training loop: ``training.lora``.

With ``training.lora`` set, the loop wraps the loaded model with peft's ``get_peft_model``
right after loading (before placement/sharding): every base weight is frozen
(``requires_grad=False``), and only the adapters ``lora_A`` (r x d_in, Kaiming-uniform init
drawn from the run's seeded torch RNG) and ``lora_B`` (d_out x r, zeros) of the
``target_modules`` train (plus the biases ``bias: all | lora_only`` asks for). A targeted
linear computes ``W x + (alpha / r) * B A dropout(x)``; at the start B = 0, so the wrapped
model is *exactly* the base model.

What changes under peft, and what forgetkit does about it:

* Parameter names get peft's prefix and suffixes: ``model.layers.0.self_attn.q_proj.weight``
  becomes ``base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight`` (frozen) next
  to ``...q_proj.lora_A.default.weight`` and ``...q_proj.lora_B.default.weight``. The
  optimizer, its groups and ``layer_lr_decay`` (:func:`forgetkit.train.optim.param_groups`: the
  layer index is found by ``.layers.<i>.`` anywhere in the name) see only the adapter
  parameters; regularizer ``include``/``exclude`` regexes are matched against these names
  (``re.search``: ``q_proj`` or ``layers\\.1\\.`` still work, a pattern anchored at
  ``^model.`` selects nothing and the regularizer then fails at start-up, naming it).
* Checkpoints hold the peft model's state (DCP, same names on resume because the same config
  rebuilds the same wrapped model) and the optimizer state of the adapters only; resume equals
  the uninterrupted run. The run identity contains ``training.lora.*``: a checkpoint of another
  rank/alpha/target set is refused.
* At the end ``model/`` is the adapter *merged* into a standard HF checkpoint
  (:func:`forgetkit.models.save_merged_lora`: peft ``merge_and_unload``, ``W + (alpha/r) B A``
  in the weights' dtype, then :func:`forgetkit.models.save_hf_checkpoint`), so every metric,
  WiSE-FT and the lm_eval CLI read it unchanged; ``adapter/`` holds the adapter alone
  (peft ``save_pretrained``: ``adapter_config.json`` + ``adapter_model.safetensors``).

Combinations (:func:`check_lora_config`, a ConfigError before anything is written):

* ``distributed.strategy`` fsdp or deepspeed: refused (not tested with peft here: FSDP2's
  per-layer ``fully_shard`` of frozen base weights next to trainable adapters and DeepSpeed's
  frozen-parameter partitions would need their own checkpoint/merge paths). single and DDP work
  (every rank holds the full wrapped model; rank 0 merges and saves).
* ``training.freeze`` (non-default): refused -- under LoRA every base weight is frozen already;
  narrow ``training.lora.target_modules`` to leave modules without adapters.
* L2-SP: allowed. Its anchors are the adapter's initial values (A0, B0 = 0): the penalty
  ``lambda/2 (||A - A0||^2 + ||B||^2)`` pulls B toward 0 and so the update ``(alpha/r) B A``
  toward 0, i.e. toward the base model -- in weight space of the adapter, not of the function:
  it is a weight decay of the adapter (a small ``||B||`` with a large ``||A||`` is still a
  large update, and A is also pulled to its random init).
* EWC: allowed. The Fisher is taken at the adapter's init, where B = 0 makes every gradient
  with respect to A exactly 0: F_A = 0 (A is unconstrained) and only B is pulled toward 0,
  weighted by ``E[(dL/dB)^2]`` on the general data. Meaningful as a curvature-weighted pull of
  the update toward the base model, only approximately (the Fisher depends on the random A0).
  A Fisher file made for a full fine-tune (other parameter names) is refused when loaded.
* KL to the initial model: allowed, unchanged: its reference is a frozen copy of the wrapped
  model at start (B = 0), i.e. exactly the base model.
"""

from __future__ import annotations

import difflib
import logging
from typing import Any

import torch

from forgetkit.config import Config, ConfigError, FreezeConfig, LoRAConfig

log = logging.getLogger("forgetkit")

# ``target_modules: [all-linear]`` is peft's shorthand (every linear layer but the output head).
ALL_LINEAR = "all-linear"
# Strategies LoRA is refused under (see the module docstring).
REFUSED_STRATEGIES = ("fsdp", "deepspeed")


def _supported_types() -> tuple[type, ...]:
    """Module types peft's LoRA can adapt (the ones forgetkit checks target names against)."""
    from transformers.pytorch_utils import Conv1D

    return (torch.nn.Linear, torch.nn.Embedding, torch.nn.Conv1d, torch.nn.Conv2d,
            torch.nn.Conv3d, Conv1D)


def check_lora_config(cfg: Config) -> None:
    """The combinations of ``training.lora`` with the rest of the config that cannot work
    (see the module docstring); nothing is loaded. No-op without ``training.lora``.

    Raises:
        ConfigError: naming the key and what to do instead.
    """
    lcfg = cfg.training.lora
    if lcfg is None:
        return
    strategy = cfg.distributed.strategy
    if strategy in REFUSED_STRATEGIES:
        raise ConfigError(
            f"training.lora with distributed.strategy '{strategy}' is not supported (peft "
            "adapters next to sharded frozen base weights are untested in forgetkit); use "
            "distributed.strategy ddp (or auto): LoRA's optimizer state and gradients are small, "
            "every process holds the full model")
    if cfg.training.freeze != FreezeConfig():
        raise ConfigError(
            "training.freeze has no effect with training.lora (every base weight is frozen "
            "already, only the adapters train); remove training.freeze, or narrow "
            "training.lora.target_modules to leave modules without adapters")
    if not lcfg.target_modules:
        raise ConfigError("training.lora.target_modules: empty; name the modules to adapt "
                          "(e.g. [q_proj, v_proj]) or [all-linear]")
    if ALL_LINEAR in lcfg.target_modules and len(lcfg.target_modules) > 1:
        raise ConfigError(f"training.lora.target_modules: {ALL_LINEAR!r} already means every "
                          f"linear layer; give it alone, got {lcfg.target_modules}")


def target_problems(model: torch.nn.Module, target_modules: list[str]) -> str | None:
    """Why ``target_modules`` (peft list semantics: a module whose full name equals an entry or
    ends with ``.<entry>``) does not fit ``model``, or None.

    Stricter than peft, which accepts a list as long as *one* entry matches: here every entry
    must match at least one module, and every module matched must be of a type LoRA adapts
    (Linear, Embedding, Conv, transformers' Conv1D).
    """
    if target_modules == [ALL_LINEAR]:
        return None
    supported = _supported_types()
    leaves = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                     if n and isinstance(m, supported)})
    for t in target_modules:
        hits = [(n, m) for n, m in model.named_modules()
                if n and (n == t or n.endswith("." + t))]
        if not hits:
            near = difflib.get_close_matches(t, leaves, n=1, cutoff=0.6)
            hint = (f"; did you mean {near[0]!r}?" if near else
                    f"; the model's adaptable modules are {leaves}")
            return f"{t!r} matches no module of the model{hint}"
        bad = [(n, m) for n, m in hits if not isinstance(m, supported)]
        if bad:
            n, m = bad[0]
            return (f"{t!r} matches {n} ({type(m).__name__}), which LoRA cannot adapt (only "
                    f"Linear, Embedding, Conv layers); adaptable modules are {leaves}")
    return None


def lora_peft_config(lcfg: LoRAConfig) -> Any:
    """peft's ``LoraConfig`` for forgetkit's :class:`LoRAConfig` (task type CAUSAL_LM)."""
    from peft import LoraConfig, TaskType

    targets: str | list[str] = (ALL_LINEAR if lcfg.target_modules == [ALL_LINEAR]
                                else list(lcfg.target_modules))
    return LoraConfig(r=lcfg.r, lora_alpha=lcfg.alpha, lora_dropout=lcfg.dropout,
                      target_modules=targets, bias=lcfg.bias, task_type=TaskType.CAUSAL_LM)


def _short(n: int) -> str:
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n / div:.3g}{unit}"
    return str(n)


def apply_lora(model: torch.nn.Module, lcfg: LoRAConfig) -> tuple[torch.nn.Module,
                                                                   dict[str, Any]]:
    """Wrap ``model`` with peft LoRA adapters; only they (and the asked-for biases) train.

    Returns the ``PeftModelForCausalLM`` and a summary for ``train_result.json``: r, alpha,
    dropout, bias, target_modules, ``adapted_modules`` (how many modules got an adapter),
    ``trainable_params``, ``total_params`` (base + adapters; tied weights once, as peft counts)
    and ``trainable_percent``. Logs "LoRA r=8: 1.2M of 135M parameters trainable (0.9 %)".

    Raises:
        ConfigError: a target module name matches no module, or one LoRA cannot adapt.
    """
    from peft import get_peft_model
    from peft.tuners.lora import LoraLayer

    from forgetkit.models import count_parameters

    problem = target_problems(model, list(lcfg.target_modules))
    if problem is not None:
        raise ConfigError(f"training.lora.target_modules: {problem}")
    try:
        peft_model = get_peft_model(model, lora_peft_config(lcfg))
    except ValueError as e:  # peft's own refusals (e.g. NoMatchingPeftModuleError)
        raise ConfigError(f"training.lora: peft refuses the config: {e}") from None
    trainable, total = count_parameters(peft_model)
    adapted = sum(1 for m in peft_model.modules() if isinstance(m, LoraLayer))
    pct = 100.0 * trainable / max(total, 1)
    log.info("LoRA r=%d: %s of %s parameters trainable (%.2g %%); alpha %g, dropout %g, "
             "%d modules adapted (%s), bias %s", lcfg.r, _short(trainable), _short(total), pct,
             lcfg.alpha, lcfg.dropout, adapted, ", ".join(lcfg.target_modules), lcfg.bias)
    info = {"r": lcfg.r, "alpha": lcfg.alpha, "dropout": lcfg.dropout, "bias": lcfg.bias,
            "target_modules": list(lcfg.target_modules), "adapted_modules": adapted,
            "trainable_params": trainable, "total_params": total, "trainable_percent": pct}
    return peft_model, info


def check_lora_targets(cfg: Config) -> str:
    """Preflight: the target modules against the model built on the meta device (no weights
    loaded; a hub or local model needs only its config). Returns a one-line description.

    Raises:
        ConfigError: as :func:`check_lora_config`, or a target name that fits no module.
    """
    from transformers import AutoModelForCausalLM

    from forgetkit.models import hf_config

    check_lora_config(cfg)
    lcfg = cfg.training.lora
    if lcfg is None:
        return "no LoRA"
    config = hf_config(cfg.model)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    problem = target_problems(model, list(lcfg.target_modules))
    if problem is not None:
        raise ConfigError(f"training.lora.target_modules: {problem}")
    return f"LoRA r={lcfg.r} on {', '.join(lcfg.target_modules)}"
