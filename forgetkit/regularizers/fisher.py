"""Diagonal Fisher information of a causal LM: estimation, post-processing, save/load.

Definitions (what ``estimate_fisher`` computes)
-----------------------------------------------
For an example ``i`` with input tokens ``x_i`` and target tokens ``y_i`` (the positions whose
label is not ``IGNORE_INDEX``), the per-example log-likelihood is the **sum over that example's
target tokens**::

    l_i(theta) = sum_{t in targets(i)} log p_theta(y_{i,t} | x_i, y_{i,<t})

This is the log-likelihood of the sequence under the autoregressive model, so its score
``g_i = grad l_i`` is a proper score and ``E[g g^T]`` a proper Fisher (a per-token *mean* would
not be the gradient of any log-likelihood and would make long and short examples count alike).
The Fisher is the **mean over examples**::

    empirical : F = 1/N sum_i g_i^2                       (y_i = the data's own targets)
    sampled   : F = 1/N sum_i 1/S sum_s g_{i,s}^2          (y_{i,t} ~ p_theta(. | data prefix))
    batched   : F = 1/K sum_k (1/|B_k| sum_{i in B_k} g_i)^2   (an approximation, see below)

``empirical`` and ``sampled`` square **per-example** gradients. ``sampled`` is the Monte Carlo
"true" Fisher: at every target position a token is drawn from the model's own predictive
distribution given the data prefix (teacher forcing), ``S = samples`` independent draws per
example. Because the draws at different positions are independent and each score has mean zero,
the cross-position terms vanish in expectation and ``E[F_sampled] = 1/N sum_i sum_t F_{i,t}``,
the sum of the per-position Fishers -- unbiased for that quantity (tested in closed form).

``batched`` squares the gradient of a mini-batch *mean*. It is cheap (one backward per batch)
but it is **not** the Fisher: ``E[gbar^2] = Var(g)/|B| + E[g]^2``, i.e. near a minimum of the
data's loss it is about ``F / |B|`` -- ``|B|`` times too small and noisier -- and away from a
minimum it is dominated by the squared mean gradient. It is only named here so that the
difference is explicit (see tests/test_fisher.py).

Worked note on Fisher scaling (what lambda means)
-------------------------------------------------
Because ``l_i`` sums over tokens, ``F`` grows with the number of target tokens per example: for
roughly independent token scores it is about ``T * f`` where ``f`` is a per-token Fisher. The
EWC penalty is ``lambda/2 * sum F (theta - theta0)^2`` and the training loss of the loop is a
**per-token mean**. The Laplace approximation of the posterior after N_A examples of task A is
``N_A/2 * sum F (theta - theta0)^2`` next to a *summed* task-B log-likelihood; dividing both by
the number of target tokens of task B (``N_B * T_B``) to match the loop's per-token mean gives
``lambda_Laplace = N_A / (N_B * T_B)``, i.e. about ``1 / T_B`` for equally large tasks -- far
smaller than the values that work in practice (1e2..1e4 in the literature), because the diagonal
Laplace approximation is very loose. Example: 100-token examples, ``mean F = 1e-4``: a drift of
``|theta - theta0| = 1e-2`` on 1e8 weights costs ``lambda * 0.5 * 1e-4 * 1e-4 * 1e8 = 0.5 lambda``
nats per token. ``fisher_postprocess: max_normalize`` (F / max F) removes the scale and makes
lambda comparable with L2-SP's lambda on the most important weight.

Efficiency and distribution
---------------------------
Per-example gradients use ``torch.func`` (``functional_call`` + ``vmap(grad)``) in chunks sized
to a memory budget (``vmap_budget_bytes``), else a loop over single examples (each one trimmed to
its own length, no padding). The squares are accumulated in fp32.

The budget bounds the per-example gradients that one vmap call materialises: ``chunk`` examples
times the selected parameters' bytes. When a whole per-example gradient is larger than the budget
(about 67 M fp32 parameters at the default 256 MiB) the selected parameters are split, in
order, into groups whose per-example gradients fit (a single tensor larger than the budget is a
group of its own), and every group is a separate ``vmap(grad)`` over the examples with its own
chunk size (>= 1). Each group costs a full forward and a backward down to its first parameter,
so G groups cost about G times the loop's compute: ``per_example="auto"`` therefore takes
vmap only when the whole per-example gradient of at least two examples fits the budget (one
group) and otherwise the loop, which measured faster than two or more groups on a 43.9 M model
(benchmarks/README.md, "Fisher: vmap vs loop"). ``per_example="vmap"`` always vmaps (grouping as
needed). Every mode computes the same per-example gradients (same padding-free losses; the vmap
path relies on right padding, under which pad positions cannot influence a causal LM's real
positions), so the results agree to fp32 rounding.

A progress bar (``tqdm``: examples done / examples of this rank) is shown on rank 0 when
``progress`` is true and stderr is a terminal.

Distributed (``world_size > 1``): the caller passes the *global* list of batches, identical on
every rank. With full (unsharded) parameters -- single process, DDP before wrapping -- rank ``r``
takes batches ``r, r+W, ...``, squares its own per-example gradients locally (the module must be
the unwrapped one: no gradient all-reduce), the per-rank sums are all-reduced and divided by the
*global* example count, so the result does not depend on the number of processes (up to fp32
summation order). With FSDP-sharded parameters (DTensors), every rank processes *every* example
in lockstep: FSDP's reduce-scatter then averages identical gradients, each rank gets the exact
local shard of every per-example gradient, and squares it locally -- per-example correctness at
the cost of no data parallelism. The result holds the local shards.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from forgetkit.data.templates import IGNORE_INDEX

log = logging.getLogger("forgetkit")

__all__ = [
    "ESTIMATORS",
    "estimate_fisher",
    "load_fisher",
    "local_tensor",
    "postprocess_fisher",
    "save_fisher",
]

ESTIMATORS = ("empirical", "sampled", "batched")
FORMAT = "forgetkit-fisher/1"
Estimator = Literal["empirical", "sampled", "batched"]


# ----------------------------------------------------------------------------- helpers

def is_dtensor(t: Any) -> bool:
    """True for a torch DTensor (e.g. an FSDP2-sharded parameter or its gradient)."""
    return hasattr(t, "_local_tensor") and hasattr(t, "device_mesh")


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (sharing storage), or the tensor itself."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _nll_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Summed negative log-likelihood of the non-ignored labels (fp32)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def _example_seed(seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(seed), int(index), 0xF15E]).generate_state(1)[0])


# ----------------------------------------------------------------------------- estimation

def _sample_labels(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], samples: int,
                   seed: int, first_index: int) -> list[torch.Tensor]:
    """``samples`` label tensors (B, T): every target position redrawn from the model.

    Example ``first_index + i`` of the global stream uses its own generator, so the draws do not
    depend on how examples are split over ranks or batches.
    """
    labels = batch["labels"]
    with torch.no_grad():
        logits = _logits(model(input_ids=batch["input_ids"],
                               attention_mask=batch.get("attention_mask")))
    out = [labels.clone() for _ in range(samples)]
    for i in range(labels.shape[0]):
        pos = labels[i] != IGNORE_INDEX
        if not pos.any():
            continue
        probs = torch.softmax(logits[i, pos].float(), dim=-1)
        gen = torch.Generator(device=probs.device)
        gen.manual_seed(_example_seed(seed, first_index + i))
        draws = torch.multinomial(probs, samples, replacement=True, generator=gen)  # (n_t, S)
        for s in range(samples):
            out[s][i, pos] = draws[:, s]
    return out


def _right_padded(attention_mask: torch.Tensor | None) -> bool:
    if attention_mask is None:
        return True
    am = attention_mask.bool()
    return bool((am[:, 1:] <= am[:, :-1]).all())


# Fewer target tokens than this could all equal their input token by chance (a repeated token
# such as "aa"); from this many on, "every target equals its input" means unshifted labels.
_UNSHIFTED_MIN_TARGETS = 4


def _check_shifted(batches: Sequence[Mapping[str, torch.Tensor]]) -> None:
    """Raise if the labels are not pre-shifted: ``labels[t] == input_ids[t]`` at every target
    position of every batch (with pre-shifted labels that needs every target token to repeat
    the one before it)."""
    n_targets = n_equal = 0
    for b in batches:
        ids, labels = b["input_ids"], b["labels"]
        if ids.shape != labels.shape:
            raise ValueError(f"estimate_fisher: labels {tuple(labels.shape)} and input_ids "
                             f"{tuple(ids.shape)} differ in shape")
        tgt = labels != IGNORE_INDEX
        n_targets += int(tgt.sum())
        n_equal += int((tgt & (labels == ids)).sum())
    if n_targets >= _UNSHIFTED_MIN_TARGETS and n_equal == n_targets:
        raise ValueError(
            f"estimate_fisher: the labels equal input_ids at all {n_targets} target positions: "
            "they are unshifted (the Hugging Face convention, where the model shifts them "
            "internally). forgetkit expects pre-shifted labels (labels[t] is the token after "
            "position t, as forgetkit.data builds them): shift them, e.g. "
            "labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], -100)], 1)")


class _VmapUnavailable(RuntimeError):
    pass


def param_groups_for_budget(sizes: Sequence[int], elem_bytes: int, budget_bytes: int
                            ) -> list[list[int]]:
    """Split parameters (given by element counts, in order) into groups whose per-example
    gradients fit ``budget_bytes``: consecutive parameters are packed while the group's bytes
    (``sum(numel) * elem_bytes``) stay within the budget; a parameter larger than the budget on
    its own forms a one-parameter group. Returns the groups as lists of indices."""
    groups: list[list[int]] = []
    cur: list[int] = []
    cur_bytes = 0
    for i, n in enumerate(sizes):
        b = int(n) * elem_bytes
        if cur and cur_bytes + b > budget_bytes:
            groups.append(cur)
            cur, cur_bytes = [], 0
        cur.append(i)
        cur_bytes += b
    if cur:
        groups.append(cur)
    return groups


def vmap_plan(sizes: Sequence[int], elem_bytes: int, budget_bytes: int
              ) -> list[tuple[list[int], int]]:
    """(parameter indices, examples per vmap call) for every group; see the module docstring.

    One group of everything with ``chunk = budget // bytes`` when a whole per-example gradient
    fits, else :func:`param_groups_for_budget` with each group's own chunk (always >= 1).
    """
    total = sum(int(n) for n in sizes) * elem_bytes
    if total <= budget_bytes:
        return [(list(range(len(sizes))), max(1, budget_bytes // max(1, total)))]
    plan = []
    for g in param_groups_for_budget(sizes, elem_bytes, budget_bytes):
        gb = sum(int(sizes[i]) for i in g) * elem_bytes
        plan.append((g, max(1, budget_bytes // max(1, gb))))
    return plan


def _vmap_sq_grads(model: torch.nn.Module, pdict: dict[str, torch.Tensor],
                   ids: torch.Tensor, labels: torch.Tensor,
                   plan: Sequence[tuple[Sequence[str], int]]) -> dict[str, torch.Tensor]:
    """sum over the P rows of the squared per-row gradients (fp32), via vmap(grad).

    ``plan``: (parameter names, rows per vmap call) per parameter group; every group is one
    ``vmap(grad)`` over the rows with respect to its own parameters only (the others are the
    module's own, constant here).
    """
    from torch.func import functional_call, grad, vmap

    def nll(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # Right padding needs no attention mask in a causal LM: a real token never attends to a
        # later (pad) position, and position ids start at 0 either way.
        out = functional_call(model, p, args=(), kwargs={"input_ids": x.unsqueeze(0)})
        return _nll_sum(_logits(out)[0], y)

    g_fn = vmap(grad(nll), in_dims=(None, 0, 0))
    acc = {n: torch.zeros(t.shape, dtype=torch.float32, device=t.device)
           for n, t in pdict.items()}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*performance drop.*")
        for names, chunk in plan:
            sub = {n: pdict[n] for n in names}
            for s in range(0, ids.shape[0], chunk):
                # Outer no_grad: the parameters *not* in ``sub`` still require grad, and without
                # it autograd would record the whole vmapped computation for them (memory) and
                # the Fisher would come back requiring grad. torch.func.grad ignores an outer
                # no_grad.
                with torch.no_grad():
                    g = g_fn(sub, ids[s:s + chunk], labels[s:s + chunk])
                    for n, t in g.items():
                        acc[n] += t.float().pow(2).sum(0)
                    del g
    return acc


def _progress_bar(total: int, enabled: bool) -> Any:
    """A tqdm bar over examples, or None when disabled / not a terminal / tqdm missing."""
    import sys

    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc="fisher", unit="ex", leave=False, dynamic_ncols=True)


def estimate_fisher(model: torch.nn.Module, batches: Sequence[Mapping[str, torch.Tensor]],
                    estimator: Estimator = "empirical", samples: int = 1, *,
                    params: Iterable[tuple[str, torch.nn.Parameter]] | None = None,
                    seed: int = 0, per_example: Literal["auto", "vmap", "loop"] = "auto",
                    vmap_budget_bytes: int = 1 << 28, rank: int = 0, world_size: int = 1,
                    all_reduce: Callable[[torch.Tensor], Any] | None = None,
                    progress: bool = True) -> dict[str, torch.Tensor]:
    """Diagonal Fisher of ``model`` on ``batches`` (see the module docstring for the math).

    The model is put in eval mode (no dropout) for the estimate and restored afterwards; the
    parameters' ``.grad`` (of every parameter of ``model``, selected or not) are restored to what
    they were: the estimate leaves no gradient behind for the caller's next optimizer step.

    Args:
        model: the *unwrapped* module (no DDP gradient averaging), called as
            ``model(input_ids=..., attention_mask=...)`` and returning logits or an object with
            ``.logits`` of shape (B, T, V); labels are pre-shifted (``labels[t]`` is the target
            of the logits at ``t``), as ``forgetkit.data`` produces them.
        batches: the *global* list of collated, right-padded batches (same on every rank), each
            with ``input_ids``, ``labels`` and optionally ``attention_mask``.
        estimator: ``"empirical"``, ``"sampled"`` or ``"batched"``.
        samples: label draws per example for ``"sampled"``.
        params: (name, parameter) pairs to estimate for; default: every parameter of ``model``
            that requires grad. Names must be ``model.named_parameters()`` names. DTensor
            (FSDP-sharded) parameters switch to the lockstep mode described above.
        seed: seed of the ``sampled`` draws (per example, independent of the rank split).
        per_example: ``"vmap"`` (torch.func; parameter groups when one per-example gradient
            exceeds the budget), ``"loop"`` (one example at a time) or ``"auto"`` (vmap when at
            least two whole per-example gradients fit in ``vmap_budget_bytes``, else the loop,
            which is faster than grouped vmap; falls back to the loop if the model cannot be
            vmapped).
        vmap_budget_bytes: memory allowed for the per-example gradients of one vmap call
            (examples of the call times the bytes of its parameter group).
        rank: this process's rank.
        world_size: number of processes.
        all_reduce: in-place sum over ranks (e.g. ``backend.all_reduce_sum``); default
            ``torch.distributed.all_reduce`` when ``world_size > 1``.
        progress: show a tqdm bar (examples done / this rank's examples) on rank 0 when stderr
            is a terminal; ``False`` never shows one.

    Returns:
        name -> fp32 tensor shaped like the (local) parameter: the Fisher diagonal, averaged over
        the global number of examples (``batched``: over the number of batches).

    Raises:
        ValueError: an unknown estimator, no batches or parameters, or unshifted labels (equal to
            ``input_ids`` at every target position, the Hugging Face convention where the model
            shifts internally): the loss computed here would score predicting the *current*
            token, a wrong Fisher without any error.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"unknown Fisher estimator {estimator!r}; expected one of {ESTIMATORS}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    named = [(n, p) for n, p in (params if params is not None else model.named_parameters())
             if p.requires_grad]
    if not named:
        raise ValueError("estimate_fisher: no parameter requires grad")
    if not batches:
        raise ValueError("estimate_fisher: no batches")
    _check_shifted(batches)
    sharded = any(is_dtensor(p) for _, p in named)
    device = local_tensor(named[0][1]).device
    acc = {n: torch.zeros(local_tensor(p).shape, dtype=torch.float32, device=device)
           for n, p in named}
    sizes = [int(b["input_ids"].shape[0]) for b in batches]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).tolist()

    n_sel = sum(local_tensor(p).numel() for _, p in named)
    elem = local_tensor(named[0][1]).element_size()
    whole_fits_twice = 2 * n_sel * elem <= vmap_budget_bytes
    use_vmap = (per_example == "vmap" or (per_example == "auto" and whole_fits_twice)
                ) and not sharded
    plan_idx = vmap_plan([local_tensor(p).numel() for _, p in named], elem, vmap_budget_bytes)
    plan = [([named[i][0] for i in g], chunk) for g, chunk in plan_idx]
    if per_example == "vmap" and sharded:
        raise ValueError("per_example='vmap' is not available for sharded (DTensor) parameters")

    was_training = model.training
    model.eval()
    # Every ``.backward()`` below fills ``.grad`` of *every* trainable parameter of ``model``,
    # not only of the selected ones (``include``/``exclude``): save and clear all of them, clear
    # all after each backward, restore all at the end. Otherwise the caller's next optimizer step
    # would add the sum of the Fisher examples' gradients to its own.
    everything = list(dict.fromkeys([*model.parameters(), *(p for _, p in named)]))
    saved_grads = [p.grad for p in everything]
    for p in everything:
        p.grad = None

    def add_sq(weight: float) -> None:
        for n, p in named:
            if p.grad is not None:
                acc[n].add_(local_tensor(p.grad).float().pow(2), alpha=weight)
        for p in everything:
            p.grad = None

    mine = [k for k in range(len(batches)) if sharded or k % world_size == rank]
    bar = _progress_bar(sum(sizes[k] for k in mine), progress and rank == 0)
    prev: int | None = None  # the batch finished before this one (for the progress bar)
    try:
        for k in mine:
            raw = batches[k]
            if bar is not None and prev is not None:
                bar.update(sizes[prev])
            prev = k
            batch = {key: v.to(device) for key, v in raw.items() if torch.is_tensor(v)}
            ids, labels = batch["input_ids"], batch["labels"]
            am = batch.get("attention_mask")
            if estimator == "batched":
                out = model(input_ids=ids, attention_mask=am)
                (_nll_sum(_logits(out), labels) / ids.shape[0]).backward()
                add_sq(1.0)
                continue
            if estimator == "sampled":
                label_sets = _sample_labels(model, batch, samples, seed, offsets[k])
                weight = 1.0 / samples
            else:
                label_sets, weight = [labels], 1.0
            if use_vmap and _right_padded(am):
                try:
                    pdict = {n: p.detach() for n, p in named}
                    rows = torch.cat([ids] * len(label_sets))
                    sq = _vmap_sq_grads(model, pdict, rows, torch.cat(label_sets), plan)
                    for n in acc:
                        acc[n].add_(sq[n], alpha=weight)
                    continue
                except Exception as e:  # e.g. data-dependent control flow in the model
                    if per_example == "vmap":
                        raise
                    log.warning("per-example gradients with torch.func failed (%s: %s); falling "
                                "back to one example at a time", type(e).__name__,
                                str(e).splitlines()[0][:200])
                    use_vmap = False
            for i in range(ids.shape[0]):
                keep = am[i].bool() if am is not None else torch.ones_like(ids[i], dtype=bool)
                x = ids[i, keep].unsqueeze(0)
                logits = _logits(model(input_ids=x))[0]
                for s, lab in enumerate(label_sets):
                    y = lab[i, keep]
                    _nll_sum(logits, y).backward(retain_graph=s < len(label_sets) - 1)
                    add_sq(weight)
        if bar is not None and prev is not None:
            bar.update(sizes[prev])
    finally:
        if bar is not None:
            bar.close()
        for p, g in zip(everything, saved_grads, strict=True):
            p.grad = g
        model.train(was_training)

    count = len(batches) if estimator == "batched" else offsets[-1]
    if world_size > 1 and not sharded:
        if all_reduce is None:
            import torch.distributed as dist

            def all_reduce(t: torch.Tensor) -> None:
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
        for n in acc:
            all_reduce(acc[n])
    for n in acc:
        acc[n].div_(count)
    return acc


# ----------------------------------------------------------------------------- post-processing

def postprocess_fisher(fisher: Mapping[str, torch.Tensor],
                       kind: Literal["none", "max_normalize", "clamp"] = "none",
                       clamp: float | None = None, *, sharded: bool = False
                       ) -> dict[str, torch.Tensor]:
    """Named post-processing of a Fisher (a new dict; the input is not modified).

    Args:
        fisher: name -> Fisher tensor (local shards when ``sharded``).
        kind: ``"none"`` (identity), ``"max_normalize"`` (divide by the global max, so the most
            important weight has F = 1 and lambda is scale-free) or ``"clamp"`` (cap every entry
            at ``clamp``, limiting the pull of a few huge entries).
        clamp: the cap for ``"clamp"``.
        sharded: the tensors are local shards: take the max over all ranks.

    Returns:
        name -> post-processed fp32 tensor.
    """
    if kind == "none":
        return dict(fisher)
    if kind == "max_normalize":
        m = torch.stack([t.max() if t.numel() else t.new_zeros(()) for t in fisher.values()]).max()
        if sharded:
            import torch.distributed as dist

            dist.all_reduce(m, op=dist.ReduceOp.MAX)
        if float(m) <= 0.0:
            return dict(fisher)
        return {n: t / m for n, t in fisher.items()}
    if kind == "clamp":
        if clamp is None:
            raise ValueError("fisher_postprocess 'clamp' needs fisher_clamp")
        return {n: t.clamp(max=clamp) for n, t in fisher.items()}
    raise ValueError(f"unknown Fisher post-processing {kind!r}")


# ----------------------------------------------------------------------------- files

def save_fisher(path: str | Path, fisher: Mapping[str, torch.Tensor],
                meta: Mapping[str, Any] | None = None) -> Path:
    """Write a Fisher as safetensors, one fp32 tensor per parameter name, shaped like the model.

    Args:
        path: file to write (parent directories are created; written atomically).
        fisher: name -> full (unsharded) Fisher tensor.
        meta: metadata; should hold ``estimator`` and ``n_examples``. Strings are stored as they
            are, other values as JSON.

    Returns:
        The path written.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    md = {"format": FORMAT}
    for k, v in (meta or {}).items():
        md[str(k)] = v if isinstance(v, str) else json.dumps(v)
    tensors = {n: t.detach().to("cpu", torch.float32).contiguous() for n, t in fisher.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=md)
    tmp.replace(path)
    return path


def load_fisher(path: str | Path, device: torch.device | str = "cpu"
                ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a Fisher written by :func:`save_fisher`.

    Args:
        path: the safetensors file.
        device: where to put the tensors.

    Returns:
        (name -> fp32 tensor, metadata) where JSON metadata values are decoded
        (``n_examples`` is an int, ``estimator`` a string).
    """
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        raw = f.metadata() or {}
        for k in f.keys():
            out[k] = f.get_tensor(k).float()
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        try:
            meta[k] = json.loads(v)
        except (json.JSONDecodeError, TypeError):
            meta[k] = v
    if meta.get("format") not in (None, FORMAT):
        log.warning("%s: unexpected Fisher file format %r", path, meta.get("format"))
    return out, meta


def finite_or_raise(fisher: Mapping[str, torch.Tensor], where: str) -> None:
    """Raise if any Fisher entry is NaN/inf or negative (a corrupt file or a diverged model)."""
    for n, t in fisher.items():
        if not bool(torch.isfinite(t).all()) or (t.numel() and float(t.min()) < 0):
            raise ValueError(f"{where}: Fisher entry {n!r} is not finite and non-negative")
