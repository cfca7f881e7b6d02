"""A run's identity: what decides the numbers it produces.

A finished run may be reused, and a checkpoint resumed, only while the requested config still
*is* that run. The identity is the fully resolved config (every default spelled out, flattened to
``dotted.key: value``) minus the keys that do not change what a run computes
(:data:`NON_IDENTITY_KEYS`), plus the sha256 of every local data file the config reads: editing a
data file in place changes the run as surely as changing ``training.lr``.

Not covered (documented limits): hub datasets (``name:``) are identified by name/config/split
only, and model weights by ``model.*`` (a local model directory is not hashed: gigabytes).

This module imports only forgetkit.config (it sits just above it in the import graph).
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

from forgetkit.config import Config, config_to_dict, regularizer_data_specs

__all__ = ["NON_IDENTITY_KEYS", "NUMERICS_KEY", "NUMERICS_VERSION", "TRAINING_ONLY_KEYS", "run_identity", "training_identity",
           "identity_digest", "identity_diff", "format_mismatch", "data_files",
           "fisher_identity"]

# Dotted keys (exact, or a prefix ending in ".") left out of the identity, and why each one
# cannot change what a run computes:
NON_IDENTITY_KEYS: tuple[str, ...] = (
    # the config's name only expands into output.dir / experiment.results_dir
    "name",
    # where results go and whether the HF model is also saved: not what is computed
    # (output.overwrite is read by nothing)
    "output.",
    # resume is a way of *getting* the same run (resume equals an uninterrupted run, tested)
    "training.resume",
    # checkpoints are side files: the loop neither draws randomness nor changes state for them
    "training.checkpoint_every",
    "training.keep_checkpoints",
    # how often the running loss is written to train_log.jsonl; weights are unaffected.
    # (training.eval_every stays in: it changes the validation curve the result records.)
    "training.log_every",
    # how the same math is laid out over devices (DDP/FSDP/DeepSpeed, CPU or not); the world
    # size, which does change the global batch, is recorded separately where it matters
    # (a checkpoint's identity adds runtime.world_size; the runner's launcher stays in)
    "distributed.",
    # activation recomputation and the attention kernel: the same function, other memory/speed
    # (runner.base_model_identity treats them the same way)
    "model.gradient_checkpointing",
    "model.attn_implementation",
    # the experiment's other arms and seeds, where it writes, and its cleanup policy: a run is
    # the resolved config of its own arm and seed (already applied into the other keys).
    # experiment.launcher stays in: it sets the number of processes, hence the global batch.
    "experiment.arms",
    "experiment.seeds",
    "experiment.results_dir",
    "experiment.keep_checkpoints",
    # how results are analysed (headline, bootstrap settings): read from the results, after
    "analysis.",
)

# What a run's numbers depend on beyond its config and data files: forgetkit's own computation.
# Bumped whenever the same config computes something else; a run (or checkpoint) made by an
# earlier version is then not reused (or resumed) as if it were this one. A saved identity
# without the key is version 1.
NUMERICS_VERSION = 3
NUMERICS_KEY = "forgetkit.numerics"
NUMERICS_CHANGES: dict[int, str] = {
    1: "forgetkit up to 2026-12-01",
    2: "learning-rate schedules are transformers' (warmup starts at lr 0 on step 0; the peak is "
       "used on one step)",
    3: "training.logits 'targets' (the default): the LM head computes logits only at target "
       "positions (the same loss up to float rounding of a smaller matmul)",
}

# Config keys added to the schema after identities were first saved (2026-12-01): a saved
# identity without one was computed at its default (the key did not exist), so it is read as
# that default rather than as a change. A key that changes what a default run computes must
# never be listed here (bump NUMERICS_VERSION instead).
ADDED_KEYS: tuple[str, ...] = ("training.lora", "training.freeze.", "evaluation.merge",
                               "sequence")

# Keys added inside optional or repeated sections (which Config()'s defaults do not spell out):
# (regex of the parent key that must be present, the added key with ``{0}`` for the parent's
# index, the default). A saved identity with the parent but not the key ran at the default.
ADDED_NESTED: tuple[tuple[str, str, Any, Any], ...] = (
    (r"^data\.replay\.ratio$", "data.replay.sources", None, []),
    (r"^regularizers\.(\d+)\.type$", "regularizers.{0}.anchor", "l2", "previous"),
    (r"^regularizers\.(\d+)\.type$", "regularizers.{0}.anchor_path", "l2", None),
)


def fill_added_keys(ident: dict[str, Any], like: dict[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Give a saved identity the :data:`ADDED_KEYS` it lacks, at their defaults (in place);
    with ``like`` (the identity it is compared with), only the keys ``like`` has (a
    checkpoint's identity has no evaluation keys)."""
    flat: dict[str, Any] = {}
    _flatten(config_to_dict(Config()), "", flat)
    for k, v in flat.items():
        # A section whose default is None or [] (training.lora, evaluation.merge, sequence) is
        # present in an identity that set it as its nested keys (training.lora.r, ...), never
        # as the bare key: such a run did not run at the default.
        if (_excluded(k, ADDED_KEYS) and k not in ident and (like is None or k in like)
                and not any(j.startswith(k + ".") for j in ident)):
            ident[k] = v
    for parent, key, value, default in ADDED_NESTED:
        for k in list(ident):
            m = re.match(parent, k)
            if m is None or (value is not None and ident[k] != value):
                continue
            added = key.format(*m.groups())
            if added not in ident and (like is None or added in like):
                ident[added] = copy.deepcopy(default)
    return ident


# Also left out of a *checkpoint's* identity (training_identity): evaluation happens after
# training, on the saved model, so changing a metric must not invalidate training checkpoints
# (it does change a finished run's results, so run_identity keeps it).
TRAINING_ONLY_KEYS: tuple[str, ...] = ("evaluation.",)


def _excluded(key: str, prefixes: tuple[str, ...]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) or key.startswith(p + ".")
               for p in prefixes)


def _flatten(obj: Any, prefix: str, out: dict[str, Any]) -> None:
    """Dicts and lists of dicts become dotted keys (``regularizers.0.lam``); lists of plain
    values (``training.betas``) and empty containers stay values, so a diff reads naturally."""
    if isinstance(obj, dict) and obj:
        for k, v in obj.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(obj, list) and obj and any(isinstance(v, (dict, list)) for v in obj):
        for i, v in enumerate(obj):
            _flatten(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = obj


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_digest(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime_ns): a plan of many runs over the same
    data files hashes each file once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


def sha256_file(path: Path) -> str:
    """sha256 of a file's contents, read now (no memo: checkpoint verification must see a
    change that keeps size and mtime)."""
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def data_files(cfg: Config) -> list[Path]:
    """Every local file the config reads as data: train/validation, replay's data, each
    regularizer's fisher_data/data, each evaluation metric's data, and the files under an
    lm-eval ``include_path``. Paths that are not existing files (hub names, aliases) are left
    out."""
    specs = [cfg.data.train, cfg.data.validation]
    specs += [spec for _, spec in regularizer_data_specs(cfg)]
    dirs: list[Path] = []
    for m in list(cfg.evaluation.task) + list(cfg.evaluation.general):
        specs.append(m.data)
        if m.include_path:
            dirs.append(Path(m.include_path))
    files = [Path(s.path) for s in specs if s is not None and s.path and Path(s.path).is_file()]
    for d in dirs:
        if d.is_dir():
            files += sorted(p for p in d.rglob("*") if p.is_file())
    seen: dict[str, Path] = {}
    for f in files:
        seen.setdefault(str(f), f)
    return list(seen.values())


def run_identity(cfg: Config) -> dict[str, Any]:
    """The flat identity of a run: resolved config minus NON_IDENTITY_KEYS, plus
    ``data_sha256.<path>: hexdigest`` for every local data file (:func:`data_files`) and
    ``forgetkit.numerics`` (:data:`NUMERICS_VERSION`).

    JSON-serialisable; compare two with :func:`identity_diff`, store :func:`identity_digest`.
    """
    flat: dict[str, Any] = {}
    _flatten(config_to_dict(cfg), "", flat)
    ident = {k: v for k, v in flat.items() if not _excluded(k, NON_IDENTITY_KEYS)}
    for f in data_files(cfg):
        ident[f"data_sha256.{f}"] = file_digest(f)
    ident[NUMERICS_KEY] = NUMERICS_VERSION
    return ident


def training_identity(cfg: Config, **runtime: Any) -> dict[str, Any]:
    """What a training checkpoint belongs to: :func:`run_identity` minus evaluation settings,
    plus ``runtime.<key>`` facts not in the config (e.g. ``world_size``: resuming with another
    number of processes changes the global batch and the per-rank states)."""
    ident = {k: v for k, v in run_identity(cfg).items() if not _excluded(k, TRAINING_ONLY_KEYS)}
    ident.update({f"runtime.{k}": v for k, v in runtime.items()})
    return ident


def identity_digest(identity: dict[str, Any]) -> str:
    """sha256 (hex) of the identity's canonical JSON (sorted keys)."""
    blob = json.dumps(identity, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def _show(v: Any) -> str:
    return "(absent)" if v is _ABSENT else json.dumps(v, default=str)


_ABSENT = object()


def identity_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The keys whose values differ, one ``"key: old -> new"`` line each, in key order.

    Values are JSON-encoded (``"training.lr: 0.001 -> 0.002"``, strings quoted); a key on one
    side only shows ``(absent)`` on the other.
    """
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, _ABSENT), new.get(k, _ABSENT)
        if a is _ABSENT or b is _ABSENT or json.dumps(a, default=str) != json.dumps(b, default=str):
            line = f"{k}: {_show(a)} -> {_show(b)}"
            if k == NUMERICS_KEY and b in NUMERICS_CHANGES:  # say what changed in forgetkit
                lo = a if isinstance(a, int) and a < b else b - 1
                what = "; ".join(f"{v}: {NUMERICS_CHANGES[v]}" for v in range(lo + 1, b + 1)
                                 if v in NUMERICS_CHANGES)
                line += f" (forgetkit's computation changed since: {what})"
            out.append(line)
    return out


def format_mismatch(what: str, diff: list[str], remedies: str, limit: int = 6) -> str:
    """One readable line: ``<what> differs from the requested config in N key(s): a; b; ...;
    <remedies>`` (at most ``limit`` keys shown, then "and K more")."""
    shown = "; ".join(diff[:limit]) + (f"; and {len(diff) - limit} more" if len(diff) > limit
                                       else "")
    n = len(diff)
    return (f"{what} differs from the requested config in {n} key{'s' if n != 1 else ''}: "
            f"{shown or '(identity digest only)'}. {remedies}")


def fisher_identity(cfg: Config, rc: Any) -> dict[str, Any]:
    """What an EWC regularizer's Fisher estimate depends on, apart from the weights it is taken
    at: the Fisher data (its spec and, for a local file, its contents), how many examples and
    which subset (the run's seed), the estimator and its draws, the batch size (the ``batched``
    estimator averages per batch), the parameter selection and the tokenisation settings.

    The one definition both users key with: the runner's shared Fisher cache file adds the base
    model's identity (``forgetkit.runner.share_fisher``), EWC's own per-run copy adds theta0's
    fingerprint (``forgetkit.regularizers.ewc``).

    Args:
        cfg: the run config.
        rc: one of its EWC regularizer configs.
    """
    spec = rc.fisher_data
    ident: dict[str, Any] = {
        "fisher_data": config_to_dict(spec) if spec is not None else None,
        "fisher_examples": rc.fisher_examples, "fisher_batch_size": rc.fisher_batch_size,
        "estimator": rc.estimator, "fisher_samples": rc.fisher_samples,
        "include": list(rc.include), "exclude": list(rc.exclude),
        "max_length": cfg.data.max_length, "train_on_prompt": cfg.data.train_on_prompt,
        "pad_to_multiple_of": cfg.data.pad_to_multiple_of, "seed": cfg.seed,
        # the precision the estimate runs in and the tokenisation of the Fisher data
        "model_dtype": cfg.model.dtype, "tokenizer": cfg.model.tokenizer,
        "numerics": NUMERICS_VERSION,
        # which parameters train (LoRA adapters have other names, frozen ones get no Fisher)
        "lora": config_to_dict(cfg.training.lora) if cfg.training.lora is not None else None,
        "freeze": config_to_dict(cfg.training.freeze),
    }
    if spec is not None and spec.path and Path(spec.path).is_file():
        ident["data_sha256"] = file_digest(Path(spec.path))
    return ident
