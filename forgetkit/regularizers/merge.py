"""Merging toward the base model, evaluated without retraining (issue 16).

Two post-hoc arms beside WiSE-FT (:mod:`forgetkit.regularizers.wise`), each a pure function on
state dicts plus a writer of a standard HF checkpoint:

* **Per-layer interpolation** (:func:`layerwise_state_dict`):
  ``theta = theta0 + alpha_l * (theta_star - theta0)``, ``alpha_l`` linear over depth
  (:func:`layer_alpha`). Decoder layer ``i`` of ``n`` (0-based from the bottom, found by
  :func:`forgetkit.train.optim.count_layers` / :func:`~forgetkit.train.optim.layer_depth`:
  names with ``.layers.<i>.``, ``.h.<i>.``, ``.blocks.<i>.`` or ``.layer.<i>.``) gets
  ``alpha_bottom + (alpha_top - alpha_bottom) * i / (n - 1)`` (``alpha_bottom`` when
  ``n == 1``); the embeddings (a name containing ``embed``, ``wte`` or ``wpe``) get
  ``alpha_bottom``; every other tensor -- the final norm, ``lm_head``, anything outside the
  numbered layers -- gets ``alpha_top``. A head tied to the embeddings is one tensor in the
  files (the embedding's) and so follows ``alpha_bottom``. ``alpha_bottom == alpha_top == a``
  is WiSE-FT at ``a``, bit for bit (the same ``torch.lerp`` in float32).
* **Task-vector scaling** (:func:`task_vector_state_dict`, task arithmetic, Ilharco et al.
  2023): ``theta = theta0 + sum_k s_k * (theta_k - theta0)`` over one or several fine-tuned
  checkpoints of the same architecture.

Numerics. Floating tensors are combined in float32 (layerwise: ``torch.lerp(theta0,
theta_star, alpha_l)``, as WiSE-FT) or float64 (task vectors: one checkpoint is
``torch.lerp(theta0, theta_1, s_1)``, several are ``theta0 + sum_k s_k (theta_k - theta0)``
accumulated in float64) and rounded once to the first fine-tuned checkpoint's dtype.
``torch.lerp`` computes ``a + w (b - a)`` for ``w < 0.5`` and ``b - (1 - w)(b - a)``
otherwise, so a coefficient of 0 returns ``theta0`` and 1 returns ``theta_star`` exactly (bit
for bit, whatever the dtype). Non-floating tensors (integer buffers) are taken from the
(first) fine-tuned checkpoint. Coefficients outside [0, 1] extrapolate.

Why not mergekit: its operations here are a few lines of tensor arithmetic, while the
package (LGPL-3.0; forgetkit is Apache-2.0) brings a YAML/CLI pipeline, per-architecture
JSON definitions that random-init and unlisted models lack, and its own rules for where
embeddings and the head sit in a gradient schedule and for normalising weights -- each would
have to be pinned and re-documented to state the exact numbers above. The writer here copies
the keys exactly as they are stored, so any checkpoint forgetkit wrote round-trips.

Memory: the writers hold theta0 and every fine-tuned state dict on CPU (as the WiSE-FT writer
does) plus the merged one; the arithmetic runs one tensor at a time.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from forgetkit.regularizers.wise import load_hf_state_dict
from forgetkit.train.optim import count_layers, layer_depth

log = logging.getLogger("forgetkit")

__all__ = [
    "layer_alpha",
    "layer_alphas",
    "layerwise_state_dict",
    "task_vector_state_dict",
    "write_merged_checkpoint",
    "write_layerwise_checkpoint",
    "write_task_vector_checkpoint",
    "local_checkpoint_dir",
]

# Files of a checkpoint directory that hold weights: never copied beside merged weights.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".index.json", ".ckpt",
                    ".h5", ".msgpack")


def layer_alpha(name: str, n_layers: int, alpha_bottom: float, alpha_top: float) -> float:
    """The coefficient of tensor ``name`` under the linear depth schedule (module docstring).

    Args:
        name: state-dict key.
        n_layers: number of decoder layers (:func:`forgetkit.train.optim.count_layers`).
        alpha_bottom: coefficient of layer 0 and of the embeddings.
        alpha_top: coefficient of the last layer and of everything above (final norm, head).

    Returns:
        ``alpha_bottom + (alpha_top - alpha_bottom) * i / (n_layers - 1)`` for layer ``i``
        (``alpha_bottom`` when ``n_layers == 1``), ``alpha_bottom`` for an embedding,
        ``alpha_top`` otherwise. Endpoints are returned exactly (no rounding at layer 0 and
        ``n_layers - 1``).
    """
    depth = layer_depth(name, n_layers)  # n - i for layer i, n + 1 embeddings, 0 the rest
    if depth == 0:
        return float(alpha_top)
    if depth == n_layers + 1:
        return float(alpha_bottom)
    i = n_layers - depth
    if n_layers == 1 or i == 0:
        return float(alpha_bottom)
    if i == n_layers - 1:
        return float(alpha_top)
    return float(alpha_bottom) + (float(alpha_top) - float(alpha_bottom)) * i / (n_layers - 1)


def layer_alphas(names: Sequence[str], alpha_bottom: float, alpha_top: float
                 ) -> dict[str, float]:
    """:func:`layer_alpha` of every name; the layer count is taken from the names themselves."""
    n = count_layers(names)
    return {k: layer_alpha(k, n, alpha_bottom, alpha_top) for k in names}


def _check_same(theta0: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor],
                what: str) -> None:
    if set(theta0) != set(other):
        diff = sorted(set(theta0) ^ set(other))
        raise KeyError(f"{what}: state dicts have different keys, e.g. {diff[:5]}")
    for k, a in theta0.items():
        if a.shape != other[k].shape:
            raise ValueError(f"{what}: {k}: shape {tuple(a.shape)} vs {tuple(other[k].shape)}")


def layerwise_state_dict(theta0: Mapping[str, torch.Tensor],
                         theta_star: Mapping[str, torch.Tensor], alpha_bottom: float,
                         alpha_top: float) -> dict[str, torch.Tensor]:
    """``theta0 + alpha_l (theta_star - theta0)`` key by key, ``alpha_l`` from :func:`layer_alphas`.

    Args:
        theta0: state dict of the base model.
        theta_star: state dict of the fine-tuned model (same keys and shapes).
        alpha_bottom: coefficient of the embeddings and decoder layer 0.
        alpha_top: coefficient of the last decoder layer, the final norm and the head.

    Returns:
        The merged state dict: float32 ``torch.lerp`` cast to ``theta_star``'s dtype (exact at
        coefficients 0 and 1); non-floating tensors copied from ``theta_star``.
    """
    _check_same(theta0, theta_star, "layerwise merge")
    alphas = layer_alphas(list(theta_star), alpha_bottom, alpha_top)
    out: dict[str, torch.Tensor] = {}
    for k, b in theta_star.items():
        if not b.is_floating_point():
            out[k] = b.clone()
            continue
        a = theta0[k].to(b.device, torch.float32)
        out[k] = torch.lerp(a, b.float(), alphas[k]).to(b.dtype)
    return out


def task_vector_state_dict(theta0: Mapping[str, torch.Tensor],
                           thetas: Sequence[Mapping[str, torch.Tensor]],
                           scales: Sequence[float]) -> dict[str, torch.Tensor]:
    """Task arithmetic: ``theta0 + sum_k scales[k] * (thetas[k] - theta0)``, key by key.

    Args:
        theta0: state dict of the base model.
        thetas: state dicts of one or more fine-tuned models (same keys and shapes).
        scales: one scale per fine-tuned model.

    Returns:
        The merged state dict in the dtype of ``thetas[0]``: one model is ``torch.lerp`` in
        float64 (scale 0 gives theta0, scale 1 that model, exactly); several are accumulated
        in float64 and rounded once. Non-floating tensors are copied from ``thetas[0]``.
    """
    if not thetas:
        raise ValueError("task vectors: need at least one fine-tuned state dict")
    if len(thetas) != len(scales):
        raise ValueError(f"task vectors: {len(thetas)} state dicts but {len(scales)} scales")
    for j, t in enumerate(thetas):
        _check_same(theta0, t, f"task vector {j}")
    first = thetas[0]
    out: dict[str, torch.Tensor] = {}
    for k, b in first.items():
        if not b.is_floating_point():
            out[k] = b.clone()
            continue
        a = theta0[k].to(b.device, torch.float64)
        if len(thetas) == 1:
            acc = torch.lerp(a, b.double(), float(scales[0]))
        else:
            acc = a.clone()
            for t, s in zip(thetas, scales, strict=True):
                acc += float(s) * (t[k].to(b.device, torch.float64) - a)
        out[k] = acc.to(b.dtype)
    return out


def local_checkpoint_dir(path_or_id: str | Path) -> Path:
    """A local directory holding ``path_or_id``'s safetensors files.

    A local directory is returned as is; anything else is read as a hub id and resolved with
    ``huggingface_hub.snapshot_download`` (the cache the before-evaluation filled; offline
    when ``HF_HUB_OFFLINE=1``).
    """
    p = Path(path_or_id)
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(path_or_id), allow_patterns=["*.safetensors", "*.json"]))


def write_merged_checkpoint(state_dict: Mapping[str, torch.Tensor], like_dir: str | Path,
                            out_dir: str | Path) -> Path:
    """Write ``state_dict`` as a standard HF checkpoint shaped like ``like_dir``.

    Every file of ``like_dir`` that is not a weight file (config, generation config, tokenizer
    files) is copied; the weights go to one ``model.safetensors`` (``{"format": "pt"}``
    metadata) under exactly the stored key names, so whatever loaded ``like_dir`` (tied heads
    included) loads the result the same way.

    Args:
        state_dict: the merged weights (keys as stored in ``like_dir``'s files).
        like_dir: the fine-tuned checkpoint the merge derives from.
        out_dir: directory to create (replaced if present).

    Returns:
        ``out_dir``.
    """
    from safetensors.torch import save_file

    like, out = Path(like_dir), Path(out_dir)
    stored = set(load_hf_state_dict_keys(like))
    if stored != set(state_dict):
        diff = sorted(stored ^ set(state_dict))
        raise KeyError(f"merged weights and {like} differ in keys, e.g. {diff[:5]}")
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    for f in sorted(like.iterdir()):
        if f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES):
            shutil.copy2(f, out / f.name)
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()},
              str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def load_hf_state_dict_keys(model_dir: str | Path) -> list[str]:
    """The tensor names stored in a checkpoint directory's ``*.safetensors`` files."""
    from safetensors import safe_open

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    keys: list[str] = []
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            keys.extend(fh.keys())
    return keys


def write_layerwise_checkpoint(theta0_dir: str | Path, theta_star_dir: str | Path,
                               alpha_bottom: float, alpha_top: float, out_dir: str | Path
                               ) -> Path:
    """:func:`layerwise_state_dict` of two HF checkpoints, written by
    :func:`write_merged_checkpoint` (config and tokenizer of ``theta_star_dir``)."""
    sd = layerwise_state_dict(load_hf_state_dict(local_checkpoint_dir(theta0_dir)),
                              load_hf_state_dict(theta_star_dir), alpha_bottom, alpha_top)
    log.info("layerwise merge alpha %g (bottom) .. %g (top) -> %s", alpha_bottom, alpha_top,
             out_dir)
    return write_merged_checkpoint(sd, theta_star_dir, out_dir)


def write_task_vector_checkpoint(theta0_dir: str | Path, checkpoint_dirs: Sequence[str | Path],
                                 scales: Sequence[float], out_dir: str | Path) -> Path:
    """:func:`task_vector_state_dict` of HF checkpoints, written by
    :func:`write_merged_checkpoint` (config and tokenizer of ``checkpoint_dirs[0]``)."""
    if not checkpoint_dirs:
        raise ValueError("task vectors: need at least one fine-tuned checkpoint")
    sd = task_vector_state_dict(load_hf_state_dict(local_checkpoint_dir(theta0_dir)),
                                [load_hf_state_dict(local_checkpoint_dir(d))
                                 for d in checkpoint_dirs], scales)
    log.info("task vectors %s x %s -> %s", list(scales), [str(d) for d in checkpoint_dirs],
             out_dir)
    return write_merged_checkpoint(sd, local_checkpoint_dir(checkpoint_dirs[0]), out_dir)
