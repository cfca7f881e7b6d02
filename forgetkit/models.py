"""Load causal LMs (hub id, local directory, GGUF file, or random init) and save HF checkpoints."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from forgetkit.config import ModelConfig

log = logging.getLogger("forgetkit")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "auto": "auto"}

# Model aliases: short names that resolve to a local checkpoint (e.g. converted from a GGUF file
# a package ships) or, when that is not available, to a hub id. Filled by forgetkit.assets.
ALIASES: dict[str, Any] = {}


def human_count(n: int) -> str:
    """``7241732096 -> '7,241,732,096 (7.24B)'``."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= div:
            return f"{n:,} ({n / div:.2f}{unit})"
    return f"{n:,}"


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights are counted once."""
    seen: set[int] = set()
    total = trainable = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        n = p.numel()
        if hasattr(p, "ds_numel"):  # DeepSpeed ZeRO-3 partitioned parameter
            n = p.ds_numel
        total += n
        trainable += n if p.requires_grad else 0
    return trainable, total


def build_byte_tokenizer() -> Any:
    """A byte-level tokenizer with no learned merges (vocab 259): no download, fully offline.

    Used for random-init test and smoke models. Ids 0..255 are the bytes (GPT-2 byte-to-unicode
    alphabet), then ``<|endoftext|>`` (bos/eos), ``<|pad|>`` and ``<|unk|>``. It saves and reloads
    with ``save_pretrained`` like any fast tokenizer, so lm-eval can load the checkpoint.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet, key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|pad|>",
                                   unk_token="<|unk|>")
    nl = "{{ '\\n' }}"  # explicit newlines: HF renders templates with trim_blocks
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>" + nl + "{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|endoftext|>{% endif %}" + nl + "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>" + nl + "{% endif %}")
    return fast


def resolve_model_path(name: str) -> tuple[str, str | None]:
    """Map a model alias to (path or hub id, gguf file); other names pass through."""
    if name in ALIASES:
        return ALIASES[name]()
    return name, None


def load_tokenizer(cfg: ModelConfig) -> Any:
    from transformers import AutoTokenizer

    name = cfg.tokenizer
    if name == "byte" or (name is None and cfg.random_init is not None):
        tok = build_byte_tokenizer()
    else:
        path, gguf = resolve_model_path(name or cfg.name_or_path)  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
        if gguf or cfg.gguf_file:
            kwargs["gguf_file"] = gguf or cfg.gguf_file
        if cfg.revision:
            kwargs["revision"] = cfg.revision
        tok = AutoTokenizer.from_pretrained(path, **kwargs)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token  # labels mask padding, so sharing eos is safe
    if tok.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set one in the tokenizer config")
    return tok


def load_model(cfg: ModelConfig, tokenizer: Any | None = None, seed: int | None = None
               ) -> tuple[torch.nn.Module, Any]:
    """Load (model, tokenizer) with every parameter trainable.

    A random-init model is built from ``cfg.random_init`` (a transformers config dict) with the
    torch RNG seeded by ``cfg.init_seed``, so every process (and every run seed) builds the same
    base weights.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    if tokenizer is None:
        tokenizer = load_tokenizer(cfg)
    dtype = _DTYPES[cfg.dtype]
    if cfg.random_init is not None:
        spec = dict(cfg.random_init)
        model_type = spec.pop("model_type")
        spec.setdefault("vocab_size", len(tokenizer))
        spec.setdefault("pad_token_id", tokenizer.pad_token_id)
        spec.setdefault("eos_token_id", tokenizer.eos_token_id)
        spec.setdefault("bos_token_id", tokenizer.bos_token_id)
        config = AutoConfig.for_model(model_type, **spec)
        if cfg.attn_implementation:
            config._attn_implementation = cfg.attn_implementation
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.init_seed if seed is None else seed)
            model = AutoModelForCausalLM.from_config(
                config, dtype=torch.float32 if dtype == "auto" else dtype)
        where = f"random init ({model_type})"
    else:
        path, gguf = resolve_model_path(cfg.name_or_path)  # type: ignore[arg-type]
        kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": cfg.trust_remote_code}
        if gguf or cfg.gguf_file:
            kwargs["gguf_file"] = gguf or cfg.gguf_file
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if cfg.revision:
            kwargs["revision"] = cfg.revision
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
        where = path + (f" [{kwargs['gguf_file']}]" if "gguf_file" in kwargs else "")
    model.requires_grad_(True)  # full fine-tuning: every weight trains
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False  # no KV cache during training
    trainable, total = count_parameters(model)
    log.info("model %s: %s trainable of %s parameters, dtype %s", where,
             human_count(trainable), human_count(total), next(model.parameters()).dtype)
    return model, tokenizer


def save_hf_checkpoint(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path,
                       state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Save a standard HF checkpoint (safetensors + config + tokenizer).

    ``model`` must be the unwrapped module; ``state_dict`` the full (gathered) weights when the
    model was sharded. The result loads with ``AutoModelForCausalLM.from_pretrained`` and
    ``lm_eval --model hf --model_args pretrained=<dir>``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and hasattr(quantizer, "remove_quantization_config"):
        # A GGUF load leaves a quantizer attached although the weights are plain tensors now.
        quantizer.remove_quantization_config(model)
    use_cache = getattr(model.config, "use_cache", None)
    if use_cache is not None:
        model.config.use_cache = True  # inference default for whoever loads the checkpoint
    model.save_pretrained(out, state_dict=state_dict, safe_serialization=True)
    if use_cache is not None:
        model.config.use_cache = use_cache
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
