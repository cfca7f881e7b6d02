"""Typed, closed configuration for forgetkit.

A config is YAML (read with ``yaml.safe_load``) mapped onto the dataclasses below. Loading is
strict: an unknown or misspelt key, a value of the wrong type or a value out of range raises
:class:`ConfigError` whose one-line message names the file, the dotted key, what was expected
and, for unknown keys, the nearest valid key ("did you mean ..."). The command-line faces
catch it, print the line, and exit with status 2 before anything is written.

Regularizers: each item of ``regularizers:`` is built by its ``type`` into that type's own
class, which holds exactly the keys the type uses -- :class:`L2Config` (``type: l2``, L2-SP),
:class:`EWCConfig` (``type: ewc``) and :class:`KLConfig` (``type: kl``, KL to the initial
model); :data:`RegularizerConfig` is their union. ``type`` is required; a key of another type
fails with which type it belongs to. ``lambda`` is the YAML spelling of ``lam`` on every type.
Fields that name or size the data a regularizer needs (:attr:`EWCConfig.DATA_KEYS`,
:attr:`KLConfig.DATA_KEYS`) are read by the data layer (:mod:`forgetkit.data.sets`), which
builds the batches; every other field but ``type`` is a constructor argument of the
regularizer (``tests/test_config.py`` binds each class to its constructor's signature).

Replay is data, not a regularizer: ``data.replay: {data: <DatasetSpec>, ratio: r}``
(:class:`ReplayConfig`). The legacy spelling ``regularizers: [{type: replay, data: ..., ratio:
...}]`` still loads: it is moved to ``data.replay`` with a ``FutureWarning`` naming the new
spelling (a ``config.yaml`` written by forgetkit before this split, whose regularizer entries
spell out every key of the old shared class, is read back without a warning).

Command-line overrides use ``section.key=value``; the value is parsed as YAML
(``training.lr=3e-4``, ``data.train.limit=null``, ``regularizers=[]``,
``regularizers.0.lambda=5``, ``data.replay.ratio=0.2``).

This module imports nothing else from forgetkit (it sits at the bottom of the import graph).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "ConfigError",
    "FORMAT_FIELDS",
    "ModelConfig",
    "DatasetSpec",
    "ReplaySource",
    "ReplayConfig",
    "DataConfig",
    "TrainingConfig",
    "LoRAConfig",
    "FreezeConfig",
    "DistributedConfig",
    "OutputConfig",
    "L2Config",
    "EWCConfig",
    "KLConfig",
    "RegularizerConfig",
    "REGULARIZER_CONFIGS",
    "TRACKERS",
    "MetricSpec",
    "MergeSpec",
    "EvaluationConfig",
    "ArmSpec",
    "ExperimentOptions",
    "SequenceReplayConfig",
    "StageSpec",
    "SequenceConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "check_slug",
    "check_complete",
    "regularizer_data_specs",
    "apply_overrides",
    "parse_overrides",
    "config_to_dict",
    "dump_config",
]


class ConfigError(ValueError):
    """A user-facing configuration error; its message is one line, shown without a traceback."""


# Template fields of each data format (the keys a DatasetSpec's ``fields:`` may map to columns).
# forgetkit.data.templates reads its defaults from here, so the schema and the templates agree.
FORMAT_FIELDS: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "input", "output"),
    "chat": ("messages", "instruction", "input", "output"),
    "text": ("text",),
}


def _f(default: Any = dataclasses.MISSING, *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, factory: Any = None, doc: str = "",
       missing: str = "") -> Any:
    """A dataclass field with an optional numeric range checked at load time.

    Without a default (and factory) the key is required; ``missing`` is then what the
    ConfigError says when a config leaves it out."""
    meta = {"ge": ge, "gt": gt, "le": le, "lt": lt, "doc": doc, "missing": missing}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------- schema

@dataclass
class ModelConfig:
    """Which causal LM to fine-tune and how to load it."""

    name_or_path: str | None = _f(None, doc="hub id, local directory, or a model alias")
    gguf_file: str | None = _f(None, doc="GGUF file name inside name_or_path (dequantised on load)")
    random_init: dict[str, Any] | None = _f(
        None, doc="build a random-init model from this config dict (needs model_type); tests/smoke")
    tokenizer: str | None = _f(
        None, doc="tokenizer hub id/dir; default: name_or_path; 'byte' = built-in byte-level")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = _f(
        "float32", doc="dtype of the weights as loaded (the trained master weights)")
    trust_remote_code: bool = _f(False)
    gradient_checkpointing: bool = _f(False)
    attn_implementation: str | None = _f(None, doc="e.g. sdpa, eager, flash_attention_2")
    revision: str | None = _f(None)
    init_seed: int = _f(0, doc="random_init: weights seed (fixed across run seeds: one base)")


@dataclass
class DatasetSpec:
    """One data source and how its records become token sequences."""

    path: str | None = _f(None, doc="local .json/.jsonl/.csv/.parquet file (or a dataset alias)")
    name: str | None = _f(None, doc="Hugging Face hub dataset name")
    config: str | None = _f(None, doc="hub dataset config name")
    split: str = _f("train")
    format: Literal["instruction", "chat", "text"] = _f("instruction")
    fields: dict[str, str] = _f(factory=dict, doc="template field -> column name")
    limit: int | None = _f(None, ge=1, doc="use only the first N records (after shuffling)")
    shuffle_before_limit: bool = _f(True)


@dataclass
class ReplaySource:
    """One further source of replay examples: a seeded buffer of ``examples`` records of
    ``data`` (``forgetkit.data.sets.replay_buffer``). A task sequence's runner writes one per
    earlier stage (``sequence.replay``); a config may also list its own."""

    data: DatasetSpec = _f(missing="a replay source needs a data source")
    examples: int | None = _f(None, ge=1, doc="buffer size: a seeded subset of this many records "
                              "(after the source's own limit); null: all of them")


@dataclass(kw_only=True)
class ReplayConfig:
    """Replay (rehearsal): general examples mixed into the fine-tuning stream.

    Replay is data, not a regularizer. The data layer tokenises ``data`` like the task's
    examples (``forgetkit.data.sets.build_example_sets``; ``source`` tag 1, so the loss is also
    logged as ``loss/replay``) and the batch planner (``forgetkit.data.batching.epoch_stream``)
    adds replay draws to each epoch's shuffled task examples: the task examples all stay, and
    ``n_replay = round(ratio * T)`` of the ``T = n_task + n_replay`` examples of the epoch's
    stream are replay (T the smallest total for which that holds), spread evenly, drawn without
    replacement from a seeded permutation of the replay pool (cycling when an epoch needs more).
    The ratio is exact over each epoch's whole stream, not per step: length grouping then sorts
    replay and task examples together (steps hold different replay shares), and a run that
    stops inside an epoch (``training.max_steps``) trains on the share of the steps it took
    (``train_result.json`` records ``n_replay_trained`` and the log's ``loss/replay`` the steps that
    had replay examples).

    The pool is ``data``'s examples followed by each of ``sources`` (a seeded buffer each), in
    order; at least one of the two is required. A task sequence (``sequence.replay``) fills
    ``sources`` with a buffer of every earlier stage's training data.
    """

    data: DatasetSpec | None = _f(None, doc="the general data whose examples are mixed in")
    ratio: float = _f(0.1, gt=0.0, lt=1.0, doc="fraction of the training stream that is replay")
    sources: list[ReplaySource] = _f(factory=list, doc="further replay sources (seeded buffers), "
                                     "pooled with data")


@dataclass
class DataConfig:
    """The fine-tuning task's data, how it is tokenised and batched, and optional replay."""

    train: DatasetSpec = _f(factory=DatasetSpec)
    validation: DatasetSpec | None = _f(None)
    validation_fraction: float = _f(0.05, ge=0.0, lt=1.0,
                                    doc="held out of train when no validation source is given")
    max_length: int = _f(512, ge=8)
    train_on_prompt: bool = _f(False, doc="also put loss on prompt tokens")
    batching: Literal["length_grouped", "padding_free", "packed", "random"] = _f(
        "length_grouped", doc="length_grouped: batches of similar lengths, right-padded; "
        "padding_free: the same batches, each micro-batch's examples concatenated into one row "
        "with per-example positions and attention kept inside each example (no padding; the "
        "same loss and steps up to float rounding; refused at start where the model's "
        "attention cannot keep the boundaries); packed: format text only, examples "
        "concatenated and cut into max_length blocks (attention crosses documents); random: "
        "no grouping")
    pad_to_multiple_of: int = _f(8, ge=1)
    replay: ReplayConfig | None = _f(None, doc="mix general examples into the training stream")


@dataclass
class LoRAConfig:
    """Train low-rank adapters (peft LoRA) instead of every weight; merged into a standard HF
    checkpoint for evaluation."""

    r: int = _f(8, ge=1, doc="adapter rank")
    alpha: float = _f(16.0, gt=0.0, doc="scaling numerator: the update is (alpha / r) * B A")
    dropout: float = _f(0.0, ge=0.0, lt=1.0)
    target_modules: list[str] = _f(
        factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                         "down_proj"], doc="module names (peft's target_modules)")
    bias: Literal["none", "all", "lora_only"] = _f("none")


@dataclass
class FreezeConfig:
    """Parameters kept at their initial values (no gradient, no optimizer state)."""

    embeddings: bool = _f(False, doc="freeze the input embeddings (and a tied output head)")
    bottom_layers: int = _f(0, ge=0, doc="freeze decoder layers 0..k-1")
    patterns: list[str] = _f(factory=list, doc="regex patterns of parameter names to freeze")


@dataclass
class TrainingConfig:
    micro_batch_size: int = _f(4, ge=1)
    gradient_accumulation_steps: int = _f(1, ge=1)
    epochs: int = _f(1, ge=1)
    max_steps: int | None = _f(None, ge=1, doc="optimizer steps; overrides epochs when set")
    lr: float = _f(2e-5, gt=0.0)
    weight_decay: float = _f(0.0, ge=0.0)
    betas: list[float] = _f(factory=lambda: [0.9, 0.999])
    eps: float = _f(1e-8, gt=0.0)
    optimizer: Literal["adamw", "adamw_8bit", "sgd"] = _f("adamw")
    momentum: float = _f(0.0, ge=0.0, lt=1.0, doc="SGD momentum")
    fused: Literal["auto", "on", "off"] = _f("auto", doc="fused/foreach AdamW kernels")
    scheduler: Literal["cosine", "constant", "linear"] = _f("cosine")
    warmup_steps: int | None = _f(None, ge=0)
    warmup_ratio: float = _f(0.0, ge=0.0, le=1.0)
    min_lr_ratio: float = _f(0.1, ge=0.0, le=1.0, doc="cosine floor as a fraction of peak lr")
    layer_lr_decay: float | None = _f(
        None, gt=0.0, le=1.0, doc="ULMFiT discriminative lr: layer l from the top gets lr*xi**l")
    max_grad_norm: float | None = _f(1.0, gt=0.0)
    clip_scope: Literal["all", "loss"] = _f(
        "all", doc="what max_grad_norm clips: 'all' = loss gradient plus the regularizers' "
        "gradient terms (coupled L2-SP/EWC), as when a penalty is added to the loss; 'loss' = "
        "the loss gradient only, the gradient terms are added after the clip (a stiff EWC "
        "term then cannot shrink the task gradient; not with DeepSpeed)")
    logits: Literal["targets", "all"] = _f(
        "targets", doc="where the LM head computes logits: 'targets' = only at the positions "
        "that have a target token (transformers' logits_to_keep with a boolean mask: the "
        "loss is the same sum, but the vocabulary projection and the cross-entropy skip "
        "prompt and padding positions; probed before training, every position where the "
        "model does not support it), 'all' = at every position (as HF Trainer)")
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = _f(
        "no", doc="bf16/fp16: autocast with fp32 master weights (fp16: CUDA only); auto: bf16 "
        "where this device runs a bf16 matmul measurably faster than fp32 (CUDA with bf16 "
        "support; a CPU with fast bf16, e.g. AMX), else no; the choice is logged and recorded")
    eval_every: int = _f(0, ge=0, doc="validation loss every N optimizer steps (0: at the end)")
    log_every: int = _f(1, ge=1)
    checkpoint_every: int = _f(0, ge=0, doc="checkpoint every N optimizer steps (0: end only)")
    keep_checkpoints: int = _f(1, ge=1)
    resume: bool = _f(True, doc="continue from the newest checkpoint in the output dir")
    lora: LoRAConfig | None = _f(None, doc="train peft LoRA adapters instead of every weight")
    freeze: FreezeConfig = _f(factory=FreezeConfig, doc="parameters kept at their initial "
                              "values")


@dataclass
class DistributedConfig:
    strategy: Literal["auto", "ddp", "fsdp", "deepspeed"] = _f(
        "auto", doc="auto: DDP when several processes, else single process")
    cpu: bool | None = _f(None, doc="force CPU (gloo); default: CPU when CUDA is unavailable")
    zero_stage: Literal[1, 2, 3] = _f(2, doc="DeepSpeed ZeRO stage")
    offload_optimizer: bool = _f(False, doc="DeepSpeed: optimizer state on CPU")
    offload_params: bool = _f(False, doc="DeepSpeed ZeRO-3: parameters on CPU")
    fsdp_reshard_after_forward: bool = _f(True)


# Experiment trackers forgetkit can log to (through accelerate's tracker integrations); the
# choices of ``OutputConfig.trackers`` (tests/test_config.py keeps the two equal).
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow")


@dataclass
class OutputConfig:
    """Where a run writes, and what it writes besides its own files."""

    dir: str = _f("runs/{name}", doc="output directory; {name} expands to the config's name")
    save_model: bool = _f(True)
    trackers: list[Literal["tensorboard", "wandb", "trackio", "mlflow"]] = _f(
        factory=list, doc="experiment trackers, through accelerate (each at most once); "
        "train_log.jsonl is always written")


_LAM_DOC = "strength lambda (YAML key: lambda or lam)"
_INCLUDE_DOC = "regex patterns of parameter names (default all)"


@dataclass
class L2Config:
    """``type: l2``: L2-SP, a pull of the weights towards their initial values theta0.

    Coupled: the gradient ``lam * (theta - theta0)`` of ``lam/2 * ||theta - theta0||^2`` joins
    the loss gradient (before the clip); decoupled: ``theta <- theta - lr * lam * (theta -
    theta0)`` after each optimizer step, outside the optimizer's preconditioning
    (:class:`forgetkit.regularizers.l2.L2SP`; every field but ``type`` is its argument).

    ``anchor`` says which weights theta0 is in a task sequence: ``previous`` (default) the
    stage's initial model (the previous stage's final one), ``base`` the sequence's base model.
    In a single run both are the initial model. ``anchor_path`` is filled by the runner (the
    base model's checkpoint, for ``base`` in stages after the first); set by hand it names a
    local safetensors checkpoint whose tensors become theta0, checked by name and shape.
    """

    DATA_KEYS: ClassVar[tuple[str, ...]] = ()

    type: Literal["l2"] = _f("l2")
    lam: float = _f(1.0, ge=0.0, doc=_LAM_DOC)
    variant: Literal["coupled", "decoupled"] = _f("coupled", doc="where the pull acts")
    include: list[str] = _f(factory=list, doc=_INCLUDE_DOC)
    exclude: list[str] = _f(factory=list)
    anchor_dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", doc="dtype theta0 is kept in")
    anchor: Literal["previous", "base"] = _f(
        "previous", doc="task sequence: theta0 = the stage's initial model (previous) or the "
        "sequence's base model (base)")
    anchor_path: str | None = _f(None, doc="load theta0 from this local safetensors checkpoint "
                                 "(the runner sets it for anchor: base)")


@dataclass
class EWCConfig:
    """``type: ewc``: elastic weight consolidation, ``lam/2 * sum F * (theta - theta0)^2``.

    F is the diagonal Fisher at theta0, estimated on ``fisher_examples`` examples (a seeded
    subset) of ``fisher_data`` in batches of ``fisher_batch_size`` -- those three keys
    (:attr:`DATA_KEYS`) go to the data layer, which builds the batches; the other fields but
    ``type`` are arguments of :class:`forgetkit.regularizers.ewc.EWC` (``fisher_postprocess``
    and ``fisher_clamp`` as ``postprocess`` and ``clamp``). ``fisher_data`` may be left out
    only when ``fisher_path`` names an existing Fisher file.
    """

    DATA_KEYS: ClassVar[tuple[str, ...]] = ("fisher_data", "fisher_examples", "fisher_batch_size")

    type: Literal["ewc"] = _f("ewc")
    lam: float = _f(1.0, ge=0.0, doc=_LAM_DOC)
    include: list[str] = _f(factory=list, doc=_INCLUDE_DOC)
    exclude: list[str] = _f(factory=list)
    anchor_dtype: Literal["float32", "bfloat16", "float16"] = _f(
        "float32", doc="dtype theta0 is kept in")
    fisher_data: DatasetSpec | None = _f(None, doc="data the Fisher is estimated on (general "
                                         "data whose abilities should be kept)")
    fisher_examples: int = _f(256, ge=1, doc="examples of fisher_data used (a seeded subset)")
    fisher_batch_size: int = _f(8, ge=1, doc="examples per batch of the estimate")
    estimator: Literal["empirical", "sampled", "batched"] = _f("empirical")
    fisher_samples: int = _f(1, ge=1, doc="sampled estimator: label draws per example")
    fisher_path: str | None = _f(None, doc="load/save the Fisher here (safetensors)")
    fisher_postprocess: Literal["none", "max_normalize", "clamp"] = _f("none")
    fisher_clamp: float | None = _f(None, gt=0.0, doc="cap of F (fisher_postprocess: clamp)")
    online_gamma: float | None = _f(None, gt=0.0, le=1.0, doc="online EWC decay")


@dataclass(kw_only=True)
class KLConfig:
    """``type: kl``: ``lam * mean_t KL(p_theta0 || p_theta)`` over the target tokens of a batch
    of general data, both next-token distributions at ``temperature`` T (``softmax(z / T)``, no
    ``T^2`` factor), against a frozen copy of the initial model; one KL batch per micro-batch.

    ``data`` and ``batch_size`` (:attr:`DATA_KEYS`) go to the data layer, which builds the
    endless seeded batch stream; ``lam`` and ``temperature`` are arguments of
    :class:`forgetkit.regularizers.kl.KLToInit`. ``fisher_batch_size`` is accepted as the
    legacy spelling of ``batch_size``.
    """

    DATA_KEYS: ClassVar[tuple[str, ...]] = ("data", "batch_size")

    type: Literal["kl"] = _f("kl")
    lam: float = _f(1.0, ge=0.0, doc=_LAM_DOC)
    data: DatasetSpec = _f(missing="a 'kl' regularizer needs a data source (the general data "
                           "the KL is computed on)", doc="the general data the KL is taken on")
    temperature: float = _f(1.0, gt=0.0)
    batch_size: int = _f(8, ge=1, doc="examples per KL batch (legacy key: fisher_batch_size)")


# One item of ``regularizers:``, chosen by its ``type`` (the loader dispatches on it).
RegularizerConfig = L2Config | EWCConfig | KLConfig
REGULARIZER_CONFIGS: dict[str, type] = {"l2": L2Config, "ewc": EWCConfig, "kl": KLConfig}


@dataclass
class MetricSpec:
    """One evaluation: an lm-eval task, or a forgetkit metric computed on local data.

    kinds: ``lm_eval`` (a task by name: built-in, or forgetkit's shipped YAMLs / ``include_path``),
    ``perplexity`` (token-level NLL of raw text, reported as ``nll`` and ``ppl``),
    ``answer_nll`` (mean NLL per token of the response given the prompt, on held-out records),
    ``generation`` (greedy generation scored by exact match, token F1 and ROUGE-L).
    """

    name: str = _f("", doc="label in the results (default: the task name)")
    kind: Literal["lm_eval", "perplexity", "answer_nll", "generation"] = _f("lm_eval")
    task: str | None = _f(None, doc="lm_eval: the task name")
    metric: str | None = _f(None, doc="lm_eval: headline metric (default acc_norm, else acc)")
    include_path: str | None = _f(None, doc="lm_eval: extra directory of task YAMLs")
    num_fewshot: int | None = _f(None, ge=0)
    limit: int | None = _f(None, ge=1, doc="evaluate only the first N items")
    data: DatasetSpec | None = _f(None, doc="perplexity/answer_nll/generation: the records")
    max_length: int = _f(512, ge=8)
    max_new_tokens: int = _f(32, ge=1)


@dataclass
class MergeSpec:
    """One merge toward the base model, scored after training without retraining.

    kinds (numerics in :mod:`forgetkit.regularizers.merge`):

    * ``layerwise``: ``θ0 + α_l (θ* − θ0)`` with ``α_l`` linear over depth, ``alpha_bottom``
      at decoder layer 0 (and the embeddings) to ``alpha_top`` at the last layer (and the
      final norm and head); both required, each in [0, 1] (interpolation toward the base).
    * ``task_vectors``: ``θ0 + Σ_k scales[k] (θ_k − θ0)`` (task arithmetic); ``checkpoints``
      lists the fine-tuned models, ``run`` standing for this run's own (default ``[run]``; it
      must be among them: the merge is scored per run), any other entry a local HF checkpoint
      directory of the same architecture; one scale per checkpoint, each in [-2, 2].

    Scores land in the run's ``eval_after.json`` (and ``summary.json``) under
    ``after.merge.<name>``, with the same structure as ``after`` itself.
    """

    KINDS: ClassVar[dict[str, tuple[str, ...]]] = {
        "layerwise": ("alpha_bottom", "alpha_top"),
        "task_vectors": ("scales", "checkpoints"),
    }
    SCALE_RANGE: ClassVar[tuple[float, float]] = (-2.0, 2.0)
    RUN: ClassVar[str] = "run"

    name: str = _f(missing="a merge needs a name (its key in the results; a safe name)",
                   doc="key in the results (after.merge.<name>) and scratch directory name")
    kind: Literal["layerwise", "task_vectors"] = _f(
        missing="a merge needs a kind: layerwise or task_vectors")
    alpha_bottom: float | None = _f(None, ge=0.0, le=1.0,
                                    doc="layerwise: coefficient of layer 0 and the embeddings")
    alpha_top: float | None = _f(None, ge=0.0, le=1.0,
                                 doc="layerwise: coefficient of the last layer, final norm, head")
    scales: list[float] = _f(factory=list, doc="task_vectors: one scale per checkpoint")
    checkpoints: list[str] = _f(factory=list, doc="task_vectors: fine-tuned checkpoints; 'run' "
                                "= this run's model (default [run])")


@dataclass
class EvaluationConfig:
    task: list[MetricSpec] = _f(factory=list, doc="metrics of the fine-tuning task (learning)")
    general: list[MetricSpec] = _f(factory=list, doc="general capability (forgetting)")
    batch_size: int = _f(8, ge=1)
    device: str = _f("auto", doc="auto: cuda when available, else cpu")
    wise_alphas: list[float] = _f(factory=list, doc="WiSE-FT: also score θ0+α(θ*−θ0)")
    merge: list[MergeSpec] = _f(factory=list, doc="merges toward the base, each also scored "
                                "after training (after.merge.<name>); see MergeSpec")


@dataclass
class AnalysisConfig:
    """How the results are analysed (forgetkit.results): read from the results, never part of a
    run's identity -- changing it recomputes tables, not runs."""

    headline: list[str] = _f(factory=list, doc="general metrics the tables and figures lead "
                             "with (besides the unit-free aggregate std_forgetting)")
    aggregate_exclude: list[str] = _f(factory=list, doc="general metrics left out of "
                                      "std_forgetting (e.g. a benchmark that cannot move)")
    reference_arm: str | None = _f(None, doc="the arm whose WiSE-FT curve (evaluation."
                                   "wise_alphas) gives the matched-gain comparison")
    baseline_arm: str | None = _f("naive", doc="every other arm's task gain and forgetting are "
                                  "also given as a paired difference to this arm (vs_<arm>_*)")
    n_boot: int = _f(2000, ge=100, doc="bootstrap replicates of every paired CI")
    confidence: float = _f(0.95, gt=0.5, lt=1.0)
    boot_seed: int = _f(0, doc="seed of the bootstrap's item/seed resampling")


@dataclass
class ArmSpec:
    """One arm of an experiment: a name and ``section.key: value`` overrides of the base."""

    name: str = _f("")
    overrides: dict[str, Any] = _f(factory=dict)
    grid: dict[str, list[Any]] = _f(
        factory=dict, doc="dotted key -> values: the arm expands into one arm per combination")


@dataclass
class ExperimentOptions:
    seeds: list[int] = _f(factory=lambda: [0])
    arms: list[ArmSpec] = _f(factory=list)
    results_dir: str = _f("results/{name}")
    keep_checkpoints: bool = _f(False, doc="keep model/ and checkpoints/ of finished runs")
    launcher: list[str] = _f(factory=list, doc="training-stage launcher, e.g. [torchrun, "
                             "--nproc_per_node, '4']; default: this Python, one process")


@dataclass
class SequenceReplayConfig:
    """Replay from the earlier stages of a task sequence: stage ``k``'s replay pool holds a
    seeded buffer of ``buffer_per_stage`` records of each earlier stage's training data (and the
    arm's own ``data.replay.data``, if any), mixed at ``ratio`` of each epoch's stream (the
    batch planner's rule, :class:`ReplayConfig`: exact per epoch, not per step, and a stage
    that stops inside its epoch trains on its steps' share). Stage 0 has no sequence replay."""

    ratio: float = _f(0.1, gt=0.0, lt=1.0, doc="fraction of each stage's stream that is replay")
    buffer_per_stage: int = _f(64, ge=1, doc="records kept of each earlier stage's data")


@dataclass
class StageSpec:
    """One stage of a task sequence: fine-tune on ``data`` (its ``data.train``), scored by the
    evaluation.task metric ``metric``; ``overrides`` apply after the arm's."""

    name: str = _f(missing="a stage needs a name (a safe name: its folder is stage-<k>-<name>)")
    data: DatasetSpec = _f(missing="a stage needs its training data (it becomes data.train)")
    metric: str = _f(missing="a stage needs the name of the evaluation.task metric that scores "
                     "its task")
    overrides: dict[str, Any] = _f(factory=dict, doc="dotted overrides of this stage (after the "
                                   "arm's), as in experiment.arms")


@dataclass
class SequenceConfig:
    """A task sequence (continual fine-tuning): stage ``k >= 1`` fine-tunes stage ``k-1``'s
    final model; every stage is scored on every stage's metric and the general suite
    (``forgetkit.runner``, ``forgetkit.results.sequence``)."""

    stages: list[StageSpec] = _f(missing="a sequence needs its stages (at least two)")
    replay: SequenceReplayConfig | None = _f(None, doc="replay from earlier stages' data")


@dataclass
class Config:
    name: str = _f("run")
    seed: int = _f(0)
    model: ModelConfig = _f(factory=ModelConfig)
    data: DataConfig = _f(factory=DataConfig)
    training: TrainingConfig = _f(factory=TrainingConfig)
    distributed: DistributedConfig = _f(factory=DistributedConfig)
    output: OutputConfig = _f(factory=OutputConfig)
    regularizers: list[RegularizerConfig] = _f(factory=list)
    evaluation: EvaluationConfig = _f(factory=EvaluationConfig)
    experiment: ExperimentOptions = _f(factory=ExperimentOptions)
    analysis: AnalysisConfig = _f(factory=AnalysisConfig)
    sequence: SequenceConfig | None = _f(None, doc="a task sequence: the runner expands every "
                                         "arm x seed into one run per stage")

    def output_dir(self) -> Path:
        return Path(self.output.dir.format(name=self.name))


# Keys accepted as aliases in YAML (``lambda`` is a Python keyword; KL's batch size was once
# spelt ``fisher_batch_size``, shared with EWC). Giving a key and its alias both is an error.
_ALIASES: dict[type, dict[str, str]] = {
    L2Config: {"lambda": "lam"},
    EWCConfig: {"lambda": "lam"},
    KLConfig: {"lambda": "lam", "fisher_batch_size": "batch_size"},
}
# Aliases accepted but not offered in "did you mean" / "valid keys" hints.
_LEGACY_ALIASES = {"fisher_batch_size"}

# Keys that once existed: a config that still sets one fails with what to use instead (a key
# accepted and ignored would let a user believe it did something).
_REMOVED = {OutputConfig: {"overwrite": "removed (it was never read); to replace a finished "
                                        "run, pass --force to forgetkit.run"}}

# A name that becomes a directory (experiment, arm): no path separators, no '.'/'..', nothing a
# shell or a file system treats specially. '+' is allowed beyond the issue's ._-=@ because the
# shipped experiments (and their results directories) name combined arms so: 'ewc+replay10'.
_SLUG_CHARS = r"A-Za-z0-9._=@+-"
_SLUG_RE = re.compile(f"^[{_SLUG_CHARS}]+$")


def check_slug(value: str, key: str, src: str) -> None:
    """Reject a name that is not safe as one path component (it names a directory).

    ``name: ../../x`` would write outside the output and results directories; an arm named
    ``../victim`` with ``--force`` would delete outside them.
    """
    if not value or not _SLUG_RE.match(value) or value in (".", ".."):
        bad = sorted({c for c in value if not re.match(f"[{_SLUG_CHARS}]", c)})
        why = (f" (it contains {', '.join(repr(c) for c in bad)})" if bad else
               " (empty)" if not value else " ('.' and '..' are not names)")
        raise ConfigError(f"{src}: {key}: {value!r} is not a safe name{why}; use letters, "
                          "digits and ._-=@+ only")


# ----------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        parts = [a for a in get_args(tp) if a is not type(None)]
        inner = " or ".join(_type_name(a) for a in parts)
        return inner + (" or null" if type(None) in get_args(tp) else "")
    if origin is list:
        return f"a list of {_type_name(get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        tp, getattr(tp, "__name__", str(tp)))


_NUM_RE = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(tp: Any, value: Any, key: str, src: str) -> Any:
    def fail(expected: str | None = None) -> typing.NoReturn:
        raise ConfigError(
            f"{src}: {key}: expected {expected or _type_name(tp)}, got {value!r}")

    if tp is Any:
        _check_finite(value, key, src)
        return value
    origin = get_origin(tp)
    if origin in (Union, types.UnionType) and _tags(tp):
        return _build_tagged(tp, value, key, src)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None:
            if type(None) in args:
                return None
            fail()
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key, src)
            except ConfigError as e:
                errors.append(e)
        if len(errors) == 1:
            raise errors[0]
        fail()
    if origin is Literal:
        if value in get_args(tp) and type(value) in {type(a) for a in get_args(tp)}:
            return value
        choices = [str(a) for a in get_args(tp)]
        near = difflib.get_close_matches(str(value), choices, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ConfigError(f"{src}: {key}: expected {_type_name(tp)}, got {value!r}{hint}")
    if origin is list:
        if not isinstance(value, list):
            fail()
        (inner,) = get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]", src) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            fail()
        _, vt = get_args(tp)
        return {str(k): _coerce(vt, v, f"{key}.{k}", src) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key, src)
    if tp is bool:
        if isinstance(value, bool):
            return value
        fail()
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _NUM_RE.match(value.strip()) and float(value).is_integer():
            return int(float(value))
        fail()
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            _check_finite(value, key, src)
            return float(value)
        # PyYAML reads "1e-5" (no dot) as a string: accept numeric strings.
        if isinstance(value, str) and _NUM_RE.match(value.strip()):
            _check_finite(float(value), key, src)  # 1e999 overflows to inf
            return float(value)
        fail()
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        fail()
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a bug in the schema


def _tags(tp: Any) -> dict[str, type]:
    """``type`` value -> class, for a union of dataclasses that each fix ``type`` to one
    literal (a tagged union such as :data:`RegularizerConfig`); empty for any other type."""
    out: dict[str, type] = {}
    for a in get_args(tp):
        if not dataclasses.is_dataclass(a):
            return {}
        hint = get_type_hints(a).get("type")
        if get_origin(hint) is not Literal or len(get_args(hint)) != 1:
            return {}
        out[get_args(hint)[0]] = a
    return out


# Tags that were once accepted in a tagged union, and what to write instead.
_MOVED_TAGS = {"replay": "replay is data now: write data.replay: {data: ..., ratio: ...}"}


def _build_tagged(tp: Any, value: Any, key: str, src: str) -> Any:
    """Build one item of a tagged union by its ``type`` key (required, with did-you-mean)."""
    tags = _tags(tp)
    choice = "|".join(tags)
    if not isinstance(value, dict):
        raise ConfigError(f"{src}: {key}: expected a mapping with type: {choice}, got {value!r}")
    if "type" not in value:
        raise ConfigError(f"{src}: {key}.type: missing; expected type: {choice} (which kind "
                          f"this entry is), got keys {', '.join(map(str, value)) or 'none'}")
    t = value["type"]
    if t in _MOVED_TAGS and t not in tags:
        raise ConfigError(f"{src}: {key}.type: {t!r} is not a type here; {_MOVED_TAGS[t]}")
    _coerce(Literal[tuple(tags)], t, f"{key}.type", src)  # one of them, or did-you-mean
    return _build(tags[t], value, key, src)


def _check_finite(value: Any, key: str, src: str) -> None:
    """Reject inf/nan (YAML ``.inf``, ``.nan``) anywhere a number is read, nested values too.

    No setting of forgetkit means anything at infinity: ``lr: .inf`` used to train (and, on a
    resumed run, rewrite the run's files) with NaN weights.
    """
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{src}: {key}: expected a finite number, got {value!r}")
    if isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}", src)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]", src)


def _check_range(f: dataclasses.Field, value: Any, key: str, src: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return
    m = f.metadata
    bounds = []
    ok = True
    if m.get("ge") is not None:
        bounds.append(f">= {m['ge']}")
        ok &= value >= m["ge"]
    if m.get("gt") is not None:
        bounds.append(f"> {m['gt']}")
        ok &= value > m["gt"]
    if m.get("le") is not None:
        bounds.append(f"<= {m['le']}")
        ok &= value <= m["le"]
    if m.get("lt") is not None:
        bounds.append(f"< {m['lt']}")
        ok &= value < m["lt"]
    if not ok:
        raise ConfigError(f"{src}: {key}: expected a value {' and '.join(bounds)}, got {value!r}")


def _other_owner(cls: type, key: str) -> str:
    """For an unknown key of a regularizer type: which other type (or section) it belongs to,
    as a phrase, or '' when none."""
    if cls not in REGULARIZER_CONFIGS.values():
        return ""
    mine = get_args(get_type_hints(cls)["type"])[0]
    owners = [t for t, c in REGULARIZER_CONFIGS.items() if c is not cls and
              (key in {f.name for f in dataclasses.fields(c)} or key in _ALIASES.get(c, {}))]
    replay = key in {f.name for f in dataclasses.fields(ReplayConfig)}
    if owners:
        which = " and ".join(f"'{t}'" for t in owners)
        also = " (and of data.replay)" if replay else ""
        return (f"'{key}' is a key of type{'s' if len(owners) > 1 else ''} {which}{also}, "
                f"not '{mine}'")
    if replay:
        return f"'{key}' is a key of data.replay (replay is data, not a regularizer), not '{mine}'"
    return ""


def _build(cls: type, raw: Any, where: str, src: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{src}: {where or '(top level)'}: expected a mapping, got {raw!r}")
    hints = get_type_hints(cls)
    fmap = {f.name: f for f in dataclasses.fields(cls)}
    aliases = _ALIASES.get(cls, {})
    removed = _REMOVED.get(cls, {})
    kwargs: dict[str, Any] = {}
    given: dict[str, str] = {}  # field name -> the key it was given as
    prefix = where + "." if where else ""
    for k, v in raw.items():
        name = aliases.get(k, k)
        dotted = f"{prefix}{k}"
        if name not in fmap and k in removed:
            raise ConfigError(f"{src}: {dotted}: {removed[k]}")
        if name not in fmap:
            valid = sorted((set(fmap) | set(aliases)) - _LEGACY_ALIASES)
            owner = _other_owner(cls, str(k))
            # a key of another type: suggest only this type's spelling of the same thing
            # (EWC's data is fisher_data), not whatever looks alike
            near = ([v for v in valid if str(k) in v] if owner else
                    difflib.get_close_matches(str(k), valid, n=1, cutoff=0.5))
            hint = (f"; did you mean '{prefix}{near[0]}'?" if near
                    else "" if owner else f"; valid keys: {', '.join(valid)}")
            if owner:
                hint = f": {owner}{hint}" + ("" if near else f" (its keys: {', '.join(valid)})")
            raise ConfigError(f"{src}: unknown key '{dotted}'{hint}")
        if name in given:
            raise ConfigError(f"{src}: {prefix}{k}: given twice (as '{given[name]}' and '{k}', "
                              "which mean the same); keep one")
        given[name] = str(k)
        value = _coerce(hints[name], v, dotted, src)
        _check_range(fmap[name], value, dotted, src)
        kwargs[name] = value
    for name, f in fmap.items():
        if (name not in kwargs and f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING):
            what = f.metadata.get("missing") or f"expected {_type_name(hints[name])}"
            raise ConfigError(f"{src}: {prefix}{name}: missing; {what}")
    obj = cls(**kwargs)
    check = getattr(obj, "_check", None)
    if check is not None:
        check(where, src)
    return obj


def _model_check(self: ModelConfig, where: str, src: str) -> None:
    if not self.name_or_path and not self.random_init:
        raise ConfigError(f"{src}: {where}.name_or_path: expected a hub id, directory or alias "
                          f"(or {where}.random_init for a random-init model), got nothing")
    if self.random_init is not None and "model_type" not in self.random_init:
        raise ConfigError(f"{src}: {where}.random_init.model_type: expected a model type such "
                          "as 'llama', got nothing")


def _dataset_check(self: DatasetSpec, where: str, src: str) -> None:
    if bool(self.path) == bool(self.name):
        raise ConfigError(f"{src}: {where}: expected exactly one of 'path' (local file or alias) "
                          f"or 'name' (hub dataset), got {'both' if self.path else 'neither'}")
    valid = FORMAT_FIELDS[self.format]
    for k in self.fields:
        if k not in valid:
            near = difflib.get_close_matches(k, valid, n=1, cutoff=0.5)
            hint = f"did you mean '{near[0]}'? " if near else ""
            raise ConfigError(f"{src}: {where}.fields.{k}: not a field of format "
                              f"'{self.format}'; {hint}(its fields: {', '.join(valid)}; "
                              "fields maps a field to your column name)")


def _training_check(self: TrainingConfig, where: str, src: str) -> None:
    if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
        raise ConfigError(f"{src}: {where}.betas: expected two numbers in [0, 1), "
                          f"got {self.betas!r}")


def _ewc_check(self: EWCConfig, where: str, src: str) -> None:
    if self.fisher_postprocess == "clamp" and self.fisher_clamp is None:
        raise ConfigError(f"{src}: {where}.fisher_clamp: fisher_postprocess 'clamp' needs a cap, "
                          "got nothing")
    if self.fisher_postprocess != "clamp" and self.fisher_clamp is not None:
        raise ConfigError(f"{src}: {where}.fisher_clamp: only used with fisher_postprocess "
                          f"'clamp', got postprocess '{self.fisher_postprocess}'")


def _replay_check(self: ReplayConfig, where: str, src: str) -> None:
    if self.data is None and not self.sources:
        raise ConfigError(f"{src}: {where}.data: missing; replay needs a data source (the "
                          "general data to mix in)")


# Sections a stage's overrides may not change, and why (the rest of a stage is its own run).
_STAGE_FIXED = {
    "sequence": "set the sequence in the config or an arm",
    "evaluation": "every stage is scored on the same metrics (R's rows must be comparable)",
    "analysis": "the analysis is the experiment's",
    "experiment": "seeds, arms and the results directory are the experiment's",
    "output": "the runner places each stage's output",
    "seed": "the seed is the arm x seed's (experiment.seeds)",
    "name": "the name is the experiment's",
}


def _sequence_check(self: SequenceConfig, where: str, src: str) -> None:
    if len(self.stages) < 2:
        raise ConfigError(f"{src}: {where}.stages: a sequence needs at least two stages, got "
                          f"{len(self.stages)}; for one task drop the sequence section (and set "
                          "data.train)")
    seen: dict[str, int] = {}
    for i, st in enumerate(self.stages):
        check_slug(st.name, f"{where}.stages[{i}].name", src)
        if st.name in seen:
            raise ConfigError(f"{src}: {where}.stages[{i}].name: {st.name!r} is already the name "
                              f"of {where}.stages[{seen[st.name]}]; stage names must be unique")
        seen[st.name] = i
        for k in st.overrides:
            head = k.split(".")[0]
            if head in _STAGE_FIXED:
                raise ConfigError(f"{src}: {where}.stages[{i}].overrides.{k}: a stage cannot "
                                  f"change {head}: {_STAGE_FIXED[head]}")


def _output_check(self: OutputConfig, where: str, src: str) -> None:
    dup = sorted({t for t in self.trackers if self.trackers.count(t) > 1})
    if dup:
        raise ConfigError(f"{src}: {where}.trackers: each tracker once, got {dup[0]!r} twice")


def _arm_check(self: ArmSpec, where: str, src: str) -> None:
    check_slug(self.name, f"{where}.name", src)


_METRIC_FIELDS = {
    "lm_eval": {"task", "metric", "include_path", "num_fewshot"},
    "perplexity": {"data", "max_length"},
    "answer_nll": {"data", "max_length"},
    "generation": {"data", "max_length", "max_new_tokens"},
}


def _metric_check(self: MetricSpec, where: str, src: str) -> None:
    if self.kind == "lm_eval" and not self.task:
        raise ConfigError(f"{src}: {where}.task: an lm_eval metric needs a task name")
    if self.kind != "lm_eval" and self.data is None:
        raise ConfigError(f"{src}: {where}.data: a '{self.kind}' metric needs a data source")
    allowed = _METRIC_FIELDS[self.kind] | {"name", "kind", "limit"}
    defaults = MetricSpec(kind=self.kind)
    for f in dataclasses.fields(self):
        if f.name not in allowed and getattr(self, f.name) != getattr(defaults, f.name):
            raise ConfigError(f"{src}: {where}.{f.name}: not used by a metric of kind "
                              f"'{self.kind}' (its keys: {', '.join(sorted(allowed))})")
    # what each kind reads from its records (the harness found a mismatch only minutes in)
    fmt = self.data.format if self.data is not None else None
    if self.kind == "perplexity" and fmt != "text":
        raise ConfigError(f"{src}: {where}.data.format: a perplexity metric scores raw text, got "
                          f"format '{fmt}'; use kind: answer_nll for {fmt} data, or text data")
    if self.kind in ("answer_nll", "generation") and fmt == "text":
        raise ConfigError(f"{src}: {where}.data.format: a {self.kind} metric needs a prompt and "
                          "a response, got format 'text'; use kind: perplexity, or "
                          "instruction/chat data")
    if not self.name:
        self.name = self.task or self.kind


def _merge_check(self: MergeSpec, where: str, src: str) -> None:
    check_slug(self.name, f"{where}.name", src)
    used = MergeSpec.KINDS[self.kind]
    for f in dataclasses.fields(self):
        if f.name in ("name", "kind") or f.name in used:
            continue
        if getattr(self, f.name) not in (None, []):
            raise ConfigError(f"{src}: {where}.{f.name}: not used by a merge of kind "
                              f"'{self.kind}' (its keys: name, kind, {', '.join(used)})")
    if self.kind == "layerwise":
        for k in used:
            if getattr(self, k) is None:
                raise ConfigError(f"{src}: {where}.{k}: missing; a layerwise merge needs "
                                  "alpha_bottom and alpha_top (numbers in [0, 1])")
        return
    if not self.scales:
        raise ConfigError(f"{src}: {where}.scales: missing; a task_vectors merge needs one "
                          "scale per checkpoint")
    lo, hi = MergeSpec.SCALE_RANGE
    for i, s in enumerate(self.scales):
        if not lo <= s <= hi:
            raise ConfigError(f"{src}: {where}.scales[{i}]: expected a value >= {lo} and "
                              f"<= {hi}, got {s!r}")
    if not self.checkpoints:
        self.checkpoints = [MergeSpec.RUN]
    if len(self.checkpoints) != len(self.scales):
        raise ConfigError(f"{src}: {where}.scales: {len(self.scales)} scale(s) for "
                          f"{len(self.checkpoints)} checkpoint(s) {self.checkpoints}; expected "
                          "one scale per checkpoint")
    for i, c in enumerate(self.checkpoints):
        if not c.strip():
            raise ConfigError(f"{src}: {where}.checkpoints[{i}]: expected '{MergeSpec.RUN}' or "
                              "a checkpoint directory, got an empty string")
    if MergeSpec.RUN not in self.checkpoints:
        raise ConfigError(f"{src}: {where}.checkpoints: expected '{MergeSpec.RUN}' (this run's "
                          f"fine-tuned model) among them, got {self.checkpoints}; a merge is "
                          "scored once per run")


def _evaluation_check(self: EvaluationConfig, where: str, src: str) -> None:
    seen: dict[str, int] = {}
    for i, m in enumerate(self.merge):
        if m.name in seen:  # results are keyed by name: the second would overwrite the first
            raise ConfigError(f"{src}: {where}.merge[{i}].name: {m.name!r} is already the name "
                              f"of {where}.merge[{seen[m.name]}]; merge names must be unique")
        seen[m.name] = i


def _check_placeholders(template: str, key: str, src: str) -> None:
    """A path template may use ``{name}`` only (formatted with the config's name)."""
    try:
        template.format(name="x")
    except (KeyError, IndexError, ValueError) as e:
        what = f"unknown placeholder {{{e.args[0]}}}" if isinstance(e, KeyError) else str(e)
        raise ConfigError(f"{src}: {key}: {template!r}: {what}; the only placeholder is "
                          "{name} (write {{ and }} for literal braces)") from None


def _config_check(self: Config, where: str, src: str) -> None:
    check_slug(self.name, "name", src)
    _check_placeholders(self.output.dir, "output.dir", src)
    _check_placeholders(self.experiment.results_dir, "experiment.results_dir", src)
    seen: dict[str, str] = {}
    for group in ("task", "general"):
        for i, m in enumerate(getattr(self.evaluation, group)):
            key = f"evaluation.{group}[{i}].name"
            if m.name in seen:  # results are keyed by name: the second would overwrite the first
                raise ConfigError(f"{src}: {key}: {m.name!r} is already the name of "
                                  f"{seen[m.name]}; metric names must be unique (set name:)")
            seen[m.name] = key.removesuffix(".name")
    general = [m.name for m in self.evaluation.general]
    for key in ("headline", "aggregate_exclude"):
        for i, n in enumerate(getattr(self.analysis, key)):
            if n not in general:
                near = difflib.get_close_matches(n, general, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(f"{src}: analysis.{key}[{i}]: {n!r} is not a general metric "
                                  f"(evaluation.general: {', '.join(general) or 'none'}){hint}")
    for i, rc in enumerate(self.regularizers):
        if rc.type == "l2" and (rc.anchor == "base" or rc.anchor_path) \
                and self.training.lora is not None:
            raise ConfigError(f"{src}: regularizers[{i}].anchor: 'base' (or an anchor_path) "
                              "is not possible with training.lora (the trained parameters are "
                              "adapters, which the base checkpoint has none of); use anchor: "
                              "previous")
    if self.sequence is not None:
        task = [m.name for m in self.evaluation.task]
        for i, st in enumerate(self.sequence.stages):
            if st.metric not in task:
                near = difflib.get_close_matches(st.metric, task, n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ConfigError(f"{src}: sequence.stages[{i}].metric: {st.metric!r} is not an "
                                  f"evaluation.task metric (evaluation.task: "
                                  f"{', '.join(task) or 'none'}){hint}")
    if self.training.clip_scope == "loss" and self.distributed.strategy == "deepspeed":
        raise ConfigError(f"{src}: training.clip_scope: 'loss' is not possible with "
                          "distributed.strategy 'deepspeed' (the engine clips inside its step, "
                          "after the gradient terms); expected 'all'")


Config._check = _config_check  # type: ignore[attr-defined]
ModelConfig._check = _model_check  # type: ignore[attr-defined]
DatasetSpec._check = _dataset_check  # type: ignore[attr-defined]
TrainingConfig._check = _training_check  # type: ignore[attr-defined]
EWCConfig._check = _ewc_check  # type: ignore[attr-defined]
OutputConfig._check = _output_check  # type: ignore[attr-defined]
MetricSpec._check = _metric_check  # type: ignore[attr-defined]
ArmSpec._check = _arm_check  # type: ignore[attr-defined]
MergeSpec._check = _merge_check  # type: ignore[attr-defined]
EvaluationConfig._check = _evaluation_check  # type: ignore[attr-defined]
ReplayConfig._check = _replay_check  # type: ignore[attr-defined]
SequenceConfig._check = _sequence_check  # type: ignore[attr-defined]


def parse_overrides(items: list[str], src: str = "command line") -> dict[str, Any]:
    """Parse ``a.b=value`` strings (value read as YAML) into a flat mapping of dotted keys."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{src}: override {item!r}: expected key=value, e.g. training.lr=3e-4")
        key, _, text = item.partition("=")
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{src}: override {item!r}: value is not valid YAML ({e})") from None
    return out


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys in a raw (unvalidated) config mapping; validation happens afterwards.

    A mapping value merges into an existing mapping (``training: {lr: 1e-4}`` changes only the
    learning rate, as ``extends:`` does); lists and scalars replace what was there."""
    for dotted, value in overrides.items():
        node: Any = raw
        parts = dotted.split(".")
        for i, p in enumerate(parts):
            last = i == len(parts) - 1
            if isinstance(node, list):  # numeric parts index lists: regularizers.0.lambda
                if not p.isdigit() or int(p) >= len(node):
                    raise ConfigError(f"override {dotted!r}: {'.'.join(parts[:i])} has "
                                      f"{len(node)} entries; {p!r} is not a valid index")
                if last:
                    node[int(p)] = value
                else:
                    node = node[int(p)]
                continue
            if last:
                old = node.get(p)
                both = isinstance(old, dict) and isinstance(value, dict)
                node[p] = deep_merge(old, value) if both else value
            else:
                if not isinstance(node.get(p), (dict, list)):
                    node[p] = {}
                node = node[p]
    return raw


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: mappings merge key by key, anything else (lists too) replaces."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def read_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping. A top-level ``extends: other.yaml`` (relative to this file) reads that
    file first and merges this one on top (mappings key by key; lists and scalars replace), so a
    quick and a full-size experiment can share one base file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        line = " ".join(str(e).split())
        raise ConfigError(f"{path}: not valid YAML: {line}") from None
    if raw is None:
        raise ConfigError(f"{path}: the config file is empty; expected a mapping with at least "
                          "model: and data.train: (see experiments/smoke.yaml)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level (key: value lines), got "
                          f"a {type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"{path}: extends: expected a file name, got {parent!r}")
        ppath = (path.parent / parent).resolve()
        if ppath in _seen or ppath == path.resolve():
            raise ConfigError(f"{path}: extends: circular reference through {ppath}")
        raw = deep_merge(read_yaml(ppath, (*_seen, path.resolve())), raw)
    return raw


# Every key of the one shared regularizer class before the per-type split, with its default:
# a config.yaml written by forgetkit then spells out all of them in each regularizer entry.
_LEGACY_REG_DEFAULTS: dict[str, Any] = {
    "type": "l2", "lam": 1.0, "variant": "coupled", "include": [], "exclude": [],
    "anchor_dtype": "float32", "fisher_data": None, "fisher_examples": 256,
    "fisher_batch_size": 8, "estimator": "empirical", "fisher_samples": 1, "fisher_path": None,
    "fisher_postprocess": "none", "fisher_clamp": None, "online_gamma": None, "ratio": 0.1,
    "data": None, "temperature": 1.0,
}
# The keys each type used then (the rest had to stay at their defaults).
_LEGACY_REG_KEYS = {
    "l2": {"lam", "variant", "include", "exclude", "anchor_dtype"},
    "ewc": {"lam", "include", "exclude", "anchor_dtype", "fisher_data", "fisher_examples",
            "fisher_batch_size", "estimator", "fisher_samples", "fisher_path",
            "fisher_postprocess", "fisher_clamp", "online_gamma"},
    "replay": {"ratio", "data"},
    "kl": {"lam", "data", "temperature", "fisher_batch_size"},
}


def _upgrade_dumped_entry(entry: dict[str, Any], key: str, src: str) -> dict[str, Any]:
    """A regularizer entry of an old ``config.yaml`` (every key of the old shared class): keep
    its type's keys (KL's ``fisher_batch_size`` as ``batch_size``), drop the others, which must
    hold their old defaults (anything else was rejected when the file was written)."""
    t = entry["type"]
    used = _LEGACY_REG_KEYS.get(t)
    if used is None:
        return entry  # an unknown type fails with did-you-mean later
    out: dict[str, Any] = {"type": t}
    for k, v in entry.items():
        if k == "type":
            continue
        if k in used:
            out["batch_size" if (t, k) == ("kl", "fisher_batch_size") else k] = v
        elif v != _LEGACY_REG_DEFAULTS[k]:
            shown = "lambda" if k == "lam" else k
            raise ConfigError(f"{src}: {key}.{shown}: not used by a regularizer of type '{t}', "
                              f"got {v!r}")
    return out


def _upgrade_legacy(raw: Any, src: str) -> Any:
    """Old spellings of the regularizer list, rewritten (on a copy) into today's:

    * a ``config.yaml`` entry that spells out every key of the old shared regularizer class is
      cut to its type's keys (:func:`_upgrade_dumped_entry`), silently: it is a record;
    * ``{type: replay, data: ..., ratio: ...}`` moves to ``data.replay`` (with a FutureWarning
      unless it came from such a record). Only one replay source: two legacy entries, or one
      and ``data.replay``, are a ConfigError.
    """
    if not isinstance(raw, dict) or not isinstance(raw.get("regularizers"), list):
        return raw
    regs: list[Any] = []
    replay: tuple[int, dict[str, Any], bool] | None = None
    for i, entry in enumerate(raw["regularizers"]):
        key = f"regularizers[{i}]"
        dumped = isinstance(entry, dict) and set(entry) == set(_LEGACY_REG_DEFAULTS)
        if dumped:
            entry = _upgrade_dumped_entry(entry, key, src)
        if not (isinstance(entry, dict) and entry.get("type") == "replay"):
            regs.append(entry)
            continue
        if replay is not None:
            raise ConfigError(f"{src}: {key}: a second replay source (regularizers[{replay[0]}] "
                              "is one); replay mixes in one data source (data.replay)")
        body = {k: v for k, v in entry.items() if k != "type"}
        for k in body:
            if k not in ("data", "ratio"):
                near = difflib.get_close_matches(str(k), ["data", "ratio"], n=1, cutoff=0.5)
                hint = f"did you mean '{key}.{near[0]}'? " if near else ""
                raise ConfigError(f"{src}: unknown key '{key}.{k}'; {hint}a replay entry has "
                                  "data and ratio only (better: write data.replay: {data: ..., "
                                  "ratio: ...})")
        _build(ReplayConfig, body, key, src)  # its errors name the key the user wrote
        replay = (i, body, dumped)
    if replay is None:
        return {**raw, "regularizers": regs} if regs != raw["regularizers"] else raw
    i, body, dumped = replay
    data = raw.get("data")
    if data is not None and not isinstance(data, dict):
        return raw  # "data: expected a mapping" is reported by the loader
    data = dict(data or {})
    if data.get("replay") is not None:
        raise ConfigError(f"{src}: regularizers[{i}]: replay is given twice, here (the legacy "
                          "spelling type: replay) and as data.replay; keep data.replay only")
    if not dumped:
        warnings.warn(f"{src}: regularizers[{i}]: 'type: replay' is deprecated (replay is data, "
                      "not a regularizer); write data.replay: {data: ..., ratio: ...} instead "
                      "(read as that now)", FutureWarning, stacklevel=3)
    data["replay"] = body
    return {**raw, "regularizers": regs, "data": data}


def config_from_dict(raw: dict[str, Any], src: str = "<config>") -> Config:
    """Validate a raw mapping (YAML as read, overrides applied) into a :class:`Config`.

    Legacy spellings are upgraded first (:func:`_upgrade_legacy`; ``raw`` is not modified).
    Raises ConfigError on any problem."""
    return _build(Config, _upgrade_legacy(raw, src), "", src)


def regularizer_data_specs(cfg: Config) -> Iterator[tuple[str, DatasetSpec]]:
    """(dotted key, spec) of every data source the mitigations read: ``data.replay.data``, then
    each regularizer's (EWC ``fisher_data``, KL ``data``), in config order."""
    if cfg.data.replay is not None:
        if cfg.data.replay.data is not None:
            yield "data.replay.data", cfg.data.replay.data
        for i, src in enumerate(cfg.data.replay.sources):
            yield f"data.replay.sources[{i}].data", src.data
    for i, rc in enumerate(cfg.regularizers):
        for k in rc.DATA_KEYS:
            spec = getattr(rc, k)
            if isinstance(spec, DatasetSpec):
                yield f"regularizers[{i}].{k}", spec


def check_complete(cfg: Config, src: str) -> None:
    """A config file must say which model and which training data: check the sections a file
    left out as if it had written them empty (``config_from_dict`` builds them from defaults,
    which a test may want; a user's file that omits ``model:`` used to crash much later with a
    TypeError from deep inside datasets)."""
    _model_check(cfg.model, "model", src)
    _dataset_check(cfg.data.train, "data.train", src)


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read, override and validate a YAML config. Raises ConfigError on any problem."""
    raw = read_yaml(path)
    over = parse_overrides(overrides or [])
    raw = apply_overrides(raw, over)
    src = str(path) + (" (with command-line overrides)" if over else "")
    cfg = config_from_dict(raw, src)
    check_complete(cfg, src)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    d = dataclasses.asdict(cfg)
    return d


def dump_config(cfg: Any) -> str:
    """The fully resolved config as YAML (every default spelled out)."""
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
