"""Pure functional cores of the parameter-space regularizers (no state, no distributed logic).

Two kinds of functions:

* penalties, on dicts ``name -> tensor``, differentiable (a hand-written backward: no
  model-sized temporary is kept between forward and backward)::

      l2_penalty(params, anchor)          = 1/2 * sum_i (theta_i - theta0_i)^2
      ewc_penalty(params, anchor, fisher) = 1/2 * sum_i F_i * (theta_i - theta0_i)^2

  accumulated in fp32 whatever the parameter dtype. The strength ``lambda`` is *not* part of
  these functions: the regularizer objects multiply by it.

* in-place gradient/update helpers, on aligned *sequences* of tensors, built on
  ``torch._foreach_*`` kernels and processed in chunks (so the fp32 temporaries never exceed
  ``CHUNK_NUMEL`` elements, whatever the model size)::

      l2_grad_(grads, params, anchor, lam)          grads += lam * (theta - theta0)
      ewc_grad_(grads, params, anchor, fisher, lam) grads += lam * F * (theta - theta0)
      decoupled_pull_(params, anchor, step)         theta -= step * (theta - theta0)

  The grad helpers return the (local) penalty value ``lam/2 * sum w (theta - theta0)^2`` as a
  by-product (0-dim fp32 tensor on the parameters' device), so a regularizer gets its logged
  value without a second pass over the weights.

Nothing here knows about sharding: callers pass *local* tensors (e.g. the local shard of an FSDP
DTensor) and all-reduce the returned partial sums themselves.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

__all__ = [
    "CHUNK_NUMEL",
    "decoupled_pull_",
    "ewc_grad_",
    "ewc_penalty",
    "l2_grad_",
    "l2_penalty",
]

#: Largest number of elements processed per foreach call by the in-place helpers.
CHUNK_NUMEL = 1 << 26


def _check_keys(params: Mapping[str, torch.Tensor], *others: Mapping[str, torch.Tensor]) -> None:
    for o in others:
        missing = [k for k in params if k not in o]
        if missing:
            raise KeyError(f"no anchor/Fisher entry for parameter(s) {missing[:5]}")


class _AnchoredQuadratic(torch.autograd.Function):
    """``1/2 * sum_i w_i * (theta_i - theta0_i)^2`` with ``w = F`` (EWC) or 1 (L2-SP).

    A hand-written backward instead of autograd's recording: autograd would save
    ``theta - theta0`` (an fp32 copy of every selected weight) until the backward pass; here
    only references to the parameters are saved and each parameter's gradient
    ``grad_out * w * (theta - theta0)`` is computed on the fly in fp32 and cast to its dtype.
    The value is accumulated in fp32 in chunks (:data:`CHUNK_NUMEL`).
    """

    @staticmethod
    def forward(ctx: object, anchor: list[torch.Tensor], fisher: list[torch.Tensor] | None,
                *params: torch.Tensor) -> torch.Tensor:
        ctx.anchor, ctx.fisher = anchor, fisher  # type: ignore[attr-defined]
        ctx.save_for_backward(*params)  # type: ignore[attr-defined]
        total = torch.zeros((), dtype=torch.float32, device=params[0].device)
        with torch.no_grad():
            for idx in _chunks(params):
                p = _f32([params[i].detach() for i in idx])
                diff = torch._foreach_sub(p, _f32([anchor[i].to(params[i].device) for i in idx]))
                if fisher is None:
                    total += _sq_sum(diff)
                else:
                    fd = torch._foreach_mul(diff, _f32([fisher[i].to(params[i].device)
                                                        for i in idx]))
                    total += _sq_sum(diff, fd)
        return 0.5 * total

    @staticmethod
    @torch.autograd.function.once_differentiable  # double backward raises, never drops terms
    def backward(ctx: object, grad_out: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        params = ctx.saved_tensors  # type: ignore[attr-defined]
        anchor, fisher = ctx.anchor, ctx.fisher  # type: ignore[attr-defined]
        grads = []
        for i, p in enumerate(params):
            d = p.detach().float() - anchor[i].to(p.device).float()
            if fisher is not None:
                d.mul_(fisher[i].to(p.device).float())
            grads.append(d.mul_(grad_out.float()).to(p.dtype))
        return (None, None, *grads)


def _quadratic(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
               fisher: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    keys = list(params)
    if not keys:
        return torch.zeros((), dtype=torch.float32)
    return _AnchoredQuadratic.apply([anchor[k] for k in keys],
                                    None if fisher is None else [fisher[k] for k in keys],
                                    *[params[k] for k in keys])


def l2_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor]
               ) -> torch.Tensor:
    """``1/2 * sum (theta - theta0)^2`` over every entry of ``params`` (fp32, differentiable:
    its gradient ``theta - theta0`` is computed in the backward pass, nothing model-sized is
    saved for it).

    Args:
        params: name -> current parameter (any float dtype; may require grad; local tensors --
            under FSDP the differentiable ``DTensor.to_local()`` view).
        anchor: name -> theta0, same shapes (any float dtype).

    Returns:
        A 0-dim fp32 tensor on the parameters' device.
    """
    _check_keys(params, anchor)
    return _quadratic(params, anchor, None)


def ewc_penalty(params: Mapping[str, torch.Tensor], anchor: Mapping[str, torch.Tensor],
                fisher: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``1/2 * sum F * (theta - theta0)^2`` (fp32, differentiable in ``params``; see
    :func:`l2_penalty` for the memory).

    Args:
        params: name -> current parameter.
        anchor: name -> theta0, same shapes.
        fisher: name -> diagonal Fisher (non-negative), same shapes.

    Returns:
        A 0-dim fp32 tensor on the parameters' device.
    """
    _check_keys(params, anchor, fisher)
    return _quadratic(params, anchor, fisher)


def _chunks(tensors: Sequence[torch.Tensor], limit: int = CHUNK_NUMEL) -> Iterator[list[int]]:
    """Index groups whose total numel stays under ``limit`` (a single big tensor is its own)."""
    group: list[int] = []
    n = 0
    for i, t in enumerate(tensors):
        if group and n + t.numel() > limit:
            yield group
            group, n = [], 0
        group.append(i)
        n += t.numel()
    if group:
        yield group


def _f32(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.dtype == torch.float32 else t.float() for t in ts]


def _sq_sum(a: list[torch.Tensor], b: list[torch.Tensor] | None = None) -> torch.Tensor:
    """sum_i <a_i, b_i> (or sum_i |a_i|^2) as a 0-dim fp32 tensor."""
    if b is None:
        norms = torch._foreach_norm(a)
        return torch.stack(norms).pow(2).sum()
    return torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, b,
                                                                                strict=True)]).sum()


def _check_aligned(*seqs: Sequence[torch.Tensor]) -> None:
    n = len(seqs[0])
    if any(len(s) != n for s in seqs):
        raise ValueError("gradient helpers need aligned sequences of equal length")


def l2_grad_(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
             anchor: Sequence[torch.Tensor], lam: float) -> torch.Tensor:
    """In place: ``grads[i] += lam * (params[i] - anchor[i])`` (the gradient of lam * l2_penalty).

    Args:
        grads: gradient tensors to update in place (same shapes/devices as ``params``).
        params: current parameters (local tensors; not modified).
        anchor: theta0 per parameter (any float dtype; upcast on the fly).
        lam: strength lambda.

    Returns:
        The local penalty value ``lam/2 * sum (theta - theta0)^2`` (0-dim fp32 tensor).
    """
    _check_aligned(grads, params, anchor)
    total = None
    with torch.no_grad():
        for idx in _chunks(params):
            p = _f32([params[i] for i in idx])
            a = [anchor[i] for i in idx]
            diff = torch._foreach_sub(p, _f32(a))
            g = [grads[i] for i in idx]
            if all(x.dtype == torch.float32 for x in g):
                torch._foreach_add_(g, diff, alpha=lam)
            else:  # low-precision grads: add in fp32, round once
                for x, d in zip(g, diff, strict=True):
                    x.copy_(x.float().add_(d, alpha=lam))
            s = _sq_sum(diff)
            total = s if total is None else total + s
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return 0.5 * lam * total


def ewc_grad_(grads: Sequence[torch.Tensor], params: Sequence[torch.Tensor],
              anchor: Sequence[torch.Tensor], fisher: Sequence[torch.Tensor], lam: float
              ) -> torch.Tensor:
    """In place: ``grads[i] += lam * F[i] * (params[i] - anchor[i])``.

    Args:
        grads: gradient tensors to update in place.
        params: current parameters (local tensors; not modified).
        anchor: theta0 per parameter.
        fisher: diagonal Fisher per parameter (fp32, same shapes).
        lam: strength lambda.

    Returns:
        The local penalty value ``lam/2 * sum F (theta - theta0)^2`` (0-dim fp32 tensor).
    """
    _check_aligned(grads, params, anchor, fisher)
    total = None
    with torch.no_grad():
        for idx in _chunks(params):
            p = _f32([params[i] for i in idx])
            diff = torch._foreach_sub(p, _f32([anchor[i] for i in idx]))
            fd = torch._foreach_mul(diff, _f32([fisher[i] for i in idx]))
            g = [grads[i] for i in idx]
            if all(x.dtype == torch.float32 for x in g):
                torch._foreach_add_(g, fd, alpha=lam)
            else:
                for x, d in zip(g, fd, strict=True):
                    x.copy_(x.float().add_(d, alpha=lam))
            s = _sq_sum(diff, fd)
            total = s if total is None else total + s
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return 0.5 * lam * total


def decoupled_pull_(params: Sequence[torch.Tensor], anchor: Sequence[torch.Tensor],
                    step: float | Sequence[float]) -> None:
    """In place: ``theta <- theta - step * (theta - theta0)`` (a lerp toward theta0).

    This is AdamW's decoupled weight decay with the decay target moved from 0 to theta0; with
    ``step = lr * lambda`` it is the ``decoupled`` L2-SP variant. ``step`` may be one number or
    one per parameter (e.g. per-group learning rates).

    Args:
        params: parameters (local tensors) to update in place.
        anchor: theta0 per parameter (cast to each parameter's dtype on the fly).
        step: the interpolation weight(s), normally ``lr * lam`` (must be in [0, 1]).
    """
    _check_aligned(params, anchor)
    steps = [float(step)] * len(params) if isinstance(step, (int, float)) else list(step)
    _check_aligned(params, steps)  # type: ignore[arg-type]
    with torch.no_grad():
        by_step: dict[float, list[int]] = {}
        for i, s in enumerate(steps):
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"decoupled pull step lr*lambda={s} is outside [0, 1]: the "
                                 "update would overshoot theta0; lower lambda or the lr")
            if s > 0.0:
                by_step.setdefault(s, []).append(i)
        for s, idx in by_step.items():
            for sub in _chunks([params[i] for i in idx]):
                ps = [params[idx[j]] for j in sub]
                an = [anchor[idx[j]] if anchor[idx[j]].dtype == params[idx[j]].dtype
                      else anchor[idx[j]].to(params[idx[j]].dtype) for j in sub]
                torch._foreach_lerp_(ps, an, s)
