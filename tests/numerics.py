"""Comparisons of floating-point results whose failure message says how large the difference was,
and where: the test suite must pass on any x86 CPU (Intel or AMD, ``ATEN_CPU_CAPABILITY`` =
default / avx2 / avx512, any ``OMP_NUM_THREADS``), so when a comparison fails the message has to
tell a real bug (a difference of order 1) apart from rounding (a difference of order 1e-6).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


def diff_report(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor]) -> str:
    """Max abs and max rel difference over all tensors, with the tensor name and index of each."""
    worst_abs = (-1.0, "", ())
    worst_rel = (-1.0, "", ())
    for k in ref:
        a, b = got[k].double(), ref[k].double()
        if a.shape != b.shape:
            return f"{k}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        if a.numel() == 0:
            continue
        d = (a - b).abs()
        i = int(d.argmax())
        if float(d.flatten()[i]) > worst_abs[0]:
            worst_abs = (float(d.flatten()[i]), k, tuple(int(x) for x in _unravel(i, d.shape)))
        r = d / b.abs().clamp_min(1e-30)
        j = int(r.argmax())
        if float(r.flatten()[j]) > worst_rel[0]:
            worst_rel = (float(r.flatten()[j]), k, tuple(int(x) for x in _unravel(j, d.shape)))
    return (f"max abs diff {worst_abs[0]:.3e} at {worst_abs[1]}{list(worst_abs[2])}; "
            f"max rel diff {worst_rel[0]:.3e} at {worst_rel[1]}{list(worst_rel[2])}")


def _unravel(i: int, shape: torch.Size) -> list[int]:
    out = []
    for s in reversed(shape):
        out.append(i % s)
        i //= s
    return out[::-1]


def assert_tensors_close(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], *,
                         atol: float, rtol: float, what: str = "") -> None:
    """``torch.testing.assert_close`` on every entry; the message gives the worst differences
    over *all* entries (not just the first failing one) and torch's own per-tensor report."""
    assert sorted(got) == sorted(ref), f"{what}: keys differ: {sorted(set(got) ^ set(ref))}"
    for k in ref:
        try:
            torch.testing.assert_close(got[k], ref[k], atol=atol, rtol=rtol)
        except AssertionError as e:
            raise AssertionError(f"{what}: {k} differs (atol={atol:g}, rtol={rtol:g}); over all "
                                 f"tensors: {diff_report(got, ref)}\n{e}") from None


def relative_update_diff(got: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor],
                         init: Mapping[str, torch.Tensor]) -> tuple[float, str]:
    """The largest ``||(got - init) - (ref - init)|| / ||ref - init||`` over the tensors (L2 norms
    per tensor), and the tensor where it occurs: how differently two runs moved each weight,
    relative to how far they moved it. Tensors that did not move in ``ref`` must not move in
    ``got`` either (reported as inf otherwise)."""
    worst, where = 0.0, ""
    for k in ref:
        step = (ref[k].double() - init[k].double()).norm()
        diff = (got[k].double() - ref[k].double()).norm()
        r = float(diff / step) if step > 0 else (0.0 if diff == 0 else float("inf"))
        if r > worst:
            worst, where = r, k
    return worst, where
