"""Freezing: keep chosen parameters at their initial values (``training.freeze``).

Three selectors, combined by union (:class:`forgetkit.config.FreezeConfig`):

``embeddings``
    the input embedding module (``model.get_input_embeddings()``). When the output head is tied
    to it (``lm_head.weight`` *is* ``embed_tokens.weight``, e.g. ``tie_word_embeddings``), the
    head is the same tensor and is frozen with it; the log and :class:`FreezeSummary` say so.
    Learned position embeddings (GPT-2 ``wpe``) are not included: add a pattern for them.
``bottom_layers: k``
    decoder layers ``0 .. k-1`` counted from the input. The layers are the model's repeated
    block list (:func:`decoder_module_list`: the same-typed ``ModuleList`` whose length is the
    config's ``num_hidden_layers``, so a per-layer list of MoE experts is never taken for it).
``patterns``
    regular expressions, ``re.search`` on every parameter name as ``model.named_parameters
    (remove_duplicate=False)`` spells it (``model.layers.0.self_attn.q_proj.weight``); a tied
    tensor matches under any of its names.

How it keeps them bitwise equal to the base: :func:`apply_freeze` sets ``requires_grad=False``
on the loaded model *before* sharding, wrapping and optimizer construction. Autograd then
computes no gradient for them, DDP leaves them out of its reducer (no ``find_unused_parameters``
needed), FSDP2 reduce-scatters only parameters that have a gradient (mixed ``requires_grad``
inside one ``fully_shard`` unit is supported by torch 2.13's FSDP2: ``FSDPParamGroup`` keeps
per-parameter ``requires_grad``), :func:`forgetkit.train.optim.param_groups` puts them in no
group (so AdamW/SGD hold no state for them and weight decay never touches them) and the
regularizers select only trainable parameters (:func:`forgetkit.regularizers.l2.select_params`),
so neither a gradient term nor a decoupled pull ever writes them. No arithmetic touches a frozen
tensor, so "unchanged" is exact, not up to rounding.

Refused (:class:`ConfigError`, before anything is written): a pattern that is not a regex or is
empty, a pattern that matches no parameter, ``bottom_layers`` >= the number of decoder layers, a
selection that freezes every parameter, freezing together with ``training.lora`` (peft already
freezes every base weight), and DeepSpeed with ``mixed_precision`` bf16/fp16 (the engine casts
every module parameter to 16 bits and keeps fp32 masters only for the ones it optimizes: a
frozen weight would be saved rounded).
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from forgetkit.config import Config, ConfigError, FreezeConfig, TrainingConfig
from forgetkit.train.distributed import decoder_layers
from forgetkit.train.optim import count_layers

log = logging.getLogger("forgetkit")

__all__ = ["FreezeSummary", "apply_freeze", "check_freeze", "decoder_module_list",
           "freeze_active"]

_KEY = "training.freeze"


@dataclass
class FreezeSummary:
    """What :func:`apply_freeze` froze. Counts are elements (tied tensors counted once).

    ``frozen_parameters`` of ``total_parameters`` (``trainable_parameters`` = the difference),
    ``frozen_tensors`` of ``total_tensors``; ``embeddings``: the input embeddings are frozen;
    ``tied_head``: the name of an output head tied to them (frozen with them), else None;
    ``layers``: the frozen decoder layer indices, of ``n_layers``; ``pattern_matches``: tensors
    each pattern matched (in config order); ``names``: every frozen tensor's first name.
    """

    frozen_parameters: int = 0
    total_parameters: int = 0
    frozen_tensors: int = 0
    total_tensors: int = 0
    embeddings: bool = False
    tied_head: str | None = None
    layers: list[int] = field(default_factory=list)
    n_layers: int = 0
    pattern_matches: dict[str, int] = field(default_factory=dict)
    names: list[str] = field(default_factory=list)

    @property
    def trainable_parameters(self) -> int:
        return self.total_parameters - self.frozen_parameters

    @property
    def fraction(self) -> float:
        """Frozen share of all parameter elements (0 for an empty model)."""
        return self.frozen_parameters / self.total_parameters if self.total_parameters else 0.0

    def describe(self) -> str:
        """``frozen: N of M parameters (x %): embeddings, layers 0-3, 2 pattern matches; a of b
        tensors`` (the tied head, when frozen with the embeddings, is named after them)."""
        parts = []
        if self.embeddings:
            parts.append("embeddings" + (f" (with the tied output head {self.tied_head})"
                                         if self.tied_head else ""))
        if self.layers:
            a, b = self.layers[0], self.layers[-1]
            parts.append(f"layer {a}" if a == b else f"layers {a}-{b}")
        if self.pattern_matches:
            n = sum(self.pattern_matches.values())
            parts.append(f"{n} pattern match{'es' if n != 1 else ''}")
        return (f"frozen: {self.frozen_parameters:,} of {self.total_parameters:,} parameters "
                f"({100 * self.fraction:.2f} %): {', '.join(parts) or 'nothing'}; "
                f"{self.frozen_tensors} of {self.total_tensors} tensors")

    def to_dict(self) -> dict[str, Any]:
        """The ``freeze`` entry of ``train_result.json`` (``names`` left out: see the log)."""
        d = asdict(self)
        d.pop("names")
        d["trainable_parameters"] = self.trainable_parameters
        d["fraction"] = self.fraction
        return d


def _freeze_cfg(cfg: Config | TrainingConfig | FreezeConfig) -> FreezeConfig:
    if isinstance(cfg, FreezeConfig):
        return cfg
    if isinstance(cfg, TrainingConfig):
        return cfg.freeze
    return cfg.training.freeze


def freeze_active(cfg: Config | TrainingConfig | FreezeConfig) -> bool:
    """Whether the config freezes anything at all."""
    f = _freeze_cfg(cfg)
    return bool(f.embeddings or f.bottom_layers or f.patterns)


def _compile(patterns: list[str]) -> list[re.Pattern[str]]:
    out = []
    for i, pat in enumerate(patterns):
        if pat == "":
            raise ConfigError(f"{_KEY}.patterns[{i}]: the empty pattern matches every parameter "
                              "name; expected a regex of the names to freeze")
        try:
            out.append(re.compile(pat))
        except re.error as e:
            raise ConfigError(f"{_KEY}.patterns[{i}]: {pat!r} is not a valid regular expression "
                              f"({e})") from None
    return out


def check_freeze(cfg: Config | TrainingConfig | FreezeConfig) -> None:
    """Config-only checks of ``training.freeze`` (no model needed): call from preflight and
    before the model is loaded. Raises :class:`ConfigError` with a one-line message.

    Checks: every pattern is a non-empty valid regex; with a full :class:`Config` also that
    freezing is not combined with ``training.lora``, not with DeepSpeed bf16/fp16, and (for a
    ``model.random_init`` whose ``num_hidden_layers`` is known) that ``bottom_layers`` leaves at
    least one decoder layer. Model-dependent checks happen in :func:`apply_freeze`.
    """
    f = _freeze_cfg(cfg)
    _compile(f.patterns)
    if not isinstance(cfg, Config) or not freeze_active(f):
        return
    if cfg.training.lora is not None:
        raise ConfigError(f"{_KEY}: freezing is not combined with training.lora: LoRA already "
                          "keeps every base weight frozen and trains only its adapters; choose "
                          "which adapters train with training.lora.target_modules, or drop "
                          "training.lora to freeze parts of a full fine-tune")
    if cfg.distributed.strategy == "deepspeed" and cfg.training.mixed_precision != "no":
        raise ConfigError(
            f"{_KEY}: not possible with distributed.strategy 'deepspeed' and "
            f"training.mixed_precision '{cfg.training.mixed_precision}': the engine casts every "
            "parameter to 16 bits and keeps fp32 masters only for the parameters it optimizes, "
            "so frozen weights would be saved rounded; use strategy ddp or fsdp (their mixed "
            "precision keeps fp32 weights) or mixed_precision 'no'")
    ri = cfg.model.random_init
    n = ri.get("num_hidden_layers") if isinstance(ri, dict) else None
    if isinstance(n, int) and f.bottom_layers >= n:
        raise ConfigError(_too_many_layers(f.bottom_layers, n))


def _too_many_layers(k: int, n: int) -> str:
    return (f"{_KEY}.bottom_layers: {k} freezes every decoder layer of a model with {n}; "
            f"expected at most {n - 1} (layers 0..k-1 are frozen)")


def decoder_module_list(model: torch.nn.Module) -> tuple[str, list[torch.nn.Module]]:
    """(module name, layers) of the model's decoder block list, bottom (input side) first.

    Among the ``ModuleList``s of one module type, the one whose length is the (text) config's
    ``num_hidden_layers``; several such (an encoder and a decoder): the one named like
    ``layers``/``h``/``blocks``/``layer``, then the first. Without such a config attribute,
    :func:`forgetkit.train.distributed.decoder_layers` (the longest such list). ``("", [])``
    when there is none.
    """
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config()
    n = getattr(config, "num_hidden_layers", None)
    lists = [(name, mod) for name, mod in model.named_modules()
             if isinstance(mod, torch.nn.ModuleList) and len(mod) > 0
             and len({type(m) for m in mod}) == 1]
    if isinstance(n, int) and n > 0:
        same = [(name, mod) for name, mod in lists if len(mod) == n]
        named = [x for x in same if x[0].rsplit(".", 1)[-1] in ("layers", "h", "blocks", "layer")]
        pick = named or same
        if pick:
            return pick[0][0], list(pick[0][1])
    layers = decoder_layers(model)
    for name, mod in lists:
        if layers and len(mod) == len(layers) and mod[0] is layers[0]:
            return name, layers
    return "", layers


def apply_freeze(model: torch.nn.Module, cfg: Config | TrainingConfig | FreezeConfig
                 ) -> FreezeSummary:
    """Set ``requires_grad=False`` on the parameters ``training.freeze`` selects; log and
    return what was frozen. Call on the loaded, unwrapped model before sharding and before the
    optimizer is built (the optimizer and the regularizers then never see them).

    With nothing to freeze, changes nothing and returns the counts (all trainable).

    Raises:
        ConfigError: a config-only problem (:func:`check_freeze`), a model without input
            embeddings or decoder layers to freeze, ``bottom_layers`` >= its layers, a pattern
            that matches no parameter name (the message shows some names), or a selection that
            freezes every parameter.
    """
    f = _freeze_cfg(cfg)
    check_freeze(cfg)
    named = list(model.named_parameters(remove_duplicate=False))
    first: dict[int, str] = {}
    aliases: dict[int, list[str]] = {}
    for name, p in named:
        first.setdefault(id(p), name)
        aliases.setdefault(id(p), []).append(name)
    params = {id(p): p for _, p in named}
    summary = FreezeSummary(total_parameters=sum(p.numel() for p in params.values()),
                            total_tensors=len(params))
    if not freeze_active(f):
        summary.frozen_parameters = sum(p.numel() for p in params.values() if not p.requires_grad)
        summary.frozen_tensors = sum(1 for p in params.values() if not p.requires_grad)
        return summary

    chosen: dict[int, torch.nn.Parameter] = {}
    if f.embeddings:
        emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        emb_params = list(emb.parameters()) if emb is not None else []
        if not emb_params:
            raise ConfigError(f"{_KEY}.embeddings: the model ({type(model).__name__}) has no "
                              "input embeddings (get_input_embeddings()); use patterns instead")
        chosen.update((id(p), p) for p in emb_params)
        summary.embeddings = True
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        w = getattr(head, "weight", None)
        if w is not None and id(w) in chosen:
            summary.tied_head = next((n for n in aliases[id(w)] if n != first[id(w)]),
                                     first[id(w)])
    if f.bottom_layers:
        where, layers = decoder_module_list(model)
        if not layers:
            raise ConfigError(f"{_KEY}.bottom_layers: could not find the decoder layers of "
                              f"{type(model).__name__} (no ModuleList of repeated blocks); use "
                              "patterns instead")
        if f.bottom_layers >= len(layers):
            raise ConfigError(_too_many_layers(f.bottom_layers, len(layers)))
        named_count = count_layers(first.values())
        if named_count and named_count != len(layers):
            log.warning("training.freeze.bottom_layers: the decoder block list %r has %d layers "
                        "but the parameter names number %d; freezing blocks 0..%d of %r",
                        where, len(layers), named_count, f.bottom_layers - 1, where)
        for layer in layers[:f.bottom_layers]:
            chosen.update((id(p), p) for p in layer.parameters())
        summary.layers = list(range(f.bottom_layers))
        summary.n_layers = len(layers)
    for pat, rx in zip(f.patterns, _compile(f.patterns), strict=True):
        hits = {id(p): p for name, p in named if rx.search(name)}
        if not hits:
            some = ", ".join(list(first.values())[:4])
            raise ConfigError(f"{_KEY}.patterns: {pat!r} matches no parameter name of "
                              f"{type(model).__name__} (names look like: {some}, ...); "
                              "patterns are re.search'ed on named_parameters() names")
        summary.pattern_matches[pat] = len(hits)
        chosen.update(hits)
    if len(chosen) == len(params) or all(
            id(p) in chosen or not p.requires_grad for p in params.values()):
        raise ConfigError(f"{_KEY}: this selection freezes every parameter of the model; "
                          "nothing would train (leave some layers, the head or the norms free)")

    for p in chosen.values():
        p.requires_grad_(False)
    frozen = [pid for pid, p in params.items() if not p.requires_grad]
    summary.frozen_parameters = sum(params[pid].numel() for pid in frozen)
    summary.frozen_tensors = len(frozen)
    summary.names = [first[pid] for pid in frozen]
    log.info("%s", summary.describe())
    if summary.tied_head:
        log.info("the output head %s is tied to the input embeddings (one tensor): it is frozen "
                 "with them", summary.tied_head)
    return summary
