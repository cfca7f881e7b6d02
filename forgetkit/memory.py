"""Per-GPU memory estimate of full fine-tuning (weights, gradients, optimizer, regularizers,
activations) and the measured peak of a finished run.

Run ``python -m forgetkit.memory MODEL`` (a hub id or local directory: only its config.json is
read, through ``transformers.AutoConfig``; no weights are downloaded) or ``python -m
forgetkit.memory --params 7.24e9 --hidden 4096 --layers 32 --vocab 32000``. ``--json`` prints
one JSON object. From Python: :func:`estimate` (explicit arguments) or :func:`estimate_for_config`
(a forgetkit :class:`~forgetkit.config.Config`).

Units: bytes everywhere; the table prints decimal GB (1 GB = 1e9 bytes, the unit GPU vendors
quote: an "80 GB" H100 has 80e9 usable-ish bytes) and GiB next to it.

The model of memory (N = trainable parameters, W = data-parallel world size)
-----------------------------------------------------------------------------
Weights / gradients / optimizer, bytes per parameter (the ZeRO paper's accounting, Rajbhandari et
al. 2020, section 3.1: mixed-precision Adam costs 2 + 2 + K with K = 12):

==============  =======  =====  ===========================================================
precision       weights  grads  optimizer (adamw / adamw8bit / sgd / sgd_momentum / adafactor)
==============  =======  =====  ===========================================================
fp32            4        4      8 / 2 / 0 / 4 / ~0
bf16-mixed      2        2      4 (fp32 master) + 8 / 2 / 0 / 4 / ~0
fp16-mixed      2        2      4 (fp32 master) + 8 / 2 / 0 / 4 / ~0
bf16 (pure)     2        2      4 / 1 / 0 / 2 / ~0  (state kept in bf16, no master)
==============  =======  =====  ===========================================================

So mixed-precision AdamW is the textbook ``16 N`` (7B -> 112 GB) and fp32 AdamW is ``16 N`` too
(4 + 4 + 8). With ``autocast=True`` (what forgetkit's single/DDP backends do: fp32 parameters,
``torch.autocast`` casts them per forward) the same 16 N is split 4 + 4 + 8, and the bf16 copies
of the weights that autocast caches for the backward pass add ``2 N`` to ``weights_bytes``.
adafactor keeps only factored row/column second moments (about ``4 * 2 N / hidden`` bytes, no
first moment: HF's default ``beta1=None``).

Sharding: ZeRO-1 divides the optimizer state by W, ZeRO-2 the optimizer and gradients, ZeRO-3 and
FSDP full-shard weights, gradients and optimizer (plus, as a transient, the unsharded parameters
of the layer being computed and the prefetched next one: ``2 * layer params * compute bytes``).
Regularizer anchors follow the parameters (sharded under ZeRO-3/FSDP). CPU offload moves the
optimizer state (and fp32 master) / the weights off the GPU; they are reported in
``cpu_bytes``.

Regularizers: ``l2`` keeps theta0 (``anchor_dtype``); ``ewc`` theta0 and the fp32 diagonal
Fisher F; ``kl`` a frozen copy of the model (``kl_ref_dtype``, by default the compute dtype;
forgetkit's KL deep-copies the model, so :func:`estimate_for_config` uses the weights' dtype) and
its no-grad logits.

Activations (the part everybody gets wrong)
-------------------------------------------
``activations ~= s * b * d * L * k`` bytes (s sequence length, b micro-batch, d hidden size, L
layers; k in bytes per token per hidden unit per layer). The textbook figure "LLaMA-7B at
s = 2048, b = 1 needs ~3.2 GB" is this formula with k = 12: 2048 * 1 * 4096 * 32 * 12 =
3.22e9 bytes = 3.2 GB (decimal; 3.0 GiB). Korthikanti et al. 2022 ("Reducing activation
recomputation", eq. 1) derive k = 34 + 5 a s / d for a GPT layer in 16-bit without flash
attention; k = 12 is an optimistic rule of thumb. forgetkit does not use a fixed k: it counts the
tensors a Hugging Face Llama/Mistral/Qwen decoder layer saves for backward with SDPA (flash/memory
efficient) attention, per token, in elements of the hidden size::

    k_elem = 3      RMSNorm before attention: its input, the normalised x, weight * x (the
                    q/k/v projections' input)
           + 1 + 2 d_kv/d   q, k, v after RoPE, kept by SDPA
           + 2      SDPA output and its transposed contiguous copy (o_proj input)
           + 2      RMSNorm before the MLP: normalised x and weight * x (its input, the residual
                    sum, is shared with the next saved tensor's storage)
           + 4 i/d  SwiGLU: gate, up, act(gate), act(gate)*up  (i = intermediate size)
           (counted with torch.autograd.graph.saved_tensors_hooks on transformers 5 Llama:
            10 d-sized + 4 i-sized tensors per token for an MHA layer)
           (= 8 + 2 d_kv/d + 4 i/d; 20.75 for LLaMA-7B, 20.7 for an MHA model with i = 8/3 d)

    fp32:            k = 4 * k_elem bytes                         (83 for LLaMA-7B)
    mixed (autocast): the 4 RMSNorm tensors stay fp32 (the residual stream is fp32), the rest is
                     16-bit: k = 4 * 4 + 2 * (k_elem - 4) bytes   (49.5 for LLaMA-7B; compare
                     Korthikanti's 34)
    pure bf16:       k = 2 * k_elem bytes
    eager attention: + (a * s / d) * (4 + compute bytes) per token and layer (the fp32 softmax
                     output and its cast; a = heads): the s^2 term SDPA avoids.

The constant (``k_elem``) was checked against measured peaks on CPU, see
``benchmarks/memory.py`` and ``benchmarks/README.md``. With gradient checkpointing (HF,
per decoder layer) only each layer's input is kept: ``s b d L * residual bytes`` (4 under fp32 and
autocast, 2 in pure bf16: the "~2 bytes per s b d L" rule of thumb is the 16-bit case), plus one
layer's full activations while it is recomputed in backward.

Outside the layers: the logits and the loss, ``s b V`` elements, at their peak at the start of
the backward pass: the logits (compute dtype ``c``; the training loop keeps the model output
referenced through the backward), the log-softmax the cross-entropy saves (fp32), the gradient
of the loss with respect to it and the one with respect to its input (both fp32, alive together
inside the log-softmax backward): ``s b V (c + 12)`` bytes, or ``K V (c + 12)`` when logits are
computed at K positions only (``training.logits: targets``, the default: K = the target
positions of the micro-batch, at most the sum of its examples' target counts). (The fp32 copy of 16-bit logits
that ``logits.float()`` makes is the log-softmax's input, which it does not save: it is freed
in the forward pass and is not part of this peak; it was counted, as ``+ 4``, until measured
with the real 49152-token vocabulary, benchmarks/README.md.) These are dense over all ``s``
positions of the padded batch, pads included. SDPA with a padding mask (``attention_mask``
with zeros) was measured with the same ``k``: no ``s^2`` term appears on CPU.

Peak (``total_bytes``): with a single micro-batch per optimizer step and no data-parallel gradient
buckets, gradients are created while activations are freed (forgetkit zeroes gradients with
``set_to_none``), so the peak is ``weights + optimizer + regularizers + max(activations +
the LM head's gradient, gradients + one layer's activations (the last one backpropagated,
recomputed under checkpointing), gradients + regularizer temporaries)``; the last term is the
fp32 ``theta - theta0`` (l2) and ``F * (theta - theta0)`` (ewc) of one foreach chunk (at most
2**26 elements, ``forgetkit.regularizers.functional.CHUNK_NUMEL``) after the backward pass. With gradient accumulation (or W > 1 without ZeRO-2/3,
DDP's buckets) gradients persist through the next forward and the peak is the plain sum.
Not modelled: the CUDA context (~0.5-1 GB on the device, outside ``max_memory_allocated``),
allocator fragmentation (typically 5-15 %), and temporaries of single kernels.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from forgetkit.config import Config

__all__ = [
    "ModelShape",
    "MemoryEstimate",
    "GPUS",
    "activation_k",
    "estimate",
    "estimate_for_config",
    "shape_from_hf_config",
    "shape_from_model",
    "typical_shape",
    "measured_peak_bytes",
    "current_rss_bytes",
    "loaded_weights_bytes",
    "memory_line",
    "main",
]

Precision = Literal["fp32", "bf16-mixed", "fp16-mixed", "bf16"]
Optimizer = Literal["adamw", "adamw8bit", "sgd", "sgd_momentum", "adafactor"]
Sharding = Literal["none", "zero1", "zero2", "zero3", "fsdp"]
Attention = Literal["sdpa", "eager"]

PRECISIONS: tuple[str, ...] = ("fp32", "bf16-mixed", "fp16-mixed", "bf16")
OPTIMIZERS: tuple[str, ...] = ("adamw", "adamw8bit", "sgd", "sgd_momentum", "adafactor")
SHARDINGS: tuple[str, ...] = ("none", "zero1", "zero2", "zero3", "fsdp")
REGULARIZERS: tuple[str, ...] = ("l2", "ewc", "kl")
_DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}

# Common GPUs, usable memory in decimal GB as sold (24: RTX 4090/A10/L4, 40: A100-40G,
# 80: A100-80G/H100, 141: H200).
GPUS: dict[str, float] = {"24 GB (RTX 4090, L4)": 24e9, "40 GB (A100-40G)": 40e9,
                          "80 GB (A100/H100)": 80e9, "141 GB (H200)": 141e9}


@dataclass
class ModelShape:
    """What the estimate needs to know about a decoder-only transformer."""

    params: int
    hidden: int
    layers: int
    vocab: int
    intermediate: int | None = None  # default 8/3 * hidden (SwiGLU)
    heads: int | None = None  # default hidden / 128
    kv_heads: int | None = None  # default heads (MHA)
    tied_embeddings: bool = False

    @property
    def inter(self) -> int:
        return self.intermediate or int(round(self.hidden * 8 / 3))

    @property
    def n_heads(self) -> int:
        return self.heads or max(1, self.hidden // 128)

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.n_heads

    @property
    def kv_dim(self) -> int:
        return self.hidden * self.n_kv_heads // self.n_heads

    @property
    def layer_params(self) -> int:
        """Parameters of one decoder layer (attention + SwiGLU MLP + 2 norms)."""
        d = self.hidden
        return 2 * d * d + 2 * d * self.kv_dim + 3 * d * self.inter + 2 * d

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)


@dataclass
class MemoryEstimate:
    """Estimated bytes per GPU. ``total_bytes`` is the peak (see the module docstring)."""

    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    regularizer_bytes: int
    activations_bytes: int
    total_bytes: int
    cpu_bytes: int = 0  # offloaded to host memory
    notes: list[str] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def fits(self, gpu_bytes: float, headroom: float = 0.9) -> bool:
        """Whether the peak stays under ``headroom`` of a GPU's memory (CUDA context and
        fragmentation take the rest)."""
        return self.total_bytes <= headroom * gpu_bytes

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fits"] = {name: self.fits(b) for name, b in GPUS.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryEstimate:
        """The estimate :meth:`to_dict` saved (``train_result.json``); derived keys dropped.

        Raises:
            TypeError: a required field is missing.
        """
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def activation_k(shape: ModelShape, precision: str = "fp32", attention: str = "sdpa",
                 seq_len: int = 0) -> float:
    """k in bytes per (token * hidden unit * layer) of one decoder layer; module docstring."""
    d = shape.hidden
    k_elem = 8 + 2 * shape.kv_dim / d + 4 * shape.inter / d
    c = 4 if precision == "fp32" else 2
    if precision in ("bf16-mixed", "fp16-mixed"):
        k = 4 * 4 + 2 * (k_elem - 4)
    else:
        k = c * k_elem
    if attention == "eager":
        k += shape.n_heads * seq_len / d * (4 + c)
    return k


def _opt_bytes_per_param(optimizer: str, precision: str, hidden: int) -> tuple[float, float]:
    """(state bytes, master-copy bytes) per parameter."""
    pure16 = precision == "bf16"
    s = 2 if pure16 else 4  # bytes of one full-size state tensor
    state = {"adamw": 2 * s, "adamw8bit": 2.0 if not pure16 else 1.0, "sgd": 0.0,
             "sgd_momentum": float(s), "adafactor": 4 * 2 / max(hidden, 1)}[optimizer]
    if optimizer == "adamw8bit" and pure16:
        state = 2.0  # int8 moments regardless of the parameter dtype
    master = 4.0 if precision in ("bf16-mixed", "fp16-mixed") else 0.0
    return state, master


def estimate(shape: ModelShape, *, seq_len: int, micro_batch: int = 1,
             precision: Precision = "bf16-mixed", optimizer: Optimizer = "adamw",
             sharding: Sharding = "none", world_size: int = 1, offload_optimizer: bool = False,
             offload_params: bool = False, gradient_checkpointing: bool = False,
             regularizers: tuple[str, ...] | list[str] = (), anchor_dtype: str = "float32",
             kl_ref_dtype: str | None = None, grad_accumulation: int = 1,
             attention: Attention = "sdpa", autocast: bool = False,
             trainable_params: int | None = None, k: float | None = None,
             logit_positions: int | None = None) -> MemoryEstimate:
    """Per-GPU memory of one full fine-tuning step (bytes); see the module docstring.

    Args:
        shape: model dimensions and parameter count.
        seq_len: tokens per sequence (padded length).
        micro_batch: sequences per forward/backward on one GPU.
        precision: ``fp32``, ``bf16-mixed``, ``fp16-mixed`` or ``bf16`` (pure).
        optimizer: ``adamw``, ``adamw8bit``, ``sgd``, ``sgd_momentum`` or ``adafactor``.
        sharding: ``none`` (DDP / one GPU), ``zero1``, ``zero2``, ``zero3`` or ``fsdp``.
        world_size: data-parallel processes the states are sharded over.
        offload_optimizer: optimizer state (and fp32 master) in CPU memory.
        offload_params: parameters in CPU memory (ZeRO-3 / FSDP only).
        gradient_checkpointing: recompute each decoder layer in backward.
        regularizers: any of ``l2``, ``ewc``, ``kl``.
        anchor_dtype: dtype of theta0 (l2/ewc).
        kl_ref_dtype: dtype of KL's frozen reference (default: the compute dtype).
        grad_accumulation: micro-batches per optimizer step (>1: gradients persist).
        attention: ``sdpa`` (no s^2 term) or ``eager``.
        autocast: mixed precision by ``torch.autocast`` over fp32 parameters (forgetkit's
            single/DDP backends) instead of 16-bit parameters + fp32 master in the optimizer.
        trainable_params: parameters that train (default all).
        k: override the activation constant (bytes per token * hidden * layer).
        logit_positions: positions per micro-batch whose logits are computed (default all
            ``seq_len * micro_batch``; forgetkit's ``training.logits: targets`` computes them
            at the target positions only).

    Returns:
        The :class:`MemoryEstimate` per GPU.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
    if sharding not in SHARDINGS:
        raise ValueError(f"sharding must be one of {SHARDINGS}, got {sharding!r}")
    bad = [r for r in regularizers if r not in REGULARIZERS]
    if bad:
        raise ValueError(f"unknown regularizer(s) {bad}; expected some of {REGULARIZERS}")
    if world_size < 1 or seq_len < 1 or micro_batch < 1:
        raise ValueError("world_size, seq_len and micro_batch must be >= 1")
    if logit_positions is not None and not 0 <= logit_positions <= seq_len * micro_batch:
        raise ValueError(f"logit_positions must be in [0, seq_len * micro_batch = "
                         f"{seq_len * micro_batch}], got {logit_positions}")
    if offload_params and sharding not in ("zero3", "fsdp"):
        raise ValueError("offload_params needs sharding zero3 or fsdp")
    notes: list[str] = []
    details: dict[str, Any] = {}
    N = shape.params
    Nt = N if trainable_params is None else trainable_params
    W = world_size
    mixed = precision in ("bf16-mixed", "fp16-mixed")
    c = 4 if precision == "fp32" else 2  # compute (activation / 16-bit weight) bytes

    # -- per-parameter bytes
    state, master = _opt_bytes_per_param(optimizer, precision, shape.hidden)
    if mixed and autocast:
        w_b, g_b, o_b = 4.0, 4.0, state  # fp32 params are the master weights
        cast_cache = 2.0 * N
        notes.append("autocast: fp32 parameters and gradients; the 16-bit weight copies cached "
                     "for backward (2 N) are in weights_bytes")
    else:
        w_b, g_b, o_b = float(c), float(c), state + master
        cast_cache = 0.0
    weights = w_b * N
    grads = g_b * Nt
    opt = o_b * Nt
    details.update(params=N,
                   bytes_per_param={"weights": w_b, "gradients": g_b, "optimizer": o_b})

    # -- regularizers (on the parameters' shards)
    reg_shard = 0.0
    reg_full = 0.0
    ad = _DTYPE_BYTES[anchor_dtype]
    if "l2" in regularizers:
        reg_shard += ad * Nt
    if "ewc" in regularizers:
        reg_shard += (ad + 4) * Nt
    kl_act = 0.0
    if "kl" in regularizers:
        rb = _DTYPE_BYTES[kl_ref_dtype] if kl_ref_dtype else c
        reg_full += rb * N
        kl_act = micro_batch * seq_len * shape.vocab * (rb + 4 + 4)  # ref logits, fp32 probs
        if sharding in ("zero3", "fsdp"):
            notes.append("kl: the frozen reference is a full (unsharded) copy")

    # -- sharding
    if sharding in ("zero1", "zero2", "zero3", "fsdp"):
        opt /= W
    if sharding in ("zero2", "zero3", "fsdp"):
        grads /= W
    gather = 0.0
    if sharding in ("zero3", "fsdp"):
        details["weights_divisor"] = W
        weights /= W
        reg_shard /= W
        cast_cache /= W
        gather = 2.0 * shape.layer_params * c  # current + prefetched layer, unsharded
        notes.append(f"{sharding}: weights/gradients/optimizer/anchors divided by {W}; "
                     "+ 2 unsharded layers while they compute")
    cpu = 0.0
    if offload_optimizer:
        cpu += opt
        opt = 0.0
        notes.append("optimizer state offloaded to CPU (cpu_bytes)")
    if offload_params:
        cpu += weights
        weights = 0.0
        notes.append("parameters offloaded to CPU (cpu_bytes); layers are fetched to compute")
    weights += cast_cache + gather
    regs = reg_shard + reg_full

    # -- activations
    s, b, d, L, V = seq_len, micro_batch, shape.hidden, shape.layers, shape.vocab
    kk = k if k is not None else activation_k(shape, precision, attention, s)
    layer_act = s * b * d * kk
    resid = 2 if precision == "bf16" else 4
    if gradient_checkpointing:
        layers_act = s * b * d * L * resid + layer_act
        notes.append(f"checkpointing: layer inputs s*b*d*L*{resid} bytes + one layer "
                     f"recomputed (k={kk:.1f})")
    else:
        layers_act = L * layer_act
    logit_b = 4 if precision == "fp32" else 2  # logits in the compute dtype
    n_logits = s * b if logit_positions is None else logit_positions
    logits = n_logits * V * (logit_b + 12)
    outside = s * b * d * (3 * resid)  # embeddings out, final norm in/out
    acts = layers_act + logits + outside + kl_act
    details.update(k=kk, activations_layers_bytes=int(layers_act), logits_bytes=int(logits),
                   logit_positions=int(n_logits),
                   k_formula="fp32: 4*(8+2dkv/d+4i/d); mixed: 16+2*(4+2dkv/d+4i/d); "
                             "bf16: 2*(...)")

    # -- peak
    accumulate = grad_accumulation > 1 or (W > 1 and sharding in ("none", "zero1"))
    # the LM head's gradient is the first one backward creates (the input embedding's, when
    # untied, comes last, when the activations are gone): one V x d matrix, tied or not
    first_grads = g_b * V * d / (W if sharding in ("zero2", "zero3", "fsdp") else 1)
    # gradient-space regularizers: fp32 temporaries of one foreach chunk (functional.py)
    chunk = min(Nt, 1 << 26) / (W if sharding in ("zero3", "fsdp") else 1)
    reg_tmp = 4 * chunk * (2 if "ewc" in regularizers else 1 if "l2" in regularizers else 0)
    details.update(regularizer_transient_bytes=int(reg_tmp))
    if accumulate:
        total = weights + opt + regs + grads + acts + reg_tmp
        notes.append("gradients persist across micro-batches / in DDP buckets: peak = sum")
    else:
        total = weights + opt + regs + max(acts + min(first_grads, grads),
                                           grads + layer_act, grads + reg_tmp)
        notes.append("peak = weights + optimizer + regularizers + max(activations + the LM "
                     "head's gradient, gradients + one layer's activations, gradients + regularizer "
                     "temporaries): gradients replace activations during backward")
    return MemoryEstimate(int(weights), int(grads), int(opt), int(regs), int(acts), int(total),
                          int(cpu), notes, details)


# ----------------------------------------------------------------------------- model shapes

def shape_from_hf_config(hf: Any, params: int | None = None) -> ModelShape:
    """A :class:`ModelShape` from a transformers config (parameters counted when not given)."""
    tc = getattr(hf, "text_config", None)
    if tc is not None and getattr(hf, "hidden_size", None) is None:
        hf = tc
    d = int(hf.hidden_size)
    L = int(hf.num_hidden_layers)
    V = int(hf.vocab_size)
    inter = int(getattr(hf, "intermediate_size", None) or round(8 * d / 3))
    heads = int(getattr(hf, "num_attention_heads", None) or max(1, d // 128))
    kv = int(getattr(hf, "num_key_value_heads", None) or heads)
    head_dim = getattr(hf, "head_dim", None) or d // heads
    tied = bool(getattr(hf, "tie_word_embeddings", False))
    shape = ModelShape(0, d, L, V, inter, heads, kv, tied)
    if params is None:
        q = heads * head_dim
        kvd = kv * head_dim
        bias = q + 2 * kvd if getattr(hf, "attention_bias", False) else 0
        layer = d * q + 2 * d * kvd + q * d + 3 * d * inter + 2 * d + bias
        params = L * layer + shape.embed_params + d
    shape.params = int(params)
    return shape


def typical_shape(params: int, vocab: int = 32000) -> ModelShape:
    """A Llama-like shape of about ``params`` parameters, for the activation estimate when only
    a parameter count is known (``python -m forgetkit.memory --params N``).

    Assumes the Llama-7B proportions: ``layers = hidden / 128``, SwiGLU with ``i = 8/3 d``
    (``12 d^2`` per layer), MHA, untied ``vocab x hidden`` embeddings, so ``params ~= 12 L d^2 +
    2 V d``; ``hidden`` is the multiple of 128 whose count is nearest. 7B -> d 4096, 32 layers
    (LLaMA-7B's); the parameter count itself is kept as given. A stated assumption, not the
    user's model: pass ``--hidden/--layers`` or a model for that.
    """
    def count(d: int) -> int:
        return 12 * max(1, d // 128) * d * d + 2 * vocab * d

    best = min(range(128, 32768 + 1, 128), key=lambda d: abs(count(d) - params))
    return ModelShape(int(params), best, max(1, best // 128), vocab)


def shape_from_model(model: Any) -> ModelShape:
    """A :class:`ModelShape` from an instantiated HF model: its real (deduplicated) count."""
    seen: set[int] = set()
    n = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += int(getattr(p, "ds_numel", p.numel()))
    return shape_from_hf_config(model.config, params=n)


def _hf_config_from_model_cfg(mc: Any) -> Any:
    from forgetkit.models import hf_config

    return hf_config(mc)


def _trainable_without_weights(cfg: Config) -> int | None:
    """The trainable-parameter count of a LoRA / freezing config, from a model built on the
    meta device (no weights): ``training.lora`` adapters, or every parameter minus the frozen
    ones. None when there is nothing to count or the model cannot be built offline."""
    t = cfg.training
    if t.lora is None and t.freeze == type(t.freeze)():
        return None
    try:
        import torch
        from transformers import AutoModelForCausalLM

        from forgetkit.models import count_parameters

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(_hf_config_from_model_cfg(cfg.model))
        if t.lora is not None:
            from forgetkit.train.lora import apply_lora

            model, _ = apply_lora(model, t.lora)
        else:
            from forgetkit.train.freeze import apply_freeze

            apply_freeze(model, cfg)
        return count_parameters(model)[0]
    except Exception:  # noqa: BLE001 - an estimate without it says so in its notes
        return None


def estimate_for_config(cfg: Config, world_size: int = 1, *, model: Any = None,
                        seq_len: int | None = None, trainable_params: int | None = None,
                        logit_positions: int | None = None) -> MemoryEstimate:
    """The estimate for a forgetkit run config, per GPU.

    Args:
        cfg: a validated forgetkit config.
        world_size: number of processes (GPUs).
        model: the loaded model, when there is one: its real parameter count is used (and its
            trainable count: LoRA adapters, frozen parameters).
        seq_len: padded sequence length (default ``cfg.data.max_length``: the worst case).
        trainable_params: parameters that train (default: counted on ``model``, else from
            the LoRA/freezing config on a meta-device model, else all).
        logit_positions: with ``training.logits: targets``, the most target positions of any
            micro-batch (the data knows it: the training loop passes it); default every
            position (an upper bound, noted). Ignored with ``training.logits: all``.

    Returns:
        The :class:`MemoryEstimate`.
    """
    t, dc, mc = cfg.training, cfg.distributed, cfg.model
    if model is not None:
        shape = shape_from_model(model)
    else:
        shape = shape_from_hf_config(_hf_config_from_model_cfg(mc))
    wdtype = mc.dtype if mc.dtype != "auto" else "float32"
    if t.mixed_precision == "bf16":
        precision: str = "bf16-mixed"
    elif t.mixed_precision == "fp16":
        precision = "fp16-mixed"
    else:
        precision = "fp32" if wdtype == "float32" else "bf16"
    strategy = dc.strategy
    if strategy == "auto":
        strategy = "ddp" if world_size > 1 else "single"
    sharding = {"fsdp": "fsdp", "deepspeed": f"zero{dc.zero_stage}"}.get(strategy, "none")
    opt = {"adamw": "adamw", "adamw_8bit": "adamw8bit",
           "sgd": "sgd_momentum" if t.momentum > 0 else "sgd"}[t.optimizer]
    regs: list[str] = []
    anchor = "float32"
    for rc in cfg.regularizers:
        if rc.type in ("l2", "ewc", "kl"):
            regs.append(rc.type)
        if rc.type in ("l2", "ewc"):
            anchor = rc.anchor_dtype
    attention = "eager" if mc.attn_implementation == "eager" else "sdpa"
    if trainable_params is None and model is not None:
        from forgetkit.models import count_parameters

        trainable_params = count_parameters(model)[0]
    elif trainable_params is None:
        trainable_params = _trainable_without_weights(cfg)
    est = estimate(shape, seq_len=seq_len or cfg.data.max_length, micro_batch=t.micro_batch_size,
                   precision=precision,  # type: ignore[arg-type]
                   optimizer=opt,  # type: ignore[arg-type]
                   sharding=sharding,  # type: ignore[arg-type]
                   world_size=world_size, offload_optimizer=dc.offload_optimizer and
                   strategy == "deepspeed",
                   offload_params=dc.offload_params and sharding == "zero3",
                   gradient_checkpointing=mc.gradient_checkpointing, regularizers=regs,
                   anchor_dtype=anchor, kl_ref_dtype=wdtype,
                   grad_accumulation=t.gradient_accumulation_steps,
                   attention=attention,  # type: ignore[arg-type]
                   autocast=precision.endswith("mixed") and strategy != "deepspeed",
                   trainable_params=trainable_params,
                   logit_positions=(min(logit_positions, (seq_len or cfg.data.max_length)
                                        * t.micro_batch_size)
                                    if t.logits == "targets" and logit_positions is not None
                                    else None))
    if t.logits == "targets" and logit_positions is None:
        est.notes.append("training.logits 'targets': logits at target positions only; without "
                         "the data's target counts the logits/loss term is counted at every "
                         "position (an upper bound)")
    if trainable_params is not None and trainable_params < shape.params:
        est.notes.append(
            f"{trainable_params:,} of {shape.params:,} parameters train (LoRA adapters / "
            "frozen parameters): weights counted in full, gradients, optimizer state and "
            "anchors for the trainable ones only; activations are not reduced (an upper bound "
            "when bottom layers are frozen)")
    elif (cfg.training.lora is not None or cfg.training.freeze != type(cfg.training.freeze)()) \
            and trainable_params is None:
        est.notes.append("training.lora/freeze: the trainable count needs the model; every "
                         "parameter counted as trainable (an upper bound)")
    est.details.update(params=shape.params, seq_len=seq_len or cfg.data.max_length,
                       precision=precision, sharding=sharding, optimizer=opt)
    return est


# ----------------------------------------------------------------------------- measurement

def current_rss_bytes() -> int:
    """This process's resident memory now (bytes; ``/proc/self/statm`` on Linux, else peak
    RSS): read it once right after the model is loaded to get the post-load baseline that
    :func:`measured_peak_bytes` subtracts."""
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError, AttributeError):  # not Linux
        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(ru if sys.platform == "darwin" else ru * 1024)


def measured_peak_bytes(baseline_rss: int | None = None) -> dict[str, Any]:
    """This process's peak memory so far, for train_result.json / summary.json.

    Returns ``{"device": "cuda", "peak_bytes": torch.cuda.max_memory_allocated(),
    "peak_reserved_bytes": ..., "host_peak_rss_bytes": ...}`` on a GPU, else ``{"device": "cpu",
    "peak_bytes": <peak RSS>, "host_peak_rss_bytes": <same>}``. Peak RSS (``ru_maxrss``) covers
    the whole process (interpreter, libraries, data), not only tensors.

    With ``baseline_rss`` (:func:`current_rss_bytes` read after the model loaded) it adds
    ``baseline_rss_bytes`` and ``host_growth_bytes = max(0, peak RSS - baseline)``: the memory
    that training added on top of the loaded model, to be compared with the estimate's
    ``total_bytes - loaded_weights_bytes`` (:func:`memory_line`). ``growth_masked`` is true
    when the peak RSS was reached before the baseline (e.g. while loading), so the growth is
    not observable.
    """
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss = int(ru if sys.platform == "darwin" else ru * 1024)  # bytes on macOS, KiB on Linux
    out: dict[str, Any] = {"device": "cpu", "peak_bytes": rss, "host_peak_rss_bytes": rss}
    if baseline_rss is not None:
        out.update(baseline_rss_bytes=int(baseline_rss),
                   host_growth_bytes=max(0, rss - int(baseline_rss)),
                   growth_masked=rss <= int(baseline_rss))
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            out.update(device="cuda", peak_bytes=int(torch.cuda.max_memory_allocated()),
                       peak_reserved_bytes=int(torch.cuda.max_memory_reserved()))
    except ImportError:  # pragma: no cover
        pass
    return out


def loaded_weights_bytes(est: MemoryEstimate) -> int:
    """The part of ``weights_bytes`` that exists as soon as the model is loaded (the parameters
    themselves, without autocast's cached 16-bit copies or ZeRO-3/FSDP's gathered layers)."""
    bpp = est.details.get("bytes_per_param", {}).get("weights")
    n = est.details.get("params")
    if bpp is None or n is None:
        return est.weights_bytes
    return min(est.weights_bytes, int(bpp * n / est.details.get("weights_divisor", 1)))


def memory_line(est: MemoryEstimate, measured: dict[str, Any]) -> str:
    """The run's one-line memory report, saying what each number covers.

    GPU: the estimate of the training peak next to ``torch.cuda.max_memory_allocated`` -- both
    count tensors only (weights included), so they are directly comparable. CPU: the estimate
    beyond the loaded weights next to the RSS growth over the post-load baseline (when
    ``measured`` has one), and the whole-process peak RSS, labelled as such (interpreter,
    libraries, data and allocator caches: not comparable with the estimate). Below 0.25 GiB
    of estimated training state, process overheads (lazy initialisation in the first
    backward, allocator caches, thread pools) are of the same size, which the line says.
    """
    g = 2 ** 30
    parts = (f"weights {est.weights_bytes / g:.2f}, grads {est.gradients_bytes / g:.2f}, "
             f"optimizer {est.optimizer_bytes / g:.2f}, regularizers "
             f"{est.regularizer_bytes / g:.2f}, activations {est.activations_bytes / g:.2f}")
    head = f"memory: estimated training peak {est.total_bytes / g:.2f} GiB per device ({parts})"
    if measured.get("device") == "cuda":
        return (f"{head}; measured torch.cuda.max_memory_allocated {measured['peak_bytes'] / g:.2f}"
                f" GiB (tensors only, comparable; ratio "
                f"{measured['peak_bytes'] / max(1, est.total_bytes):.2f})")
    beyond = est.total_bytes - loaded_weights_bytes(est)
    line = head + f"; {beyond / g:.2f} GiB of it beyond the loaded weights"
    if "host_growth_bytes" in measured and not measured.get("growth_masked"):
        grow = measured["host_growth_bytes"]
        line += (f"; measured RSS growth over the post-load baseline {grow / g:.2f} GiB "
                 f"(comparable with the {beyond / g:.2f}; glibc's heap keeps freed memory, "
                 "so it may read up to ~40 % higher)")
    elif "host_growth_bytes" in measured:
        line += "; RSS growth not observable (the process peak came before the baseline)"
    line += (f"; whole-process peak RSS {measured['peak_bytes'] / g:.2f} GiB (interpreter, "
             "libraries, data, allocator caches: not an estimate check)")
    if beyond < 0.25 * g:
        line += ("; a model this small is below the process's own overheads, so the numbers "
                 "are not a check of the estimator (see benchmarks/memory.py)")
    return line


# ----------------------------------------------------------------------------- CLI

def _fmt(n: float) -> str:
    return f"{n / 1e9:9.2f} GB {n / 2 ** 30:9.2f} GiB"


def _parse_count(s: str) -> int:
    s = s.strip().upper()
    mult = {"K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}.get(s[-1:], None)
    return int(float(s[:-1]) * mult) if mult else int(float(s))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m forgetkit.memory",
        description="Per-GPU memory estimate of full fine-tuning (see the module docstring "
                    "of forgetkit.memory for the formulas).")
    p.add_argument("model", nargs="?", help="hub id or local dir (config.json only)")
    p.add_argument("--params", type=_parse_count, help="parameter count, e.g. 7.24e9 or 7.24B")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--intermediate", type=int, help="MLP size (default 8/3 hidden)")
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int)
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--precision", choices=PRECISIONS, default="bf16-mixed")
    p.add_argument("--autocast", action="store_true",
                   help="mixed precision as torch.autocast over fp32 parameters (forgetkit)")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw")
    p.add_argument("--zero", type=int, choices=(0, 1, 2, 3), default=0, help="ZeRO stage")
    p.add_argument("--fsdp", action="store_true", help="FSDP full-shard")
    p.add_argument("--world-size", type=int, default=1)
    p.add_argument("--offload-optimizer", action="store_true")
    p.add_argument("--offload-params", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa")
    p.add_argument("--reg", action="append", default=[], choices=REGULARIZERS,
                   help="regularizer (repeatable)")
    p.add_argument("--anchor-dtype", choices=("float32", "bfloat16", "float16"),
                   default="float32")
    p.add_argument("--k", type=float, help="override the activation constant k (bytes)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    a = p.parse_args(argv)
    assumed = False  # the shape is typical_shape's assumption (only --params given)
    if a.model:
        from transformers import AutoConfig

        shape = shape_from_hf_config(AutoConfig.from_pretrained(a.model), params=a.params)
    elif a.params and a.hidden and a.layers:
        shape = ModelShape(a.params, a.hidden, a.layers, a.vocab, a.intermediate, a.heads,
                           a.kv_heads)
    elif a.params and not (a.hidden or a.layers):
        shape = typical_shape(a.params, a.vocab)
        assumed = True
    else:
        p.error("give a model (hub id / dir), --params alone, or --params, --hidden and "
                "--layers")
    sharding = "fsdp" if a.fsdp else ("none" if a.zero == 0 else f"zero{a.zero}")
    try:
        est = estimate(shape, seq_len=a.seq_len, micro_batch=a.micro_batch,
                       precision=a.precision, optimizer=a.optimizer, sharding=sharding,
                       world_size=a.world_size, offload_optimizer=a.offload_optimizer,
                       offload_params=a.offload_params,
                       gradient_checkpointing=a.gradient_checkpointing, regularizers=a.reg,
                       anchor_dtype=a.anchor_dtype, grad_accumulation=a.grad_accum,
                       attention=a.attention, autocast=a.autocast, k=a.k)
    except ValueError as e:
        p.error(str(e))
    if a.json:
        d = est.to_dict()
        d["model"] = asdict(shape)
        d["shape_assumed"] = assumed
        print(json.dumps(d, indent=1))
        return 0
    print(f"model: {shape.params / 1e9:.3f}B params, d={shape.hidden}, L={shape.layers}, "
          f"V={shape.vocab}, i={shape.inter}, heads={shape.n_heads}/{shape.n_kv_heads}"
          + ("  <- a typical Llama-like shape for this count (layers = d/128), assumed for "
             "the activations only; give --hidden/--layers/--vocab or a model for yours"
             if assumed else ""))
    if assumed:
        bpp = est.details["bytes_per_param"]
        per = bpp["weights"] + bpp["gradients"] + bpp["optimizer"]
        print(f"weights + gradients + optimizer = {per:g} bytes/param x {shape.params:,} = "
              f"{per * shape.params / 1e9:.2f} GB ({a.precision}, {a.optimizer}"
              + (": 2 + 2 + 4 fp32 master + 8 moments" if a.precision.endswith("-mixed")
                 and a.optimizer == "adamw" and not a.autocast else "") + ")")
    print(f"run: s={a.seq_len} b={a.micro_batch} accum={a.grad_accum} {a.precision}"
          f"{' (autocast)' if a.autocast else ''} {a.optimizer} {sharding} W={a.world_size} "
          f"ckpt={a.gradient_checkpointing} regs={','.join(a.reg) or '-'}")
    print(f"per GPU{'':19}{'decimal':>12} {'binary':>13}")
    for key in ("weights", "gradients", "optimizer", "regularizer", "activations"):
        print(f"  {key:<24}{_fmt(getattr(est, key + '_bytes'))}")
    print(f"  {'peak total':<24}{_fmt(est.total_bytes)}")
    if est.cpu_bytes:
        print(f"  {'offloaded to CPU':<24}{_fmt(est.cpu_bytes)}")
    print(("activations from the assumed shape: " if assumed else "")
          + f"activation k = {est.details['k']:.1f} bytes per token*hidden*layer "
          f"(layers {est.details['activations_layers_bytes'] / 1e9:.2f} GB, logits/loss "
          f"{est.details['logits_bytes'] / 1e9:.2f} GB)")
    for n in est.notes:
        print(f"  note: {n}")
    fits = [name for name, b in GPUS.items() if est.fits(b)]
    print("fits (<= 90 % of memory): " + (", ".join(fits) if fits else "none of "
                                          + ", ".join(GPUS)))
    if not math.isfinite(est.total_bytes):  # pragma: no cover
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
