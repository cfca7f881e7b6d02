"""Load causal LMs (hub id, local directory, GGUF file, or random init) and save HF checkpoints."""

from __future__ import annotations

import difflib
import inspect
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from forgetkit.config import ConfigError, ModelConfig

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


# Cheap checks for model aliases (name -> description; raises ConfigError): verify an alias can
# resolve without doing its work (no GGUF conversion). Filled by forgetkit.assets.
ALIAS_CHECKS: dict[str, Callable[[], str]] = {}

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` forbids downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no", "off")


def hub_cached(repo_id: str, filename: str = "config.json", revision: str | None = None) -> bool:
    """Whether ``filename`` of a hub model is in the local HF cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str)
    except Exception:  # noqa: BLE001 - a malformed id or cache: not cached
        return False


def _check_location(name: str, key: str, gguf: str | None = None, revision: str | None = None,
                    tokenizer: bool = False) -> str:
    """A local directory (holding a config or the named GGUF file) or a hub id; see check_model."""
    p = Path(name).expanduser()
    if p.is_file():
        if p.suffix == ".gguf":
            raise ConfigError(f"{key}: {name!r} is a GGUF file; set {key} to its directory "
                              f"({str(p.parent)!r}) and model.gguf_file to {p.name!r}")
        raise ConfigError(f"{key}: {name!r} is a file; expected a model directory (holding "
                          "config.json), a hub id or an alias")
    if p.is_dir():
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        if gguf:
            if not (p / gguf).is_file():
                near = difflib.get_close_matches(gguf, ggufs, n=1, cutoff=0.5)
                hint = (f"; did you mean {near[0]!r}?" if near else
                        f"; the directory has {', '.join(ggufs) or 'no .gguf file'}")
                raise ConfigError(f"model.gguf_file: {gguf!r} is not in {name!r}{hint}")
            return f"local GGUF file {p / gguf}"
        wanted = (("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
                  if tokenizer else ("config.json",))
        if not any((p / w).is_file() for w in wanted):
            hint = (f"; it has {', '.join(ggufs)}: set model.gguf_file" if ggufs else
                    "; is this the checkpoint directory (save_pretrained writes config.json)?")
            raise ConfigError(f"{key}: directory {name!r} holds no {' or '.join(wanted)}{hint}")
        return f"local {'tokenizer' if tokenizer else 'checkpoint'} {p}"
    aliases = sorted(ALIASES)
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or "\\" in name
    if looks_local or not _HUB_ID_RE.match(name):
        near = difflib.get_close_matches(name, aliases, n=1, cutoff=0.6)
        hint = f"; did you mean the alias {near[0]!r}?" if near else ""
        raise ConfigError(f"{key}: {name!r}: no such directory (and not a hub id or an alias)"
                          f"{hint}")
    if hub_offline():
        filename = gguf or ("tokenizer_config.json" if tokenizer else "config.json")
        if not hub_cached(name, filename, revision):
            near = difflib.get_close_matches(name, aliases, n=1, cutoff=0.6)
            hint = f"; did you mean the alias {near[0]!r}?" if near else ""
            raise ConfigError(f"{key}: {name!r} is neither a local directory nor in the local HF "
                              "cache, and HF_HUB_OFFLINE is set; download it once online "
                              f"(hf download {name}), or give a local directory{hint}")
        return f"hub model {name!r} (in the local HF cache)"
    return f"hub id {name!r} (downloaded when the run starts)"


# accepted by transformers' config classes outside their signatures (popped or converted)
_LEGACY_CONFIG_KEYS = {"attn_implementation", "rope_theta", "rope_scaling", "torch_dtype",
                       "dtype", "use_cache", "tie_word_embeddings"}


def _check_random_init(cfg: ModelConfig) -> str:
    """Build the random-init model on the meta device: a bad config dict fails here, in a
    fraction of a second, with the key named, instead of as a transformers traceback later."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert cfg.random_init is not None
    spec = dict(cfg.random_init)
    model_type = str(spec.pop("model_type"))
    if model_type not in CONFIG_MAPPING:
        near = difflib.get_close_matches(model_type, list(CONFIG_MAPPING.keys()), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"model.random_init.model_type: {model_type!r} is not a transformers "
                          f"model type{hint}")
    cls = CONFIG_MAPPING[model_type]
    from transformers import PretrainedConfig

    known = set(inspect.signature(cls.__init__).parameters) | set(
        inspect.signature(PretrainedConfig.__init__).parameters) | _LEGACY_CONFIG_KEYS
    try:
        default: Any = cls()
    except Exception:  # noqa: BLE001 - a config without defaults: check names by signature only
        default = None
    # A typo (hidden_sise) is kept by transformers as a stray attribute and silently ignored.
    # Only a key that is close to a real one is refused: a config class may accept keys its
    # signature does not show, and a false alarm would block a valid model.
    valid = sorted(known - {"self", "kwargs"})
    for k in spec:
        if k in known or hasattr(default, k):
            continue
        near = difflib.get_close_matches(k, valid, n=1, cutoff=0.85)
        if near:
            raise ConfigError(f"model.random_init.{k}: not a setting of a {model_type!r} config; "
                              f"did you mean {near[0]!r}?")
    spec.setdefault("vocab_size", 259)  # the byte tokenizer's size; the real one is set on load
    try:
        config = AutoConfig.for_model(model_type, **spec)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for a bad config
        msg = " ".join(str(e).split())
        raise ConfigError(f"model.random_init: cannot build a {model_type!r} causal LM from it: "
                          f"{type(e).__name__}: {msg[:300]}") from None
    n = sum(p.numel() for p in model.parameters())
    return f"random init {model_type} ({human_count(n)} parameters)"


def check_model(cfg: ModelConfig) -> str:
    """Verify the model (and tokenizer) a config names, in seconds, loading no weights.

    A ``random_init`` dict is built on the meta device; a local path must exist and hold a
    config (or the named GGUF file); an alias must resolve (without converting anything); a hub
    id is accepted online and, under ``HF_HUB_OFFLINE``, only when it is in the local HF cache.
    Returns a one-line description; raises ConfigError naming the key and the fix.
    """
    if cfg.random_init is not None:
        found = _check_random_init(cfg)
    elif not cfg.name_or_path:
        raise ConfigError("model.name_or_path: expected a hub id, directory or alias (or "
                          "model.random_init for a random-init model), got nothing")
    elif cfg.name_or_path in ALIASES:
        if cfg.gguf_file:
            raise ConfigError(f"model.gguf_file: the alias {cfg.name_or_path!r} chooses its own "
                              "weights; remove model.gguf_file")
        check = ALIAS_CHECKS.get(cfg.name_or_path)
        found = f"alias {cfg.name_or_path!r} -> " + (check() if check else "registered")
    else:
        found = _check_location(cfg.name_or_path, "model.name_or_path", cfg.gguf_file,
                                cfg.revision)
    if cfg.tokenizer and cfg.tokenizer != "byte" and cfg.tokenizer != cfg.name_or_path:
        if cfg.tokenizer in ALIASES:
            check = ALIAS_CHECKS.get(cfg.tokenizer)
            tok = f"alias {cfg.tokenizer!r}" + (f" -> {check()}" if check else "")
        else:
            tok = _check_location(cfg.tokenizer, "model.tokenizer", None, None, tokenizer=True)
        found += f"; tokenizer {tok}"
    return found


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


def save_merged_lora(model: torch.nn.Module, tokenizer: Any, out_dir: str | Path,
                     adapter_dir: str | Path | None = None) -> Path:
    """Save a peft LoRA model as a standard HF checkpoint with the adapters merged in.

    ``adapter_dir`` (optional) first receives the adapter alone (peft ``save_pretrained``:
    ``adapter_config.json`` + ``adapter_model.safetensors``, the adapter weights only). Then
    peft's ``merge_and_unload`` folds every adapter into its base weight, ``W <- W + (alpha / r)
    * B A`` (in the weight's dtype), and the plain transformers model is saved with
    :func:`save_hf_checkpoint` into ``out_dir`` (loads with ``from_pretrained`` / lm_eval).

    The merge is **in place**: ``model`` is unusable as a peft model afterwards (call it last;
    the training loop does, on rank 0). Returns ``out_dir``.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel):
        raise TypeError(f"save_merged_lora expects a peft PeftModel, got {type(model).__name__}")
    if adapter_dir is not None:
        Path(adapter_dir).mkdir(parents=True, exist_ok=True)
        model.save_pretrained(str(adapter_dir), safe_serialization=True)
    merged = model.merge_and_unload()
    return save_hf_checkpoint(merged, tokenizer, out_dir)


def hf_config(cfg: ModelConfig) -> Any:
    """The transformers config of ``cfg``'s model without loading weights: built from
    ``random_init`` (vocab 259 with the byte tokenizer), else read from the resolved local
    directory, hub id or GGUF file. Used to build meta-device models (memory, LoRA checks)."""
    from transformers import AutoConfig

    if cfg.random_init is not None:
        spec = dict(cfg.random_init)
        model_type = spec.pop("model_type")
        if "vocab_size" not in spec and cfg.tokenizer in ("byte", None):
            spec["vocab_size"] = 259  # build_byte_tokenizer
        return AutoConfig.for_model(model_type, **spec)
    path, gguf = resolve_model_path(cfg.name_or_path)  # type: ignore[arg-type]
    kw: dict[str, Any] = {"trust_remote_code": cfg.trust_remote_code}
    if gguf or cfg.gguf_file:
        kw["gguf_file"] = gguf or cfg.gguf_file
    if cfg.revision:
        kw["revision"] = cfg.revision
    return AutoConfig.from_pretrained(path, **kw)

