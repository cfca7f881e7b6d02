"""Elastic weight consolidation (Kirkpatrick et al., 2017), diagonal Fisher, optionally online.

Penalty ``lambda/2 * sum_i F_i (theta_i - theta0_i)^2``; its gradient ``lambda * F * (theta -
theta0)`` is added to ``p.grad`` in ``grad_term`` exactly like coupled L2-SP (same foreach path,
same FSDP handling, same DeepSpeed ZeRO-1/2 fallback through the loss, ZeRO-3 unsupported). See
:mod:`forgetkit.regularizers.fisher` for what F is, its normalisation (per-example sum over target
tokens, mean over examples) and a worked note on how that sets the scale of lambda.

Where F comes from (in ``prepare``, at theta0, on the rank's local parameters):

1. the run's own copy ``<output_dir>/fisher-<name>.safetensors`` if it exists and was made for
   the same settings and the same theta0 (its metadata carries a key) -- this is what a resumed
   run reads, so a resume uses bit-for-bit the Fisher of the interrupted run;
2. else ``fisher_path`` if that file exists (and ``online_gamma`` is not set): a Fisher computed
   earlier, e.g. by another run;
3. else it is estimated on ``batches`` -- batches of the *general* data whose abilities should
   be kept (not the fine-tuning task: the Fisher measures which weights matter for what must not
   be forgotten), built by the data layer (:mod:`forgetkit.data.sets` from ``fisher_data``, or
   :func:`forgetkit.integrations.fisher_batches`). There is no implicit default: batches are
   required unless ``fisher_path`` exists. The estimate is written to ``fisher_path`` (rank 0)
   when given and absent.

The run's own copy is keyed by the Fisher's identity (``identity``: what
:func:`forgetkit.identity.fisher_identity` computes from the config -- the same function names the
runner's shared Fisher cache file) plus theta0's fingerprint, the selected parameter names and,
for online EWC, the previous Fisher file; without an ``identity`` (API use) a digest of the
batches' tensors stands in for it.

``capture_reference(model)`` (for loops that shard the model or load a checkpoint before
``prepare``, e.g. a resuming ``transformers.Trainer``) snapshots theta0 and obtains F now, at the
weights given, by the rules above; ``prepare`` then cuts both to the local shards.

Online EWC (Schwarz et al., 2018): with ``online_gamma`` and an existing ``fisher_path`` holding
the previous task's (already accumulated) Fisher, ``F = gamma * F_old + F_new`` with ``F_new``
estimated now at theta0. The combined F is written to the run's own copy (1.), never over
``fisher_path``; point the next task's ``fisher_path`` at it to continue the chain. Without an
existing ``fisher_path`` the first task simply uses ``F_new`` (and writes it there).

Files hold the *raw* Fisher; ``fisher_postprocess`` is applied after loading/combining.

Memory: theta0 (``anchor_dtype``) plus F (fp32) per selected weight -- two extra copies.

Resume: theta0 and F are not stored in every checkpoint (two model-sized tensors each time):
theta0 is recomputed from the reloaded initial model and F read back from the run's own Fisher
file; ``state_dict`` carries global fingerprints of both, checked by ``load_state_dict``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch

from forgetkit.regularizers.base import RegContext
from forgetkit.regularizers.fisher import (
    estimate_fisher,
    finite_or_raise,
    is_dtensor,
    load_fisher,
    postprocess_fisher,
    save_fisher,
)
from forgetkit.regularizers.functional import ewc_grad_, ewc_penalty
from forgetkit.regularizers.l2 import AnchoredRegularizer

log = logging.getLogger("forgetkit")


def _to_local(full: dict[str, torch.Tensor], names: Sequence[str],
              params: Sequence[torch.nn.Parameter], device: torch.device
              ) -> list[torch.Tensor]:
    """Full (file) tensors -> this rank's local shards, aligned with ``params``."""
    out = []
    for n, p in zip(names, params, strict=True):
        if n not in full:
            raise KeyError(f"the Fisher file has no entry for parameter {n!r}")
        t = full[n]
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(f"Fisher entry {n!r} has shape {tuple(t.shape)}, the parameter "
                             f"{tuple(p.shape)}: a Fisher of a different model?")
        if is_dtensor(p):
            from torch.distributed.tensor import distribute_tensor

            t = distribute_tensor(t.to(p.device), p.device_mesh, p.placements).to_local()
        out.append(t.to(device=device, dtype=torch.float32))
    return out


def _to_full(local: Sequence[torch.Tensor], params: Sequence[torch.nn.Parameter]
             ) -> list[torch.Tensor]:
    """Local shards -> full tensors (a collective for DTensor parameters)."""
    out = []
    for t, p in zip(local, params, strict=True):
        if is_dtensor(p):
            from torch.distributed.tensor import DTensor

            t = DTensor.from_local(t, p.device_mesh, p.placements, shape=p.shape,
                                   stride=p.stride()).full_tensor()
        out.append(t)
    return out


class EWC(AnchoredRegularizer):
    """``lambda/2 * sum F (theta - theta0)^2`` with a diagonal Fisher (see the module docstring).

    Args:
        lam: strength lambda (its scale depends on F's: see ``forgetkit.regularizers.fisher``).
        batches: collated batches of the general data F is estimated on (pre-shifted labels, as
            ``forgetkit.data`` builds them); None only with an existing ``fisher_path``.
        estimator: ``"empirical"``, ``"sampled"`` or ``"batched"``.
        fisher_samples: label draws per example (``sampled``).
        fisher_path: load F from / save F to this safetensors file.
        postprocess: ``"none"``, ``"max_normalize"`` or ``"clamp"``.
        clamp: the cap of ``"clamp"``.
        online_gamma: online-EWC decay of the previous Fisher at ``fisher_path``.
        include: regex patterns of parameter names (default all trainable).
        exclude: regex patterns removed from the selection.
        anchor_dtype: dtype theta0 is kept in.
        seed: seed of the ``sampled`` draws.
        identity: the Fisher's identity (:func:`forgetkit.identity.fisher_identity`): keys the
            run's own copy; default: a digest of ``batches``.
        run_dir: the run's output directory (its own Fisher copy goes there; None: no copy).
        name: the name logged as ``reg/<name>`` (default ``ewc``).
        per_example: passed to :func:`estimate_fisher`.
    """

    name = "ewc"
    kind = "ewc"

    def __init__(self, lam: float, *, batches: Sequence[dict[str, torch.Tensor]] | None = None,
                 estimator: Literal["empirical", "sampled", "batched"] = "empirical",
                 fisher_samples: int = 1, fisher_path: str | Path | None = None,
                 postprocess: Literal["none", "max_normalize", "clamp"] = "none",
                 clamp: float | None = None, online_gamma: float | None = None,
                 include: Sequence[str] = (), exclude: Sequence[str] = (),
                 anchor_dtype: Literal["float32", "bfloat16", "float16"] = "float32",
                 seed: int = 0, identity: dict[str, Any] | None = None,
                 run_dir: str | Path | None = None, name: str | None = None,
                 per_example: Literal["auto", "vmap", "loop"] = "auto") -> None:
        super().__init__(lam, include, exclude, anchor_dtype, name)
        if postprocess == "clamp" and clamp is None:
            raise ValueError("fisher_postprocess 'clamp' needs fisher_clamp")
        if estimator not in ("empirical", "sampled", "batched"):
            raise ValueError(f"unknown Fisher estimator {estimator!r}")
        self.batches = list(batches) if batches is not None else None
        self.estimator, self.fisher_samples = estimator, fisher_samples
        self.fisher_path = Path(fisher_path) if fisher_path else None
        self.postprocess, self.clamp, self.online_gamma = postprocess, clamp, online_gamma
        self.seed = seed
        self.identity = identity
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.per_example = per_example
        self.fisher: list[torch.Tensor] = []  # local, fp32, post-processed, aligned with params
        self.raw_meta: dict[str, Any] = {}
        self._fisher_full: dict[str, torch.Tensor] | None = None  # raw F by name (captured)
        self._captured_fingerprint: dict[str, list[float]] | None = None

    # ---- Fisher
    @property
    def own_path(self) -> Path | None:
        return self.run_dir / f"fisher-{self.name}.safetensors" if self.run_dir else None

    def _data_identity(self) -> Any:
        if self.identity is not None:
            return self.identity
        h = hashlib.sha256()
        for b in self.batches or []:
            for k in ("input_ids", "labels", "attention_mask"):
                if k in b:
                    h.update(k.encode())
                    h.update(b[k].detach().cpu().contiguous().numpy().tobytes())
        return {"batches_sha256": h.hexdigest(), "estimator": self.estimator,
                "samples": self.fisher_samples, "seed": self.seed}

    def _key(self) -> str:
        """What the run's own Fisher copy depends on (identity + theta0 + previous Fisher)."""
        prev = None
        if self.online_gamma is not None and self.fisher_path and self.fisher_path.exists():
            st = self.fisher_path.stat()
            prev = [str(self.fisher_path), st.st_size, st.st_mtime_ns]
        blob = json.dumps({
            "identity": self._data_identity(), "estimator": self.estimator,
            "samples": self.fisher_samples, "seed": self.seed, "names": self.names,
            "dtypes": [str(p.dtype) for p in self.params],  # theta0's fingerprint is not
            "online_gamma": self.online_gamma, "previous": prev,
            "theta0": [round(x, 6) for x in self.fingerprint.get("theta0", [])],
        }, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:32]

    def _estimate(self, ctx: RegContext) -> tuple[list[torch.Tensor], int]:
        if not self.batches:
            raise ValueError(
                f"regularizer {self.name!r}: EWC needs batches of the general data whose "
                f"abilities are to be kept (config: fisher_data) or an existing fisher_path"
                + (f" ({self.fisher_path} does not exist)" if self.fisher_path else ""))
        fd = estimate_fisher(ctx.model, self.batches, self.estimator, self.fisher_samples,
                             params=list(zip(self.names, self.params, strict=True)),
                             seed=self.seed, per_example=self.per_example, rank=ctx.rank,
                             world_size=ctx.world_size, all_reduce=ctx.all_reduce_sum)
        n_examples = sum(int(b["input_ids"].shape[0]) for b in self.batches)
        n = len(self.batches) if self.estimator == "batched" else n_examples
        log.info("EWC %s: %s Fisher on %d examples (%d batches)", self.name, self.estimator,
                 n_examples, len(self.batches))
        return [fd[nm] for nm in self.names], n

    def _save(self, ctx: RegContext, path: Path, local: list[torch.Tensor],
              meta: dict[str, Any]) -> None:
        full = _to_full(local, self.params)  # collective under FSDP: every rank
        if ctx.rank == 0:
            save_fisher(path, dict(zip(self.names, full, strict=True)), meta)
            log.info("EWC %s: Fisher written to %s", self.name, path)

    @staticmethod
    def _agree(ctx: RegContext, flag: bool) -> bool:
        """Rank 0's answer, on every rank (a sum of rank 0's 1/0 and the others' 0)."""
        if ctx.world_size <= 1:
            return flag
        t = torch.tensor([1.0 if (flag and ctx.rank == 0) else 0.0], device=ctx.device)
        ctx.all_reduce_sum(t)
        return bool(t.item() > 0)

    def _obtain(self, ctx: RegContext) -> list[torch.Tensor]:
        dev = self.anchor[0].device
        key = self._key()
        own = self.own_path
        # Every rank takes the same branch (a file visible to rank 0 only, on storage not
        # shared across nodes, must not send the ranks into different collectives).
        own_exists = own is not None and self._agree(ctx, own.exists())
        path_exists = self.fisher_path is not None and self._agree(ctx, self.fisher_path.exists())
        if own_exists:
            assert own is not None
            full, meta = load_fisher(own)
            if meta.get("key") == key:
                log.info("EWC %s: Fisher read from the run's copy %s", self.name, own)
                self.raw_meta = meta
                return _to_local(full, self.names, self.params, dev)
            log.info("EWC %s: %s was made for other settings or weights; re-estimating",
                     self.name, own)
        prev = None
        if path_exists:
            assert self.fisher_path is not None
            full, pmeta = load_fisher(self.fisher_path)
            finite_or_raise(full, str(self.fisher_path))
            prev = _to_local(full, self.names, self.params, dev)
            if self.online_gamma is None:
                log.info("EWC %s: Fisher read from %s (%s, %s examples)", self.name,
                         self.fisher_path, pmeta.get("estimator"), pmeta.get("n_examples"))
                self.raw_meta = pmeta
                if own is not None:  # the run's own copy too: a later online stage reads it
                    self._save(ctx, own, prev, pmeta)
                return prev
        new, n = self._estimate(ctx)
        meta: dict[str, Any] = {"estimator": self.estimator, "n_examples": n,
                                "samples": self.fisher_samples, "key": key}
        if prev is not None:  # online EWC
            g = float(self.online_gamma)  # type: ignore[arg-type]
            fisher = [g * a + b for a, b in zip(prev, new, strict=True)]
            meta.update(online_gamma=g, previous=str(self.fisher_path))
        else:
            fisher = new
            if self.fisher_path is not None:
                self._save(ctx, self.fisher_path, fisher, meta)
        if own is not None:
            self._save(ctx, own, fisher, meta)
        self.raw_meta = meta
        return fisher

    # ---- the protocol
    def capture_reference(self, model: torch.nn.Module, *, rank: int = 0, world_size: int = 1,
                          all_reduce: Any = None) -> None:
        """Snapshot theta0 and obtain F *now*, on the unwrapped full ``model`` (see the module
        docstring). Under several processes pass ``rank``/``world_size`` and ``all_reduce`` (an
        in-place sum over ranks): each rank then estimates its share of the examples."""
        super().capture_reference(model)
        kw: dict[str, Any] = {} if all_reduce is None else {"all_reduce_sum": all_reduce}
        dev = next(model.parameters()).device
        ctx0 = RegContext(model=model, params=model.named_parameters, device=dev, rank=rank,
                          world_size=world_size, **kw)
        self._setup(ctx0)  # full tensors: anchor == the snapshot
        raw = self._obtain(ctx0)
        self._reference = dict(zip(self.names, self.anchor, strict=True))
        self._fisher_full = dict(zip(self.names, raw, strict=True))

    def prepare(self, ctx: RegContext) -> None:
        captured = self._fisher_full
        self._setup(ctx)
        if captured is not None:
            raw = _to_local(captured, self.names, self.params, self.anchor[0].device)
            self._fisher_full = None
        else:
            raw = self._obtain(ctx)
        pp = postprocess_fisher(dict(zip(self.names, raw, strict=True)), self.postprocess,
                                self.clamp, sharded=self.sharded and ctx.world_size > 1)
        self.fisher = [pp[n].contiguous() for n in self.names]
        self.fingerprint["fisher"] = self._global_fingerprint(ctx, self.fisher)
        fp = self.fingerprint["fisher"]
        log.info("EWC %s: mean F %.3e, max F %.3e over %d weights", self.name,
                 fp[0] / max(fp[2], 1.0), float(self._global_max(ctx)), int(fp[2]))

    def _global_max(self, ctx: RegContext) -> torch.Tensor:
        m = torch.stack([f.max() if f.numel() else f.new_zeros(()) for f in self.fisher]).max()
        if self.sharded and ctx.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(m, op=dist.ReduceOp.MAX)
        return m

    def penalty(self, ctx: RegContext, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
        if self.mode != "loss":
            return None
        ix = [str(i) for i in range(len(self.params))]
        v = self.lam * ewc_penalty(dict(zip(ix, self._differentiable_local(), strict=True)),
                                   dict(zip(ix, self.anchor, strict=True)),
                                   dict(zip(ix, self.fisher, strict=True)))
        return self._global_value(ctx, v)

    def grad_term(self, ctx: RegContext) -> torch.Tensor | None:
        if self.mode != "grad":
            return None
        v = ewc_grad_(self._local_grads(), self._local_params(), self.anchor, self.fisher,
                      self.lam)
        return self._all_reduce(ctx, v)

    def after_step(self, ctx: RegContext, lr: float) -> torch.Tensor | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "estimator": self.estimator,
                "fisher_meta": {k: v for k, v in self.raw_meta.items()
                                if isinstance(v, (str, int, float))}}
