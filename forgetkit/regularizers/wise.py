"""WiSE-FT: weight-space ensembles of the initial and the fine-tuned model (Wortsman et al., 2022).

``theta(alpha) = (1 - alpha) * theta0 + alpha * theta_star``: alpha = 0 is the initial model,
alpha = 1 the fine-tuned one. Not a training-time regularizer: a post-hoc interpolation whose
checkpoints the runner evaluates for a forgetting/accuracy curve.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("forgetkit")

__all__ = ["interpolate_state_dicts", "load_hf_state_dict", "write_wise_checkpoints"]


def interpolate_state_dicts(theta0: Mapping[str, torch.Tensor],
                            theta_star: Mapping[str, torch.Tensor], alpha: float
                            ) -> dict[str, torch.Tensor]:
    """``(1 - alpha) * theta0 + alpha * theta_star``, key by key.

    Floating tensors are interpolated in fp32 and cast back to ``theta_star``'s dtype; other
    tensors (integer buffers) are taken from ``theta_star``.

    Args:
        theta0: state dict of the initial model.
        theta_star: state dict of the fine-tuned model (same keys and shapes).
        alpha: interpolation weight (0: theta0, 1: theta_star; values outside [0, 1]
            extrapolate).

    Returns:
        The interpolated state dict (new tensors on ``theta_star``'s devices).
    """
    if set(theta0) != set(theta_star):
        missing = sorted(set(theta0) ^ set(theta_star))
        raise KeyError(f"state dicts have different keys, e.g. {missing[:5]}")
    out: dict[str, torch.Tensor] = {}
    for k, b in theta_star.items():
        a = theta0[k]
        if a.shape != b.shape:
            raise ValueError(f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}")
        if not b.is_floating_point():
            out[k] = b.clone()
            continue
        af, bf = a.to(b.device, torch.float32), b.float()
        out[k] = torch.lerp(af, bf, float(alpha)).to(b.dtype)
    return out


def load_hf_state_dict(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of the ``*.safetensors`` files of an HF checkpoint directory (on CPU).

    Args:
        model_dir: the directory.

    Returns:
        name -> tensor as stored (tied weights appear once).
    """
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(f)))
    return sd


def write_wise_checkpoints(theta0_dir: str | Path, theta_star_dir: str | Path,
                           alphas: Iterable[float], out_root: str | Path,
                           name: str = "alpha-{alpha:.2f}") -> dict[float, Path]:
    """Write one standard HF checkpoint per alpha (model config and tokenizer of theta_star).

    Args:
        theta0_dir: HF checkpoint of the initial model.
        theta_star_dir: HF checkpoint of the fine-tuned model (same architecture).
        alphas: interpolation weights.
        out_root: directory under which ``name.format(alpha=...)`` directories are written.
        name: directory-name pattern.

    Returns:
        alpha -> checkpoint directory.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetkit.models import save_hf_checkpoint

    sd0 = load_hf_state_dict(theta0_dir)
    sd1 = load_hf_state_dict(theta_star_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(str(theta_star_dir), dtype="auto")
    tok = None
    try:
        tok = AutoTokenizer.from_pretrained(str(theta_star_dir))
    except (OSError, ValueError) as e:
        log.warning("WiSE-FT: no tokenizer in %s (%s); checkpoints are written without one",
                    theta_star_dir, e)
    out: dict[float, Path] = {}
    for alpha in alphas:
        sd = interpolate_state_dicts(sd0, sd1, alpha)
        missing, unexpected = model.load_state_dict(sd, strict=False)
        if unexpected:
            raise KeyError(f"WiSE-FT: unexpected keys {unexpected[:5]}")
        if missing:  # only tied copies (e.g. lm_head.weight) may be absent from the files
            full = model.state_dict(keep_vars=True)
            loaded = {full[k].data_ptr() for k in sd if k in full}
            untied = [k for k in missing if full[k].data_ptr() not in loaded]
            if untied:
                raise KeyError(f"WiSE-FT: checkpoint files lack {untied[:5]}")
        d = Path(out_root) / name.format(alpha=alpha)
        save_hf_checkpoint(model, tok, d)
        out[float(alpha)] = d
        log.info("WiSE-FT alpha=%.3f -> %s", alpha, d)
    return out
