"""Small per-layer summaries of a fine-tuned model: weight drift and Fisher magnitude.

Pure functions of state dicts (no I/O, no model): the runner calls them after training and writes
the results beside the run as ``drift.json`` and ``fisher_summary.json``; ``forgetkit.report``
plots them. A run directory then holds (both files optional)::

    drift.json = drift_record(theta0, theta)
    {
      "format": 1,
      "layers": {                       # in model order: embeddings, layers.0 .. layers.N-1,
        "embeddings": {                 # norm, lm_head, then any other group (alphabetical)
          "rel_drift": 0.0123,          # ||theta - theta0|| / ||theta0||   (unit-free)
          "drift": 1.234,               # ||theta - theta0||                 (weight units)
          "norm0": 100.3,               # ||theta0||
          "norm": 100.4,                # ||theta||
          "n_params": 28311552          # number of scalars in the group
        },
        "layers.0": {...}, ...
      },
      "total": {...same keys, over every parameter of every group...}
    }

    fisher_summary.json = fisher_record(fisher)
    {
      "format": 1,
      "layers": {
        "embeddings": {"mean": 1e-7, "max": 3e-4, "sum": 2.8, "n_params": 28311552}, ...
      },
      "total": {...same keys...}
    }

Norms are Euclidean (Frobenius) norms over all scalars of the group, accumulated in float64.
A group's name comes from :func:`layer_of` (``model.layers.3.mlp.up_proj.weight`` ->
``layers.3``). Tied weights present under two names are counted in both groups.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["layer_of", "layer_order", "layer_drift", "fisher_summary", "drift_record",
           "fisher_record", "FORMAT"]

FORMAT = 1

_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.", "base_model.model.", "model.",
             "transformer.", "gpt_neox.", "decoder.")
_BLOCK = re.compile(r"^(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> str:
    """The group of a parameter name: ``layers.<i>``, ``embeddings``, ``norm``, ``lm_head`` or,
    for anything else, the first component of the name (after wrapper prefixes)."""
    n = name
    changed = True
    while changed:
        changed = False
        for p in _PREFIXES:
            if n.startswith(p):
                n, changed = n[len(p):], True
    m = _BLOCK.match(n)
    if m:
        return f"layers.{int(m.group(1))}"
    if n.startswith(("lm_head", "embed_out", "output.")):
        return "lm_head"
    first = n.split(".")[0]
    if "embed" in first or first in ("wte", "wpe", "tok_embeddings"):
        return "embeddings"
    if first in ("norm", "final_layernorm", "ln_f", "final_layer_norm"):
        return "norm"
    return first


def layer_order(names: list[str] | Any) -> list[str]:
    """Group names in model order: embeddings, layers by index, norm, lm_head, the rest sorted."""
    def key(g: str) -> tuple[int, int, str]:
        if g == "embeddings":
            return (0, 0, g)
        if g.startswith("layers.") and g[7:].isdigit():
            return (1, int(g[7:]), g)
        if g == "norm":
            return (2, 0, g)
        if g == "lm_head":
            return (3, 0, g)
        return (4, 0, g)
    return sorted(set(names), key=key)


def _ordered(d: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {g: d[g] for g in layer_order(list(d))}


def layer_drift(theta0: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]
                ) -> dict[str, dict[str, Any]]:
    """Per group: ``rel_drift`` = ||θ−θ0||/||θ0||, ``drift`` = ||θ−θ0||, ``norm0``, ``norm``,
    ``n_params`` (see the module docstring). Only names present in both dicts are used; a shape
    mismatch raises ValueError. ``rel_drift`` is NaN for a group whose ||θ0|| is 0."""
    acc: dict[str, list[float]] = {}  # group -> [sum d^2, sum t0^2, sum t^2, n]
    for name, t in theta.items():
        if name not in theta0:
            continue
        t0 = theta0[name]
        if tuple(t0.shape) != tuple(t.shape):
            raise ValueError(f"{name}: shape {tuple(t0.shape)} before, {tuple(t.shape)} after")
        a = t.detach().to(torch.float64)
        b = t0.detach().to(device=a.device, dtype=torch.float64)
        s = acc.setdefault(layer_of(name), [0.0, 0.0, 0.0, 0])
        s[0] += float(((a - b) ** 2).sum())
        s[1] += float((b ** 2).sum())
        s[2] += float((a ** 2).sum())
        s[3] += a.numel()
    return _ordered({g: _drift_entry(*v) for g, v in acc.items()})


def _drift_entry(d2: float, n02: float, n2: float, n: float) -> dict[str, Any]:
    norm0 = math.sqrt(n02)
    drift = math.sqrt(d2)
    return {"rel_drift": drift / norm0 if norm0 > 0 else math.nan, "drift": drift,
            "norm0": norm0, "norm": math.sqrt(n2), "n_params": int(n)}


def fisher_summary(fisher: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    """Per group of a diagonal Fisher: ``mean``, ``max``, ``sum`` of its entries and
    ``n_params`` (float64 accumulation)."""
    acc: dict[str, list[float]] = {}  # group -> [sum, max, n]
    for name, f in fisher.items():
        x = f.detach().to(torch.float64)
        s = acc.setdefault(layer_of(name), [0.0, -math.inf, 0])
        s[0] += float(x.sum())
        if x.numel():
            s[1] = max(s[1], float(x.max()))
        s[2] += x.numel()
    return _ordered({g: {"mean": v[0] / v[2] if v[2] else math.nan, "max": v[1], "sum": v[0],
                         "n_params": int(v[2])} for g, v in acc.items()})


def drift_record(theta0: Mapping[str, torch.Tensor], theta: Mapping[str, torch.Tensor]
                 ) -> dict[str, Any]:
    """The content of ``drift.json``: ``{"format", "layers": layer_drift(...), "total"}``."""
    layers = layer_drift(theta0, theta)
    d2 = sum(v["drift"] ** 2 for v in layers.values())
    n02 = sum(v["norm0"] ** 2 for v in layers.values())
    n2 = sum(v["norm"] ** 2 for v in layers.values())
    n = sum(v["n_params"] for v in layers.values())
    return {"format": FORMAT, "layers": layers, "total": _drift_entry(d2, n02, n2, n)}


def fisher_record(fisher: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """The content of ``fisher_summary.json``: ``{"format", "layers": fisher_summary(...),
    "total"}``."""
    layers = fisher_summary(fisher)
    tot = sum(v["sum"] for v in layers.values())
    n = sum(v["n_params"] for v in layers.values())
    mx = max((v["max"] for v in layers.values()), default=math.nan)
    return {"format": FORMAT, "layers": layers,
            "total": {"mean": tot / n if n else math.nan, "max": mx, "sum": tot, "n_params": n}}
