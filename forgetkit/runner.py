"""The experiment runner: arms x seeds -> evaluate before, train, evaluate after, summarise.

Stages per run, each reading the previous one's files:

1. ``eval_before.json``: the base model scored once per (base model, evaluation settings, data
   digests) and reused by every arm and seed that shares them (cache under ``_cache/``);
2. training in its own process (``python -m forgetkit.train`` or the configured launcher, e.g.
   torchrun), resuming from its newest checkpoint if an earlier attempt was killed;
3. ``eval_after.json``: the saved checkpoint scored in this (non-distributed) process, plus
   optional WiSE-FT interpolations;
4. ``summary.json`` (status ok / failed with the error line; the traceback goes to ``run.log``)
   and the experiment's ``summary.csv``.

Before any of it (:func:`check_plan`): preflight of every run (data, model, tasks, device,
launcher), whether each finished run still matches its requested config (``identity.json``),
and whether the results directory is free. While it runs, :func:`run_experiment` holds the
results directory's lock. A finished run is reused only while its identity matches; ``force``
sets it aside under ``_replaced/`` and deletes it only once the new run has succeeded.

Task sequences (``sequence:``, :func:`plan_runs`): every arm x seed becomes one run per stage,
``<root>/<arm>/seed-<s>/stage-<k>-<name>/``, run in stage order with the machinery above (each
stage is a run: identity, reuse, --force, lock, resume from its own checkpoints, failures).

* Stage ``k`` trains on its stage's ``data`` (``data.train``) with the arm's overrides, then the
  stage's; stage ``k >= 1`` starts from stage ``k-1``'s final ``model/`` (``model.name_or_path``)
  and is not started when stage ``k-1`` did not finish in this invocation (reported as failed).
* Identity: a stage's identity is its resolved config (stage ``k >= 1``'s
  ``model.name_or_path`` and the chained Fisher path named by role, never by path or mtime)
  plus ``sequence.stage.*`` and ``sequence.previous``, the digest of stage ``k-1``'s identity:
  a hash chain, so changing stage 0 invalidates every later stage. The stage's metric is not in
  it (it only picks a column of the matrix, recomputed from the stages' files).
* Before-scores: stage 0's are the cached base scores; stage ``k >= 1``'s are stage ``k-1``'s
  ``eval_after.json`` (copied, not re-evaluated; its WiSE-FT/merge points left out). WiSE-FT,
  merges and ``drift.json`` of stage ``k`` are relative to its own start (stage ``k-1``'s model).
* Files: a stage's ``checkpoints/`` is deleted when it finishes, its ``model/`` once the next
  stage of that arm x seed has finished (the last stage's at its end); with
  ``experiment.keep_checkpoints`` nothing is deleted. A stage to be trained whose finished
  predecessor's model was deleted is a failed check (rerun with --force).
* Regularizers: online EWC (``online_gamma``) at stage ``k >= 1`` estimates its new Fisher on
  ``fisher_examples`` examples of stage ``k-1``'s training data at stage ``k``'s start (stage
  ``k-1``'s end) and adds ``gamma`` times stage ``k-1``'s accumulated Fisher (that run's own copy
  ``fisher-<name>.safetensors``), Schwarz et al. 2018; stage 0 does what its config says. EWC
  without ``online_gamma`` does what its config says at every stage start (a ``fisher_path``
  file is read as is; otherwise the Fisher of ``fisher_data`` is estimated at the stage's start
  weights; stages after the first do not use the shared Fisher cache, whose key is the base
  model). L2-SP ``anchor: base`` at stage ``k >= 1`` reads theta0 from the base model's
  checkpoint (``anchor_path``, set when the stage starts).
* Replay: ``sequence.replay`` gives stage ``k >= 1`` a seeded buffer of ``buffer_per_stage``
  records of each earlier stage's data (``data.replay.sources``), pooled with the arm's own
  ``data.replay.data`` and mixed at ``sequence.replay.ratio``.
* Results: once every stage of an arm x seed has finished, ``<arm>/seed-<s>/sequence.json``
  (:func:`forgetkit.results.sequence.sequence_record`) and the root's ``sequence_matrix.csv``
  and ``sequence_summary.csv``; stage runs are not rows of ``summary.csv``.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import glob
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgetkit.config import (
    ArmSpec,
    Config,
    ConfigError,
    apply_overrides,
    check_complete,
    check_slug,
    config_from_dict,
    config_to_dict,
    dump_config,
    read_yaml,
)
from forgetkit.identity import NUMERICS_KEY, fill_added_keys
from forgetkit.results import (
    IDENTITY,
    RUN_LOG,
    SUMMARY,
    disk_full_line,
    environment,
    is_disk_full,
    is_finished,
    read_json,
    run_dir,
    write_json,
    write_text,
)

if TYPE_CHECKING:
    from forgetkit.preflight import Check

EVAL_SEED = 0
REPLACED = "_replaced"  # finished runs set aside by --force until their replacement succeeds
FAILED = "_failed"  # a --force attempt that failed, kept for its logs; the old run is restored

log = logging.getLogger("forgetkit")


@dataclass
class Stage:
    """Where a run stands in a task sequence."""

    index: int  # 0-based position in the sequence
    name: str
    count: int  # stages in the sequence
    metric: str  # the evaluation.task metric that scores this stage's task
    prev: RunSpec | None = field(default=None, repr=False)  # stage index-1 of this arm x seed

    @property
    def folder(self) -> str:
        return f"stage-{self.index}-{self.name}"

    def record(self) -> dict[str, Any]:
        """The ``stage`` field of the run's summary.json."""
        return {"index": self.index, "name": self.name, "count": self.count,
                "metric": self.metric}


@dataclass
class RunSpec:
    arm: str
    seed: int
    grid: dict[str, Any]
    cfg: Config
    dir: Path
    stage: Stage | None = None
    _identity: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        if self.stage is not None:
            return f"{self.arm} seed {self.seed} stage {self.stage.index}-{self.stage.name}"
        return f"{self.arm} seed {self.seed}"

    def identity(self) -> dict[str, Any]:
        """The run's identity (computed once: it hashes the data files); see
        :func:`identity_of` and, for a stage of a sequence, :func:`stage_identity`."""
        if self._identity is None:
            ident = identity_of(self.cfg)
            self._identity = stage_identity(self, ident) if self.stage is not None else ident
        return self._identity


PREVIOUS_MODEL = "(the final model of the previous stage)"
PREVIOUS_FISHER = "(the previous stage's accumulated Fisher)"
BASE_ANCHOR = "(the sequence's base model)"


def stage_identity(run: RunSpec, ident: dict[str, Any]) -> dict[str, Any]:
    """A stage's identity: ``ident`` (its resolved config's) with what points into the results
    tree named by role -- stage ``k >= 1``'s ``model.name_or_path`` (the previous stage's model
    directory: it need not exist yet, and its files' mtimes are not identity), the online-EWC
    chain's ``fisher_path``, L2-SP's base ``anchor_path`` -- plus ``sequence.stage.index`` /
    ``.name`` and ``sequence.previous``: the digest of the previous stage's identity (a hash
    chain: whatever changes a stage changes every later one)."""
    from forgetkit.identity import identity_digest

    st = run.stage
    assert st is not None
    out = dict(ident)
    out["sequence.stage.index"] = st.index
    out["sequence.stage.name"] = st.name
    if st.prev is not None:
        out["model.name_or_path"] = PREVIOUS_MODEL
        out["sequence.previous"] = identity_digest(st.prev.identity())
        for i, rc in enumerate(run.cfg.regularizers):
            if rc.type == "ewc" and rc.online_gamma is not None:
                out[f"regularizers.{i}.fisher_path"] = PREVIOUS_FISHER
            if rc.type == "l2" and rc.anchor == "base":
                out[f"regularizers.{i}.anchor_path"] = BASE_ANCHOR
    return out


def identity_of(cfg: Config) -> dict[str, Any]:
    """``forgetkit.identity.run_identity`` with the runner's shared Fisher cache file named by
    role, not path: the file's name hashes inputs the identity already holds (the Fisher data's
    digest and settings, ``model.*``) plus the results directory, which must not make a copied
    results tree look like another config."""
    from forgetkit.identity import run_identity

    ident = run_identity(cfg)
    for k, v in ident.items():
        if (k.endswith(".fisher_path") and isinstance(v, str)
                and Path(v).parent.name == "_cache" and Path(v).name.startswith("fisher-")):
            ident[k] = "(the experiment's shared Fisher cache)"
    return ident


class TrainingFailed(RuntimeError):
    """The training process exited non-zero; the message is its own one-line error."""


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C during a run: which run, and how to go on (the faces exit 130 with it)."""


# ----------------------------------------------------------------------------- paths

def results_root(base: Config) -> Path:
    return Path(base.experiment.results_dir.format(name=base.name))


def inside(path: Path, root: Path) -> Path:
    """``path`` resolved, if it lies strictly inside ``root``; else ConfigError.

    The second line of defence behind the config's name check: every path this module deletes
    or moves passes here first, so a name like ``../../victim`` never reaches rmtree or rename.
    """
    p, r = Path(path).resolve(), Path(root).resolve()
    if p == r or not p.is_relative_to(r):
        raise ConfigError(f"{path}: resolves to {p}, outside the results directory {r}; "
                          "refusing to write, move or delete it (check experiment and arm names)")
    return p


def _remove(path: Path, root: Path) -> None:
    """Delete a file or folder of the results tree (checked to lie inside ``root``)."""
    inside(path, root)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove empty folders from ``folder`` up to (not including) ``stop``."""
    while folder != stop and folder.is_relative_to(stop):
        try:
            folder.rmdir()
        except OSError:
            return
        folder = folder.parent


def _move(src: Path, dst: Path, root: Path) -> None:
    inside(src, root)
    inside(dst, root)
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.replace(src, dst)


def _clean_tmp(rdir: Path, root: Path) -> None:
    """Remove the temporary files (``*.tmp``) a failed attempt left in its run folder."""
    if not rdir.is_dir():
        return
    for p in sorted(rdir.rglob("*.tmp"), key=lambda q: len(q.parts), reverse=True):
        try:
            _remove(p, root)
        except OSError:
            pass


# ----------------------------------------------------------------------------- planning

def _leaf(key: str) -> str:
    parts = [p for p in key.split(".") if not p.isdigit()]
    return parts[-1] if parts else key


def _name_value(v: Any) -> str:
    """A grid value as part of a run folder's name: numbers and plain words as they are; a
    path its file name; anything else (lists, mappings, odd characters) with the characters
    outside letters, digits and ``._-=+`` replaced by ``_`` and, when that changed it, a short
    hash of the value, so two different values never share a name."""
    text = str(v)
    if isinstance(v, str) and ("/" in v or os.sep in v):
        text = Path(v).name or text
    safe = re.sub(r"[^A-Za-z0-9._=+-]", "_", text).strip(".") or "_"
    if safe != str(v):
        safe += "-" + hashlib.sha256(json.dumps(v, sort_keys=True, default=str).encode()
                                     ).hexdigest()[:6]
    return safe


def expand_arms(arms: list[ArmSpec]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(name, overrides, grid values) per arm; an arm with a grid becomes one arm per point."""
    out = []
    for arm in arms or [ArmSpec(name="default")]:
        if not arm.grid:
            out.append((arm.name, dict(arm.overrides), {}))
            continue
        keys = list(arm.grid)
        for values in itertools.product(*(arm.grid[k] for k in keys)):
            point = dict(zip(keys, values, strict=True))
            name = arm.name + "".join(f"@{_leaf(k)}={_name_value(v)}" for k, v in point.items())
            out.append((name, {**arm.overrides, **point}, point))
    return out


def plan_runs(raw: dict[str, Any], src: str, arms: list[str] | None = None,
              seeds: list[int] | None = None) -> tuple[Config, list[RunSpec]]:
    """Validate the experiment and every arm's resolved config; nothing is written.

    Raises ConfigError (file, arm, dotted key, did-you-mean) on any problem, including a run
    folder that would lie outside the results directory.

    With a ``sequence:`` section every arm x seed expands into one run per stage
    (:func:`plan_stages`; the base config is checked with stage 0's data as ``data.train``).
    """
    base = config_from_dict(_with_first_stage(raw), src)
    check_complete(base, src)
    opts = base.experiment
    expanded = expand_arms(opts.arms)
    names = [n for n, _, _ in expanded]
    for arm in opts.arms or []:  # what the user wrote; grid values are made safe above
        check_slug(arm.name, "experiment.arms", src)
    dup = {n for n in names if names.count(n) > 1}
    if dup or any(not n for n in names):
        raise ConfigError(f"{src}: experiment.arms: arm names must be unique and non-empty "
                          f"(duplicates: {sorted(dup)})")
    if arms:
        for a in arms:
            if a not in names:
                near = difflib.get_close_matches(a, names, n=1, cutoff=0.4)
                hint = f"; did you mean '{near[0]}'?" if near else f"; arms are {names}"
                raise ConfigError(f"--arms: unknown arm '{a}'{hint}")
        expanded = [e for e in expanded if e[0] in arms]
    seed_list = seeds if seeds else opts.seeds
    root = results_root(base)
    runs = []
    # Seed-major order: every arm's seed 0 first, so an interrupted experiment still has
    # comparable arms.
    for seed, (name, overrides, point) in itertools.product(seed_list, expanded):
        d = run_dir(root, name, seed)
        try:
            inside(d, root)
        except ConfigError as e:
            raise ConfigError(f"{src}: experiment.arms: arm '{name}': {e}") from None
        r = copy.deepcopy(raw)
        try:
            apply_overrides(r, overrides)
        except ConfigError as e:
            raise ConfigError(f"{src} (arm '{name}'): {e}") from None
        r["seed"] = seed
        if base.sequence is not None:
            runs += plan_stages(r, f"{src} (arm '{name}')", name, seed, point, d, root)
            continue
        r.setdefault("output", {})
        r["output"] = {**(r["output"] or {}), "dir": str(d), "save_model": True}
        cfg = config_from_dict(r, f"{src} (arm '{name}')")
        share_fisher(cfg, root)
        runs.append(RunSpec(name, seed, point, cfg, d))
    return base, runs


def _with_first_stage(raw: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``raw``; with a sequence, stage 0's data as ``data.train`` (a sequence's
    config need not have one of its own: each stage's ``data`` is its ``data.train``)."""
    r = copy.deepcopy(raw)
    seq = r.get("sequence")
    stages = seq.get("stages") if isinstance(seq, dict) else None
    if isinstance(stages, list) and stages and isinstance(stages[0], dict) \
            and "data" in stages[0] and isinstance(r.get("data", {}), dict):
        r["data"] = {**(r.get("data") or {}), "train": copy.deepcopy(stages[0]["data"])}
    return r


def plan_stages(r: dict[str, Any], src: str, arm: str, seed: int, point: dict[str, Any],
                d: Path, root: Path) -> list[RunSpec]:
    """The runs of one arm x seed of a task sequence, in stage order (see the module
    docstring): ``r`` is the arm's raw config (its overrides and seed applied), ``d`` its
    ``<arm>/seed-<s>`` folder.

    Raises:
        ConfigError: a stage's resolved config is invalid (the message names the stage), or the
            arm's ``data.replay.ratio`` disagrees with ``sequence.replay.ratio``.
    """
    from forgetkit.regularizers.build import regularizer_names

    seq = config_from_dict(_with_first_stage(r), src).sequence
    assert seq is not None
    runs: list[RunSpec] = []
    for k, st in enumerate(seq.stages):
        where = f"{src}, sequence stage {k} ('{st.name}')"
        rs = copy.deepcopy(r)
        rs.pop("sequence", None)
        rs["data"] = {**(rs.get("data") or {}), "train": config_to_dict(st.data)}
        try:
            apply_overrides(rs, st.overrides)
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None
        sd = d / f"stage-{k}-{st.name}"
        inside(sd, root)
        rs["output"] = {**(rs.get("output") or {}), "dir": str(sd), "save_model": True}
        prev = runs[-1] if runs else None
        if prev is not None:
            # the previous stage's final model is this stage's start (its tokenizer saved there
            # too, unless the config names one)
            rs["model"] = {**(rs.get("model") or {}), "name_or_path": str(prev.dir / "model"),
                           "random_init": None, "gguf_file": None, "revision": None}
            if seq.replay is not None:
                _add_stage_replay(rs, [x.cfg.data.train for x in runs], seq.replay, where)
        cfg = config_from_dict(rs, where)
        check_complete(cfg, where)
        if prev is None:
            share_fisher(cfg, root)
        else:
            names, prev_names = regularizer_names(cfg), regularizer_names(prev.cfg)
            for i, rc in enumerate(cfg.regularizers):
                if rc.type != "ewc" or rc.online_gamma is None:
                    continue
                j = prev_names.index(names[i]) if names[i] in prev_names else None
                if j is None or prev.cfg.regularizers[j].type != "ewc":
                    raise ConfigError(f"{where}: regularizers[{i}]: online EWC continues the "
                                      f"previous stage's Fisher chain, but that stage has no "
                                      f"EWC regularizer named {names[i]!r}")
                # F_k = gamma * F_{k-1} (the previous stage's accumulated Fisher, its own copy)
                # + the Fisher of the previous stage's data at this stage's start
                rc.fisher_data = copy.deepcopy(prev.cfg.data.train)
                rc.fisher_path = str(prev.dir / f"fisher-{names[i]}.safetensors")
        runs.append(RunSpec(arm, seed, point, cfg, sd,
                            stage=Stage(k, st.name, len(seq.stages), st.metric, prev)))
    return runs


def _add_stage_replay(rs: dict[str, Any], earlier: list[Any], replay: Any, where: str) -> None:
    """Give a stage's raw config the sequence's replay: a buffer of each earlier stage's
    training data (``earlier``: their resolved ``data.train``) as ``data.replay.sources``,
    pooled with the arm's own ``data.replay.data``, at ``sequence.replay.ratio``."""
    data = rs.setdefault("data", {})
    own = data.get("replay")
    own = dict(own) if isinstance(own, dict) else {}
    if "ratio" in own and own["ratio"] is not None and float(own["ratio"]) != replay.ratio:
        raise ConfigError(f"{where}: data.replay.ratio {own['ratio']} and sequence.replay.ratio "
                          f"{replay.ratio} disagree: a sequence's replay pool (earlier stages "
                          "and data.replay.data) is mixed at one ratio; set them equal")
    own["ratio"] = replay.ratio
    own["sources"] = list(own.get("sources") or []) + [
        {"data": config_to_dict(spec), "examples": replay.buffer_per_stage} for spec in earlier]
    data["replay"] = own


# ----------------------------------------------------------------------------- checks

def saved_identity(rdir: Path) -> dict[str, Any]:
    """The identity a run folder was computed with: its ``identity.json``, or, for a run
    finished before identities were saved, recomputed from its ``config.yaml`` (the data
    digests are then today's files': such a run is checked on its config keys only).

    Raises ConfigError when neither can be read (such a run is never silently reused).
    """
    p = rdir / IDENTITY
    if p.is_file():
        try:
            ident = read_json(p)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{p}: unreadable ({e})") from None
        if not isinstance(ident, dict):
            raise ConfigError(f"{p}: not a JSON object")
        ident.setdefault(NUMERICS_KEY, 1)  # saved before forgetkit's numerics were versioned
        fill_added_keys(ident)  # schema keys added since, at the defaults such a run had
        c = rdir / "config.yaml"
        if not any(k == "data.replay" or k.startswith("data.replay.") for k in ident) \
                and c.is_file():
            # Saved before regularizers had one config class per type (and replay moved to
            # data.replay): re-derive the config keys from config.yaml in today's spelling,
            # keep the saved data digests and numerics version.
            fresh = _identity_from_config_file(c)
            return {**{k: v for k, v in fresh.items()
                       if not k.startswith("data_sha256.") and k != NUMERICS_KEY},
                    **{k: v for k, v in ident.items()
                       if k.startswith("data_sha256.") or k == NUMERICS_KEY}}
        return ident
    c = rdir / "config.yaml"
    if not c.is_file():
        raise ConfigError(f"{rdir}: neither {IDENTITY} nor config.yaml says which config it ran")
    # A run this old predates versioned numerics: version 1 (today's code would compute
    # something else for its config, so it is not reused as today's run).
    return {**_identity_from_config_file(c), NUMERICS_KEY: 1}


def _identity_from_config_file(c: Path) -> dict[str, Any]:
    """:func:`identity_of` the config a run folder's ``config.yaml`` holds."""
    raw = read_yaml(c)
    # Keys outside the identity are dropped before validation: a key since removed from the
    # schema (output.overwrite) or an old arm list must not make an old run unreadable.
    raw.pop("output", None)
    if isinstance(raw.get("experiment"), dict):
        raw["experiment"].pop("arms", None)
    return identity_of(config_from_dict(raw, str(c)))


def _has_checkpoints(rdir: Path) -> bool:
    return any((rdir / "checkpoints").glob("step-*"))


REMEDIES = ("Rerun with --force to replace it (the old run is kept until the new one has "
            "succeeded), or set a new experiment.results_dir to keep both.")


def reuse_checks(runs: list[RunSpec], force: bool = False) -> list[Check]:
    """What happens to each run folder that already exists, checked before anything is done.

    * finished, same identity: reused (skipped);
    * finished, identity differs: a problem naming the changed keys, unless ``force``;
    * unfinished with checkpoints of another identity: a problem (training would resume them);
    * ``force``: the finished run is set aside and deleted only once its replacement succeeded.
    """
    from forgetkit.identity import format_mismatch, identity_diff
    from forgetkit.preflight import Check

    out = []
    for run in runs:
        what = f"run {run.label} ({run.dir})"
        prev = run.stage.prev if run.stage is not None else None
        if (prev is not None and not force and is_finished(prev.dir)
                and not is_finished(run.dir)
                and not (prev.dir / "model" / "config.json").is_file()):
            out.append(Check(what, False, (
                f"{what}: its start, the final model of the finished {prev.label}, was deleted "
                f"({prev.dir / 'model'}; experiment.keep_checkpoints is false); rerun with "
                "--force to recompute the sequence")))
            continue
        if not run.dir.exists():
            continue
        finished = is_finished(run.dir)
        if force:
            out.append(Check(f"{what}: {'finished; ' if finished else ''}recomputed (--force; "
                             "the old folder is set aside until the new run succeeds)", True))
            continue
        if not finished and not _has_checkpoints(run.dir):
            out.append(Check(f"{what}: unfinished, starts again", True))
            continue
        try:
            old = saved_identity(run.dir)
        except ConfigError as e:
            out.append(Check(what, False, f"{what}: cannot tell which config it ran: {e}. "
                                          + REMEDIES))
            continue
        diff = identity_diff(old, run.identity())
        if not diff:
            out.append(Check(f"{what}: {'finished, reused' if finished else 'resumes'} "
                             "(same config and data)", True))
        elif finished:
            out.append(Check(what, False, format_mismatch(f"the finished run {run.dir}", diff,
                                                          REMEDIES)))
        else:
            out.append(Check(what, False, format_mismatch(
                f"the unfinished run {run.dir} (whose checkpoints training would resume)", diff,
                REMEDIES)))
    return out


def lock_check(root: Path) -> Check:
    """Whether another forgetkit process holds the results directory (nothing is created)."""
    from forgetkit.locking import LOCK_NAME, LockHeld, dir_lock
    from forgetkit.preflight import Check

    if not (root / LOCK_NAME).exists():
        return Check(f"results directory {root}: free", True)
    try:
        with dir_lock(root, "results directory"):
            pass
    except LockHeld as e:
        return Check("results directory lock", False, str(e))
    return Check(f"results directory {root}: free", True)


def preflight_checks(runs: list[RunSpec]) -> list[Check]:
    """Preflight of every planned run (one shared cache: a file or task checked once)."""
    import dataclasses

    from forgetkit.preflight import preflight

    cache: dict[Any, Any] = {}
    seen: set[tuple[str, bool, str]] = set()
    out = []
    for run in runs:
        cfg = run.cfg
        if run.stage is not None and run.stage.prev is not None:
            # its start (the previous stage's model) does not exist yet: check the base
            # model it descends from (the same architecture and tokenizer)
            cfg = dataclasses.replace(cfg, model=_sequence_root(run).cfg.model)
        for c in preflight(cfg, evaluation=True, cache=cache):
            if (c.what, c.ok, c.problem) not in seen:
                seen.add((c.what, c.ok, c.problem))
                out.append(c)
    return out


def analysis_checks(base: Config, runs: list[RunSpec]) -> list[Check]:
    """``analysis.reference_arm`` names a planned arm that is scored along WiSE-FT's line (else
    the matched-gain columns would silently be missing); ``analysis.baseline_arm``, when it is
    not among the arms, only means no paired differences (said, not an error)."""
    import difflib

    from forgetkit.preflight import Check

    arms = list(dict.fromkeys(r.arm for r in runs))
    declared = [name for name, _, _ in expand_arms(base.experiment.arms)] or arms
    out: list[Check] = []
    ref = base.analysis.reference_arm
    if ref is not None:
        if ref not in arms and ref in declared:  # left out by --arms (e.g. make demo)
            out.append(Check(f"analysis.reference_arm: {ref} is not run here (--arms): no "
                             "matched-gain columns", True))
        elif ref not in arms:
            near = difflib.get_close_matches(ref, declared, n=1)
            out.append(Check("analysis.reference_arm", False,
                             f"analysis.reference_arm: {ref!r} is not an arm of this experiment "
                             f"(arms: {', '.join(declared)})"
                             + (f"; did you mean {near[0]!r}?" if near else "")))
        elif not next(r for r in runs if r.arm == ref).cfg.evaluation.wise_alphas:
            out.append(Check("analysis.reference_arm", False,
                             f"analysis.reference_arm: arm {ref!r} has no evaluation.wise_alphas: "
                             "its WiSE-FT curve (the matched-gain reference) would have no "
                             "points; give the arm e.g. evaluation.wise_alphas: [0.5]"))
        else:
            out.append(Check(f"analysis.reference_arm: {ref} (WiSE-FT curve)", True))
    b = base.analysis.baseline_arm
    if b is not None and len(arms) > 1:
        out.append(Check(f"analysis.baseline_arm: {b}" + ("" if b in arms else
                         " is not among the arms: no paired differences (vs_*) in the tables"),
                         True))
    return out


def check_plan(base: Config, runs: list[RunSpec], force: bool = False) -> list[Check]:
    """Everything verified before anything is evaluated, trained, moved or deleted: preflight
    of every run, the analysis settings, what happens to existing run folders, and the results
    directory's lock."""
    return (preflight_checks(runs) + analysis_checks(base, runs) + reuse_checks(runs, force)
            + [lock_check(results_root(base))])


def show_plan(plan: str, checks: list[Check], src: str, dry_run: bool) -> bool:
    """What the command-line faces (forgetkit.run, forgetkit.evaluate) do before acting: print
    the plan (and, on a dry run, every check), raise ConfigError on a failed check; True on a
    dry run (the caller stops there)."""
    from forgetkit.preflight import raise_on_problems

    print(plan, file=sys.stderr)
    if dry_run:
        print("checks:\n" + format_checks(checks), file=sys.stderr)
    raise_on_problems(checks, src)
    return dry_run


def format_checks(checks: list[Check]) -> str:
    """One line per distinct check (runs that share an input report it once)."""
    lines = [f"  {'✓' if c.ok else '✗'} {c.what if c.ok else c.problem or c.what}"
             for c in checks]
    return "\n".join(dict.fromkeys(lines))


# ----------------------------------------------------------------------------- base model

def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _file_digest(path: Path) -> str:
    """sha256 of a file, memoised on (path, size, mtime): cache keys hash data contents."""
    from forgetkit.identity import file_digest

    return file_digest(path)


def _data_digests(specs: list[Any], dirs: list[str | None] = ()) -> dict[str, str]:
    """Contents of the local data files (and task directories) a cached result was built from:
    editing one in place must not reuse the old result."""
    out = {}
    for s in specs:
        if s is not None and s.path and Path(s.path).is_file():
            out[s.path] = _file_digest(Path(s.path))
    for d in dirs:
        if d and Path(d).is_dir():
            for p in sorted(Path(d).rglob("*")):
                if p.is_file():
                    out[str(p)] = _file_digest(p)
    return out


def base_model_identity(cfg: Config) -> dict[str, Any]:
    """What the base model's weights depend on: ``model.*`` (minus training-time options) and,
    for a local model folder or file, each file's name, size and mtime (weights are gigabytes:
    not hashed, but a model replaced in place changes the key)."""
    m = config_to_dict(cfg.model)
    for k in ("gradient_checkpointing", "attn_implementation"):
        m.pop(k, None)  # training-time options: same weights
    p = Path(m["name_or_path"]) if m.get("name_or_path") else None
    if p is not None and p.exists():
        files = [p] if p.is_file() else sorted(f for f in p.iterdir() if f.is_file())
        m["files"] = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return m


def share_fisher(cfg: Config, root: Path) -> None:
    """Point every EWC regularizer without a ``fisher_path`` at a shared cache file.

    The file name hashes everything the estimate depends on (base model, Fisher data settings
    and file contents, max length, prompt masking, seed), so arms that differ only in lambda (a
    sweep) or in other regularizers estimate the Fisher once and reuse it. Online EWC keeps its
    own chain.
    """
    from forgetkit.identity import fisher_identity

    for rc in cfg.regularizers:
        if rc.type != "ewc" or rc.fisher_path or rc.online_gamma is not None:
            continue
        key = _hash({"model": base_model_identity(cfg), "fisher": fisher_identity(cfg, rc)})
        rc.fisher_path = str(root / "_cache" / f"fisher-{key}.safetensors")


def base_checkpoint(cfg: Config, root: Path) -> str:
    """A path (or hub id) of the base model that evaluation can load.

    Random-init and GGUF models are materialised once as an HF checkpoint under ``_base/``.
    """
    from forgetkit.models import resolve_model_path

    m = cfg.model
    if m.random_init is None and m.gguf_file is None:
        path, gguf = resolve_model_path(m.name_or_path)  # aliases convert and cache themselves
        if gguf is None:
            return path
    out = root / "_base" / _hash(base_model_identity(cfg))
    if (out / "config.json").exists():
        return str(out)
    from forgetkit.models import load_model, save_hf_checkpoint

    log.info("materialising the base model as an HF checkpoint in %s", out)
    model, tok = load_model(m)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(inside(tmp, root), ignore_errors=True)
    save_hf_checkpoint(model, tok, tmp)
    os.replace(tmp, out)
    return str(out)


def eval_cache_key(cfg: Config) -> str:
    """Key of the cached before-scores: base model, evaluation settings (WiSE-FT points are
    after-only), the evaluation seed and the contents of every evaluation data file and task
    directory."""
    ev = config_to_dict(cfg.evaluation)
    ev.pop("wise_alphas", None)
    ev.pop("merge", None)  # merges are scored after training only
    specs = list(cfg.evaluation.task) + list(cfg.evaluation.general)
    return _hash({"model": base_model_identity(cfg), "evaluation": ev, "seed": EVAL_SEED,
                  "data": _data_digests([s.data for s in specs],
                                        [s.include_path for s in specs]),
                  "format": 4})  # 3: per-item scores (``items``); 4: SharedContextHFLM


# ----------------------------------------------------------------------------- stages

def evaluate(model_dir: str | Path, cfg: Config) -> dict[str, Any]:
    """Score a saved checkpoint on the task and general metrics of ``cfg.evaluation``."""
    from forgetkit.eval.harness import evaluate_checkpoint

    ev = cfg.evaluation
    specs = list(ev.task) + list(ev.general)
    if not specs:
        return {"task": {}, "general": {}}
    # A fixed evaluation seed (not the run's): every arm and seed is scored on the same items,
    # so the cached before-scores pair with every after-score.
    scores = evaluate_checkpoint(str(model_dir), specs, batch_size=ev.batch_size,
                                 device=ev.device, seed=EVAL_SEED)
    return {"task": {s.name: scores[s.name] for s in ev.task},
            "general": {s.name: scores[s.name] for s in ev.general}}


def before_scores(cfg: Config, root: Path) -> tuple[dict[str, Any], bool]:
    """(scores, cache hit). Computed once per base model + evaluation settings + data."""
    key = eval_cache_key(cfg)
    path = root / "_cache" / f"eval_before-{key}.json"
    if path.exists():
        return read_json(path), True
    base = base_checkpoint(cfg, root)
    t0 = time.perf_counter()
    scores = evaluate(base, cfg)
    scores["model"] = base
    scores["seconds"] = time.perf_counter() - t0
    write_json(path, scores)
    return scores, False


_CHILD_ERROR = re.compile(r"(?:^|[^\w.\[-])forgetkit: (.+)")


def _end_line(last: bytes) -> None:
    """End the training process's last stderr line (a progress bar has no newline), so the
    runner's own message starts a line of its own."""
    if last and not last.endswith((b"\n", b"\r")):
        sys.stderr.buffer.write(b"\n")
    sys.stderr.flush()


def _log_tail(path: Path, size: int = 1 << 16) -> str:
    """The last ``size`` bytes of a log file, decoded."""
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return f.read().decode(errors="replace")


def _child_error(text: str) -> str:
    """The training process's own error: the text of its last ``forgetkit: ...`` line (the
    faces print one line per user error or fault; a progress bar may precede it on the same
    line), else its last non-empty line (e.g. a bug's exception)."""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = list(_CHILD_ERROR.finditer(ln))
        if m:
            return m[-1].group(1).strip()
    return lines[-1] if lines else "no output"


STOP_GRACE_S = 30.0  # a training process gets this long to stop by itself after an interrupt


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM (a scheduler's stop) handled like Ctrl-C while a training stage runs."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_group(proc: subprocess.Popen) -> bytes:
    """Interrupt the training process group, give it STOP_GRACE_S to stop by itself (it says
    at which step and leaves its checkpoints intact), kill the group if it does not or if a
    second interrupt arrives; return its remaining output once the process is gone."""
    _signal_group(proc.pid, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    out = b""
    while True:
        try:
            out += proc.communicate(timeout=max(0.1, deadline - time.monotonic()))[0] or b""
            return out
        except subprocess.TimeoutExpired:
            _signal_group(proc.pid, signal.SIGKILL)
            deadline = time.monotonic() + STOP_GRACE_S
        except KeyboardInterrupt:  # a second Ctrl-C: stop now, but never leave it running
            _signal_group(proc.pid, signal.SIGKILL)


def train_stage(run: RunSpec, launcher: list[str]) -> dict[str, Any]:
    """Run the training stage in its own process; return its train_result.json.

    Raises:
        TrainingFailed: the process exited non-zero (message: its own one-line error).
        RunInterrupted: Ctrl-C or SIGTERM (forwarded to the training process group, which
            stops by itself within STOP_GRACE_S or is killed).
    """
    cfg_path = run.dir / "config.yaml"
    cmd = (launcher or [sys.executable]) + ["-m", "forgetkit.train", str(cfg_path)]
    log.info("training: %s", " ".join(cmd))
    env = dict(os.environ)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Its own process group (session): the runner decides when training stops. A Ctrl-C, or a
    # SIGINT/SIGTERM sent to the runner alone (a scheduler), is forwarded to the whole group
    # (a launcher's workers included), and the runner returns only once they are gone, so no
    # orphaned trainer can write into a run folder that --force has put back meanwhile.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)
    tail: deque[bytes] = deque(maxlen=64)
    assert proc.stdout is not None
    with (run.dir / "train_output.log").open("ab") as fh, _sigterm_as_interrupt():
        try:
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):  # type: ignore[union-attr]
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
                fh.write(chunk)
                tail.append(chunk)
            rc = proc.wait()
            _end_line(tail[-1] if tail else b"\n")
        except KeyboardInterrupt:
            rest = _stop_group(proc)
            fh.write(rest)
            fh.flush()
            _end_line(tail[-1] if tail else b"\n")  # what was shown ends its line
            # The log file, not the in-memory tail: the interrupt can land between writing a
            # chunk to the file and keeping it in the tail (the child's own line then lived
            # only in the file, and a progress bar was shown as the reason).
            raise RunInterrupted(_child_error(_log_tail(run.dir / "train_output.log"))) from None
        finally:
            _signal_group(proc.pid, signal.SIGKILL)  # what may be left of the group
    text = b"".join(tail).decode(errors="replace")
    if rc in (130, -signal.SIGINT):
        raise RunInterrupted(_child_error(text))
    if rc != 0:
        raise TrainingFailed(f"{_child_error(text)} (training exited with status {rc}; full "
                             f"output in {run.dir / 'train_output.log'})")
    return read_json(run.dir / "train_result.json")


def wise_scores(run: RunSpec, base: str, alphas: list[float]) -> dict[str, Any]:
    """WiSE-FT: score θ0 + α(θ* − θ0) for each α without retraining (``after.wise.<α>``).

    The checkpoint of each α is the layerwise merge with ``alpha_bottom = alpha_top = α``:
    bit for bit :func:`forgetkit.regularizers.wise.interpolate_state_dicts` (the same float32
    ``torch.lerp``), written under the stored key names."""
    from forgetkit.regularizers.merge import write_layerwise_checkpoint

    out: dict[str, Any] = {}
    for a in alphas:
        d = run.dir / f"wise-{a}"
        try:
            write_layerwise_checkpoint(base, run.dir / "model", a, a, d)
            out[str(a)] = evaluate(d, run.cfg)
        finally:
            shutil.rmtree(inside(d, run.dir.parent.parent), ignore_errors=True)
    return out


def merge_scores(run: RunSpec, base: str) -> dict[str, Any]:
    """Score each ``evaluation.merge`` entry without retraining: ``{name: evaluate(...)}``
    (stored as ``after.merge``, beside ``after.wise``). ``run`` in a task-vector merge's
    checkpoints is this run's fine-tuned model; the merged checkpoint is deleted once scored."""
    from forgetkit.config import MergeSpec
    from forgetkit.regularizers.merge import (
        write_layerwise_checkpoint,
        write_task_vector_checkpoint,
    )

    out: dict[str, Any] = {}
    for m in run.cfg.evaluation.merge:
        d = run.dir / f"merge-{m.name}"
        try:
            if m.kind == "layerwise":
                assert m.alpha_bottom is not None and m.alpha_top is not None  # config-checked
                write_layerwise_checkpoint(base, run.dir / "model", m.alpha_bottom, m.alpha_top,
                                           d)
            else:
                dirs = [run.dir / "model" if c == MergeSpec.RUN else Path(c)
                        for c in m.checkpoints]
                write_task_vector_checkpoint(base, dirs, m.scales, d)
            out[m.name] = evaluate(d, run.cfg)
        finally:
            shutil.rmtree(inside(d, run.dir.parent.parent), ignore_errors=True)
    return out


def _weights(model_dir: str | Path) -> dict[str, Any] | None:
    """Every tensor of a local safetensors checkpoint (all shards); None for a hub id."""
    from safetensors.torch import load_file

    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return None
    out: dict[str, Any] = {}
    for f in files:
        out.update(load_file(str(f)))
    return out


def layer_summaries(run: RunSpec, base: str) -> None:
    """Small per-layer files for the report: ``drift.json`` (relative drift ||θ−θ0||/||θ0|| of
    each layer) and, for EWC runs, ``fisher_summary.json`` (Fisher magnitude per layer)."""
    from forgetkit.drift import drift_record, fisher_record

    theta0, theta = _weights(base), _weights(run.dir / "model")
    if theta0 is not None and theta is not None:
        write_json(run.dir / "drift.json", drift_record(theta0, theta))
    del theta0, theta
    from forgetkit.regularizers.build import regularizer_names

    for rc, name in zip(run.cfg.regularizers, regularizer_names(run.cfg), strict=True):
        if rc.type != "ewc":
            continue
        # the Fisher the run used: its own copy (online EWC: the accumulated one), else the
        # file it read
        own = run.dir / f"fisher-{name}.safetensors"
        path = own if own.exists() else Path(rc.fisher_path) if rc.fisher_path else None
        if path is not None and path.exists():
            from forgetkit.regularizers.fisher import load_fisher

            write_json(run.dir / "fisher_summary.json", fisher_record(load_fisher(path)[0]))
            break


def train_warnings(train: dict[str, Any]) -> list[str]:
    """Warnings a finished training reports about itself: a collapsed run (gradient norm
    exactly 0, or the loss constant, for many steps: the weights stopped learning) is kept in
    the summary and the end message, never hidden behind a success."""
    if not train.get("collapsed"):
        return []
    c = train.get("collapse") or {}
    where = (f"{c.get('reason', 'no learning')}, steps {c.get('from_step', '?')}-"
             f"{c.get('to_step', '?')}")
    return [f"training collapsed ({where}): its after-scores are those of a model that "
            "stopped learning; check training.lr, the data's target tokens and the regularizers"]


def without_items(scores: Any) -> Any:
    """A copy of an evaluation tree without the per-item scores (``items``): summary.json stays
    small; the items stay in eval_before.json / eval_after.json beside it."""
    if isinstance(scores, dict):
        return {k: without_items(v) for k, v in scores.items() if k != "items"}
    return scores


def _sequence_root(run: RunSpec) -> RunSpec:
    """Stage 0 of a stage's sequence (the run itself when it is no stage, or stage 0)."""
    while run.stage is not None and run.stage.prev is not None:
        run = run.stage.prev
    return run


def _local_checkpoint(path: str, revision: str | None = None) -> str:
    """A local directory of a checkpoint: ``path`` itself, or a hub id's snapshot in the local
    Hugging Face cache (no download). Raises ConfigError when there is none."""
    if Path(path).exists():
        return path
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(path, revision=revision, local_files_only=True,
                                 allow_patterns=["*.safetensors", "*.json"])
    except Exception as e:
        raise ConfigError(f"L2-SP anchor: 'base' needs the base model's weights as a local "
                          f"safetensors checkpoint; {path!r} is neither a directory nor in the "
                          f"local Hugging Face cache ({type(e).__name__})") from None


def resolve_stage_inputs(run: RunSpec, root: Path) -> None:
    """What a stage's config can name only once it starts (in place, before its config.yaml
    is written): L2-SP ``anchor: base`` at stage ``k >= 1`` gets ``anchor_path``, the base
    model's checkpoint (:func:`base_checkpoint` of stage 0's config; a random-init or GGUF base
    is materialised once under ``_base/``). Stage 0 and single runs anchor at their start."""
    if run.stage is None or run.stage.prev is None:
        return
    first = _sequence_root(run)
    for rc in run.cfg.regularizers:
        if rc.type == "l2" and rc.anchor == "base":
            rc.anchor_path = _local_checkpoint(base_checkpoint(first.cfg, root),
                                               first.cfg.model.revision)


def stage_before(run: RunSpec) -> dict[str, Any]:
    """Stage ``k >= 1``'s before-scores: stage ``k-1``'s after-scores (its ``eval_after.json``,
    per-item scores included, WiSE-FT/merge points left out), not re-evaluated; ``model`` names
    this stage's start (stage ``k-1``'s final model)."""
    assert run.stage is not None and run.stage.prev is not None
    prev = run.stage.prev
    after = read_json(prev.dir / "eval_after.json")
    out = {k: v for k, v in after.items() if k not in ("wise", "merge", "seconds")}
    out["model"] = str(prev.dir / "model")
    out["source"] = f"after {prev.label} ({prev.dir / 'eval_after.json'})"
    return out


STARTED_FROM = "started_from.json"


def _instance(rdir: Path) -> str | None:
    """The instance id of a finished run (``summary.json``'s ``instance``: a new id each time
    the run is trained; None for runs finished before ids were recorded)."""
    p = rdir / SUMMARY
    return read_json(p).get("instance") if p.is_file() else None


def stage_descends(run: RunSpec) -> bool:
    """Whether the finished stage ``run`` was trained from its previous stage's *present*
    result: a stage's identity is its config (and its predecessor's config), so a predecessor
    trained again since (``--force``, a deleted folder) leaves the identity equal while the
    weights it started from are gone; the stage then records another ``started_from`` than the
    predecessor's ``instance``. Runs from before instance ids (neither side has one) count as
    descended (nothing can tell)."""
    st = run.stage
    if st is None or st.prev is None:
        return True
    mine = read_json(run.dir / SUMMARY).get("started_from")
    theirs = _instance(st.prev.dir)
    return mine == theirs


def _check_started_from(run: RunSpec) -> str | None:
    """The previous stage's instance this stage trains from, recorded in ``started_from.json``
    before anything else; a stage with checkpoints of training from another instance is
    refused (resuming would continue weights that descend from a result since replaced)."""
    st = run.stage
    if st is None or st.prev is None:
        return None
    want = _instance(st.prev.dir)
    p = run.dir / STARTED_FROM
    if p.is_file() and (run.dir / "checkpoints").is_dir():
        had = read_json(p).get("instance")
        if had != want:
            raise ConfigError(
                f"{run.dir}: its checkpoints were trained from another result of "
                f"{st.prev.label} (instance {had}, now {want}); rerun with --force to train "
                "this stage again from the present one")
    write_json(p, {"previous": str(st.prev.dir), "instance": want})
    for i, rc in enumerate(run.cfg.regularizers):  # the online-EWC chain needs F_{k-1}
        if rc.type == "ewc" and rc.online_gamma is not None and rc.fisher_path \
                and not Path(rc.fisher_path).is_file():
            raise ConfigError(
                f"{run.label}: regularizers[{i}] (online EWC) continues the Fisher of "
                f"{st.prev.label}, but {rc.fisher_path} is missing (deleted?); without it "
                f"F_k would be the new estimate alone. Rerun {st.prev.label} with --force")
    return want


def run_memory_line(estimate: dict[str, Any], measured: dict[str, Any]) -> str:
    """The training's memory line (:func:`forgetkit.memory.memory_line`: what each number
    covers; on CPU the whole-process RSS is labelled as no estimate check) from the saved
    ``train_result.json`` entries; a bare one if they cannot be read back."""
    from forgetkit.memory import MemoryEstimate, memory_line

    try:
        return memory_line(MemoryEstimate.from_dict(estimate), measured)
    except (TypeError, KeyError, ValueError) as e:
        return (f"memory: estimated training peak {estimate.get('total_bytes', 0) / 2**30:.2f}"
                f" GiB per device (the measured figures could not be read back: {e})")


def run_one(run: RunSpec, root: Path, launcher: list[str]) -> dict[str, Any]:
    run.dir.mkdir(parents=True, exist_ok=True)
    started_from = _check_started_from(run)
    resolve_stage_inputs(run, root)
    write_text(run.dir / "config.yaml", dump_config(run.cfg))
    write_json(run.dir / IDENTITY, run.identity())
    write_json(run.dir / "env.json", environment())
    t0 = time.perf_counter()
    if run.stage is not None and run.stage.prev is not None:
        before, hit = stage_before(run), False
        log.info("before-scores: the previous stage's after-scores")
    else:
        before, hit = before_scores(run.cfg, root)
        log.info("before-evaluation %s", "reused from the cache" if hit else "computed")
    write_json(run.dir / "eval_before.json", before)
    train = train_stage(run, launcher)
    if train.get("memory_estimate") and train.get("memory"):
        log.info("%s", run_memory_line(train["memory_estimate"], train["memory"]))
    base = before.get("model") or base_checkpoint(run.cfg, root)
    layer_summaries(run, base)
    t1 = time.perf_counter()
    after = evaluate(run.dir / "model", run.cfg)
    after["seconds"] = time.perf_counter() - t1
    if run.cfg.evaluation.wise_alphas:
        after["wise"] = wise_scores(run, base, run.cfg.evaluation.wise_alphas)
    if run.cfg.evaluation.merge:
        after["merge"] = merge_scores(run, base)
    write_json(run.dir / "eval_after.json", after)
    rp = run.cfg.data.replay
    replay_specs = ([] if rp is None else
                    ([rp.data] if rp.data is not None else []) + [x.data for x in rp.sources])
    sources = {"train": run.cfg.data.train.path or run.cfg.data.train.name,
               "replay": [x.path or x.name for x in replay_specs],
               "fisher": [(r.fisher_data.path or r.fisher_data.name) if r.fisher_data else None
                          for r in run.cfg.regularizers if r.type == "ewc"]}
    out = {"status": "ok", "arm": run.arm, "seed": run.seed, "grid": run.grid,
           "before_cache_hit": hit, "before": without_items(before),
           "after": without_items(after), "train": train,
           "warnings": train_warnings(train),
           "regularizers": [config_to_dict(r) for r in run.cfg.regularizers],
           "data_sources": sources, "wall_time_s": time.perf_counter() - t0,
           "instance": uuid.uuid4().hex}
    if run.stage is not None:
        out["stage"] = run.stage.record()
        out["started_from"] = started_from
    return out


# ----------------------------------------------------------------------------- the experiment

@dataclass
class Outcome:
    """What run_experiment did: the faces turn it into the end message and the exit status."""

    root: Path
    total: int
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (run label, error line)
    warnings: list[str] = field(default_factory=list)  # "<run label>: <warning>"

    @property
    def ok(self) -> bool:
        return not self.failed

    def message(self) -> str:
        """``"2 of 6 runs failed: ewc seed 1 (NonFiniteLoss: ...), ..."`` (+ warnings)."""
        if self.failed:
            parts = [f"{label} ({_short(err)})" for label, err in self.failed]
            head = f"{len(self.failed)} of {self.total} runs failed: " + ", ".join(parts)
        else:
            head = f"all {self.total} runs succeeded" + (
                f" ({self.reused} reused from earlier)" if self.reused else "")
        if self.warnings:
            head += f"; {len(self.warnings)} warning(s): " + "; ".join(self.warnings)
        return head


def _short(text: str, n: int = 160) -> str:
    line = " ".join(str(text).split())
    return line if len(line) <= n else line[:n - 1] + "…"


def _error_line(e: BaseException, rdir: Path) -> str:
    """One line naming the error; a disk-full OSError says so, with the free space."""
    if isinstance(e, TrainingFailed):
        return str(e)
    if is_disk_full(e):
        return disk_full_line(e, rdir)  # type: ignore[arg-type]
    return f"{type(e).__name__}: {_short(str(e), 2000)}" if str(e) else repr(e)


def _log_failure(rdir: Path, head: str, e: BaseException) -> None:
    """The full traceback of a failed attempt: appended to the run's ``run.log`` (always) and
    logged at DEBUG (shown under ``--debug``)."""
    tb = "".join(traceback.format_exception(e))
    log.debug("%s: traceback:\n%s", head, tb)
    try:
        rdir.mkdir(parents=True, exist_ok=True)
        with (rdir / RUN_LOG).open("a") as fh:
            fh.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {head} failed:\n{tb}\n")
    except OSError as err:  # the disk may be full: the summary still gets the line
        log.warning("%s: could not write %s: %s", head, rdir / RUN_LOG, err)


def _set_aside(run: RunSpec, root: Path, stamp: str) -> Path:
    """Move a run folder to ``_replaced/<stamp>/<arm>/seed-<s>`` (same file system: a rename)."""
    dst = root / REPLACED / stamp / run.dir.relative_to(root)
    _move(run.dir, dst, root)
    return dst


def _restore(run: RunSpec, root: Path, aside: Path, stamp: str) -> Path | None:
    """Put a set-aside finished run back; the failed attempt goes to ``_failed/`` (its logs)."""
    kept = None
    if run.dir.exists():
        kept = root / FAILED / stamp / run.dir.relative_to(root)
        _move(run.dir, kept, root)
    _move(aside, run.dir, root)
    _prune_empty(aside.parent, root / REPLACED)
    return kept


def _drop_replaced(run: RunSpec, root: Path) -> None:
    """The run succeeded: delete every earlier version of it set aside by --force."""
    rel = glob.escape(str(run.dir.relative_to(root)))
    for old in (root / REPLACED).glob(f"*/{rel}"):
        _remove(old, root)
        _prune_empty(old.parent, root / REPLACED)


def write_plan_files(root: Path, cfg: Config, runs: list[dict[str, Any]], **extra: Any) -> None:
    """``plan.json`` (what is run) and ``analysis.json`` (the analysis settings the tables are
    computed with, forgetkit.results.summary) at the root of a results tree."""
    from forgetkit.results.summary import ANALYSIS_FILE

    write_json(root / ANALYSIS_FILE, config_to_dict(cfg.analysis))
    write_json(root / "plan.json", {"experiment": cfg.name, **extra, "runs": runs})


def run_experiment(base: Config, runs: list[RunSpec], force: bool = False, *,
                   src: str | None = None, checks: list[Check] | None = None) -> Outcome:
    """Execute (or resume) every run; one run's failure is recorded and the others continue.

    Nothing is evaluated, trained, moved or deleted before every check passed: ``checks``
    (from :func:`check_plan`, which the face has shown) or, when None, preflight of every
    run here. Then, holding the results directory's lock for the whole experiment, the run
    folders are checked again (another process may have finished one meanwhile).

    Raises:
        ConfigError: a failed check (LockHeld: another process holds the results directory).
        RunInterrupted: Ctrl-C; finished runs are kept, the interrupted one resumes on a rerun.
        OSError: a result that cannot be recorded (disk full while writing a summary).
    """
    from forgetkit.locking import dir_lock
    from forgetkit.preflight import raise_on_problems
    from forgetkit.results.summary import write_tables

    src = src or f"experiment '{base.name}'"
    raise_on_problems(preflight_checks(runs) if checks is None else checks, src)
    opts = base.experiment
    root = results_root(base)
    outcome = Outcome(root, len(runs))
    with dir_lock(root, "results directory"):
        raise_on_problems(reuse_checks(runs, force), src)
        for w in _orphaned_replacements(runs, root):
            log.warning("%s", w)
            outcome.warnings.append(w)
        write_plan_files(root, base, [{"arm": r.arm, "seed": r.seed, "grid": r.grid,
                                       "dir": str(r.dir),
                                       **({"stage": r.stage.record()} if r.stage else {})}
                                      for r in runs])
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        done: set[Path] = set()  # runs finished (reused or trained) in this invocation
        for i, run in enumerate(runs, 1):
            head = f"[run {i}/{len(runs)}] arm={run.arm} seed={run.seed}"
            prev = run.stage.prev if run.stage is not None else None
            if run.stage is not None:
                head += f" stage={run.stage.index}/{run.stage.count - 1} ({run.stage.name})"
            if prev is not None and prev.dir not in done:
                err = (f"not started: it fine-tunes the final model of {prev.label}, which did "
                       "not finish")
                log.error("%s: %s", head, err)
                outcome.failed.append((run.label, err))
                continue
            stale = is_finished(run.dir) and not stage_descends(run)
            if stale:
                w = (f"{run.label}: finished earlier, but from another result of "
                     f"{prev.label if prev else 'its previous stage'} than the present one "
                     "(trained again since): trained again")
                log.warning("%s: %s", head, w)
                outcome.warnings.append(w)
            if is_finished(run.dir) and not force and not stale:
                log.info("%s: finished earlier with the same config, reused (--force "
                         "recomputes)", head)
                outcome.reused += 1
                outcome.warnings += [f"{run.label}: {w}" for w in
                                     read_json(run.dir / SUMMARY).get("warnings") or []]
                done.add(run.dir)
                _sequence_step(run, runs, root, opts, trained=False)
                continue
            if run.stage is not None:  # derived from the stages: rewritten once all finished
                _remove(run.dir.parent / "sequence.json", root)
            aside = (_set_aside(run, root, stamp) if (force or stale) and run.dir.exists()
                     else None)
            old_finished = aside is not None and is_finished(aside)
            log.info("%s: starting", head)
            try:
                if _one_run(run, head, root, opts, aside, old_finished, stamp, outcome):
                    done.add(run.dir)
                    _sequence_step(run, runs, root, opts, trained=True)
            except KeyboardInterrupt as e:
                note = ""
                if aside is not None and aside.exists():
                    if is_finished(run.dir):  # the new run finished just before the interrupt
                        _drop_replaced(run, root)
                    elif old_finished:
                        _restore(run, root, aside, stamp)
                        note = "; the finished run from before --force was put back"
                    else:  # an unfinished earlier attempt that --force replaces anyway
                        _remove(aside, root)
                        _prune_empty(aside.parent, root / REPLACED)
                detail = str(e).removesuffix("; rerun the same command to resume")
                raise RunInterrupted(
                    f"interrupted during run {i}/{len(runs)} ({run.label})"
                    + (f": {detail}" if detail else "") + note
                    + "; finished runs are kept; rerun the same command to resume") from None
        write_tables(root)
        outcome.warnings += safe_sequence_tables(root)
    return outcome


def _sequence_step(run: RunSpec, runs: list[RunSpec], root: Path, opts: Any,
                   trained: bool) -> None:
    """After a stage finished (``trained``) or was reused: delete the previous stage's model
    (this stage was its only user; kept with experiment.keep_checkpoints), and once the last
    stage is done write the sequence's ``sequence.json`` and the root's sequence tables."""

    st = run.stage
    if st is None:
        return
    if trained and st.prev is not None and not opts.keep_checkpoints:
        _remove(st.prev.dir / "model", root)
    if st.index == st.count - 1:
        chain = [r for r in runs if r.arm == run.arm and r.seed == run.seed
                 and r.stage is not None]
        chain.sort(key=lambda r: r.stage.index)  # type: ignore[union-attr]
        if all(is_finished(r.dir) for r in chain):
            write_json(run.dir.parent / "sequence.json", sequence_of(chain))
            safe_sequence_tables(root)


def safe_sequence_tables(root: Path) -> list[str]:
    """The root's sequence tables; a failure to tabulate (e.g. sequences scored on other items)
    is logged and returned, never raised: the finished stages are the results, the tables are
    derived from them (rebuild with forgetkit.results.sequence.write_sequence_tables)."""
    from forgetkit.results.sequence import write_sequence_tables

    try:
        write_sequence_tables(root)
    except (ValueError, KeyError, OSError) as e:
        msg = (f"sequence tables not written: {type(e).__name__}: {e}; the stage results are "
               "kept (forgetkit.results.sequence.write_sequence_tables rebuilds them)")
        log.error("%s", msg)
        return [msg]
    return []


def sequence_of(chain: list[RunSpec]) -> dict[str, Any]:
    """``sequence.json`` of a finished sequence (its stages' runs, in order): the accuracy
    matrix from each stage's ``eval_after.json`` against stage 0's ``eval_before.json`` (the
    base model), :func:`forgetkit.results.sequence.sequence_record`."""
    from forgetkit.results.sequence import sequence_record

    stages = [r.stage for r in chain]
    assert all(s is not None for s in stages)
    base = read_json(chain[0].dir / "eval_before.json")
    after = [read_json(r.dir / "eval_after.json") for r in chain]
    rec = sequence_record([s.name for s in stages], [s.metric for s in stages],  # type: ignore[union-attr]
                          base, after)
    return {"arm": chain[0].arm, "seed": chain[0].seed,
            "dirs": [str(r.dir.relative_to(chain[0].dir.parent)) for r in chain], **rec}


def _orphaned_replacements(runs: list[RunSpec], root: Path) -> list[str]:
    """Finished runs that an earlier ``--force`` set aside and that were never put back (that
    process was killed), while the run folder itself holds no finished result."""
    out = []
    for run in runs:
        if is_finished(run.dir):
            continue
        rel = glob.escape(str(run.dir.relative_to(root)))
        for old in sorted((root / REPLACED).glob(f"*/{rel}")):
            if is_finished(old):
                out.append(f"{run.label}: a finished result set aside by an interrupted "
                           f"--force is in {old} (not in the tables; move it back to "
                           f"{run.dir} to keep it, or let this run replace it)")
    return out


def _one_run(run: RunSpec, head: str, root: Path, opts: Any, aside: Path | None,
             old_finished: bool, stamp: str, outcome: Outcome) -> bool:
    """One run: train and score, record the summary, then keep or put back what --force set
    aside. Failures are recorded in ``outcome``; an interrupt propagates to the caller.
    Returns whether the run succeeded.

    Unless experiment.keep_checkpoints, a finished run's ``model/`` and ``checkpoints/`` are
    deleted; a stage that another stage starts from keeps ``model/`` (deleted once that stage
    has finished, :func:`_sequence_step`)."""
    from forgetkit.results.summary import write_tables

    try:
        summary = run_one(run, root, opts.launcher)
        log.info("%s: done in %.0fs", head, summary["wall_time_s"])
    except Exception as e:  # recorded, and the other arms continue
        err = _error_line(e, run.dir)
        log.error("%s: failed: %s", head, err)
        _log_failure(run.dir, head, e)
        _clean_tmp(run.dir, root)
        summary = {"status": "failed", "arm": run.arm, "seed": run.seed,
                   "grid": run.grid, "error": err, "log": RUN_LOG}
        if run.stage is not None:
            summary["stage"] = run.stage.record()
    try:
        write_json(run.dir / SUMMARY, summary)
    except OSError as e:  # not even the result can be recorded: stop here
        if old_finished:
            _restore(run, root, aside, stamp)  # type: ignore[arg-type]
        log.error("%s: could not record the result: %s; stopping", head, e)
        raise
    if summary["status"] == "ok":
        _drop_replaced(run, root)
        if not opts.keep_checkpoints:
            starts_next = run.stage is not None and run.stage.index < run.stage.count - 1
            for sub in ("checkpoints",) if starts_next else ("model", "checkpoints"):
                _remove(run.dir / sub, root)
        for w in summary["warnings"]:
            log.warning("%s: %s", head, w)
            outcome.warnings.append(f"{run.label}: {w}")
    else:
        outcome.failed.append((run.label, summary["error"]))
        if old_finished:
            kept = _restore(run, root, aside, stamp)  # type: ignore[arg-type]
            note = (f"the new run failed, so the finished run from before --force "
                    f"was put back in {run.dir} (the failed attempt is in {kept})")
            log.warning("%s: %s", head, note)
            outcome.warnings.append(f"{run.label}: {note}")
        elif aside is not None:
            _remove(aside, root)  # an unfinished earlier attempt: nothing to keep
            _prune_empty(aside.parent, root / REPLACED)
    write_tables(root)
    return summary["status"] == "ok"


# Effective FLOP/s used for the plan's time estimate: measured here for fp32 on a 2-core CPU
# (full FT of a 135M model ~90 tokens/s = 6 N tok/s ~ 7e10; a forward ~300 tok/s =
# 2 N tok/s ~ 8e10). On a GPU a conservative 1e14 (bf16, ~30 % MFU of an A100). Override with
# FORGETKIT_FLOPS.
CPU_FLOPS, GPU_FLOPS = 7.5e10, 1.0e14
# Forward-token equivalents per lm-eval item, for tasks whose data is not read here: measured
# on the embedded suite (135M, 2 cores, batch 8, 2026-12-02): 0.07-0.28 s per item at ~280
# tok/s, i.e. ~20 (OpenBookQA) to ~80 (BoolQ, long passages) tokens; 40 is the suite's mean.
LM_EVAL_TOKENS_PER_ITEM = 40


def _model_params(cfg: Config) -> int | None:
    """Parameter count from the model config alone (meta device: no weights loaded)."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        from forgetkit.models import resolve_model_path

        if cfg.model.random_init is not None:
            spec = dict(cfg.model.random_init)
            conf = AutoConfig.for_model(spec.pop("model_type"), **spec)
        else:
            path, gguf = resolve_model_path(cfg.model.name_or_path)
            conf = AutoConfig.from_pretrained(path, **({"gguf_file": gguf} if gguf else {}))
        with torch.device("meta"):
            m = AutoModelForCausalLM.from_config(conf)
        return sum(p.numel() for p in {id(p): p for p in m.parameters()}.values())
    except Exception:  # an estimate only: never fail the plan over it
        return None


def _mean_tokens(spec: Any, tok: Any, fmt_max: int, seed: int, limit: int | None = None
                 ) -> tuple[float, int]:
    from forgetkit.data.sources import load_records, select
    from forgetkit.data.templates import tokenize_record

    recs = select(load_records(spec), spec, seed)
    if limit is not None:
        recs = recs[:limit]
    lens = []
    for r in recs[:512]:
        ex = tokenize_record(r, spec.format, spec.fields, tok, fmt_max)
        if ex is not None:
            lens.append(len(ex.input_ids))
    return (sum(lens) / len(lens) if lens else 0.0), len(recs)


def estimate_seconds(base: Config, runs: list[RunSpec], steps: list[int] | None = None
                     ) -> dict[str, float] | None:
    """Rough wall-clock estimate of the plan: training (6N/token), Fisher (6N/token) and
    evaluation (2N/token) at an effective FLOP rate (see CPU_FLOPS). None if unknown."""
    import torch

    from forgetkit.models import load_tokenizer

    n = _model_params(base)
    if n is None:
        return None
    rate = float(os.environ.get("FORGETKIT_FLOPS") or
                 (GPU_FLOPS if torch.cuda.is_available() else CPU_FLOPS))
    try:
        tok = load_tokenizer(base.model)
        d = base.data
        train_len, _ = _mean_tokens(d.train, tok, d.max_length, base.seed)
        eval_tokens = 0.0
        for spec in list(base.evaluation.task) + list(base.evaluation.general):
            if spec.kind == "lm_eval" or spec.data is None:
                eval_tokens += (spec.limit or 500) * LM_EVAL_TOKENS_PER_ITEM
            else:
                mean, count = _mean_tokens(spec.data, tok, spec.max_length, EVAL_SEED, spec.limit)
                eval_tokens += mean * count
    except Exception:
        return None
    train = fisher = 0.0
    fisher_keys = set()
    lens: dict[str, float] = {_hash(config_to_dict(d.train)): train_len}
    for i, r in enumerate(runs):
        t = r.cfg.training
        n_steps = steps[i] if steps else (t.max_steps or 0)
        key = _hash(config_to_dict(r.cfg.data.train))  # a sequence's stages: their own data
        if key not in lens:
            try:
                lens[key] = _mean_tokens(r.cfg.data.train, tok, d.max_length, base.seed)[0]
            except Exception:
                lens[key] = train_len
        train += n_steps * t.micro_batch_size * t.gradient_accumulation_steps * lens[key]
        for j, rc in enumerate(r.cfg.regularizers):
            fkey = rc.fisher_path if rc.type == "ewc" and rc.fisher_path else (str(r.dir), j)
            if rc.type == "ewc" and rc.fisher_data is not None and fkey not in fisher_keys:
                fisher_keys.add(fkey)
                try:
                    fl, _ = _mean_tokens(rc.fisher_data, tok, d.max_length, r.seed,
                                         rc.fisher_examples)
                except Exception:  # unreadable data fails in its own run, not in the plan
                    continue
                fisher += rc.fisher_examples * fl
    # before-evaluations: once per base (a later stage's before is its predecessor's after)
    n_evals = len({eval_cache_key(r.cfg) for r in runs if _starts_from_base(r)}) + len(runs) * (
        1 + len(base.evaluation.wise_alphas) + len(base.evaluation.merge))
    return {"train_s": 6 * n * train / rate, "fisher_s": 6 * n * fisher / rate,
            "eval_s": 2 * n * eval_tokens * n_evals / rate, "params": n, "flops": rate}


def _starts_from_base(r: RunSpec) -> bool:
    return r.stage is None or r.stage.prev is None


def describe_plan(base: Config, runs: list[RunSpec]) -> str:
    """The --dry-run text: runs, optimizer steps and evaluations, without loading a model."""
    from forgetkit.data.sources import load_records, select

    seq = base.sequence
    lines = [f"experiment '{base.name}': {len(runs)} runs "
             f"({len({r.arm for r in runs})} arms x {len({r.seed for r in runs})} seeds"
             + (f" x {len(seq.stages)} stages" if seq is not None else "") + ")"]
    if seq is not None:
        lines.append("sequence: " + " -> ".join(f"{k}:{st.name} [{st.metric}]"
                                                 for k, st in enumerate(seq.stages))
                     + " (stage k >= 1 fine-tunes stage k-1's final model)")
    n_eval_items = 0
    for spec in list(base.evaluation.task) + list(base.evaluation.general):
        n_eval_items += spec.limit or 0
    keys = {eval_cache_key(r.cfg) for r in runs if _starts_from_base(r)}
    n_steps: list[int] = []
    finished: list[bool] = []
    for r in runs:
        finished.append(is_finished(r.dir))
        t = r.cfg.training
        gb = t.micro_batch_size * t.gradient_accumulation_steps
        n_steps.append(t.max_steps or 0)
        if t.max_steps:
            steps = str(t.max_steps)
        else:
            try:
                n = len(select(load_records(r.cfg.data.train), r.cfg.data.train, r.seed))
                n_train = n - (round(r.cfg.data.validation_fraction * n)
                               if r.cfg.data.validation is None else 0)
                n_steps[-1] = t.epochs * (n_train // gb)
                steps = f"~{n_steps[-1]}"
            except (ConfigError, OSError) as e:
                steps = f"? ({e})"
        rp = r.cfg.data.replay
        regs = ", ".join([x.type for x in r.cfg.regularizers] + (
            [f"replay {rp.ratio:g}" + (f" (+{len(rp.sources)} earlier-stage buffers)"
                                       if rp.sources else "")] if rp is not None else [])
        ) or "none"
        done = " [finished]" if finished[-1] else ""
        stage = f" stage {r.stage.index}:{r.stage.name:<12}" if r.stage is not None else ""
        lines.append(f"  {r.arm:<24} seed {r.seed:<4}{stage} steps {steps:<8} global "
                     f"batch/process {gb:<4} regularizers: {regs}{done}")
    n_specs = len(base.evaluation.task) + len(base.evaluation.general)
    lines.append(f"evaluations: {len(keys)} before (cached per base model) + {len(runs)} after, "
                 f"{n_specs} metrics each"
                 + (f", +{len(base.evaluation.wise_alphas)} WiSE-FT points per run"
                    if base.evaluation.wise_alphas else "")
                 + (f", +{len(base.evaluation.merge)} merges per run"
                    if base.evaluation.merge else "")
                 + (f"; items with an explicit limit: {n_eval_items}" if n_eval_items else ""))
    left = [i for i, done in enumerate(finished) if not done]
    if not left:
        lines.append("estimated time: nothing left to run (every run has finished: each is "
                     "reused while its identity matches, see the checks)")
    est = estimate_seconds(base, [runs[i] for i in left], [n_steps[i] for i in left]) \
        if left else None
    if est is not None:
        total = est["train_s"] + est["fisher_s"] + est["eval_s"]
        of = (f" of the {len(left)} runs left ({len(runs) - len(left)} finished)"
              if len(left) < len(runs) else "")
        lines.append(f"estimated time{of} (rough, {est['params'] / 1e6:.0f}M parameters at "
                     f"{est['flops'] / 1e9:.1f} effective GFLOP/s; FORGETKIT_FLOPS overrides): "
                     f"training {est['train_s'] / 60:.0f} min, Fisher {est['fisher_s'] / 60:.0f} "
                     f"min, evaluation {est['eval_s'] / 60:.0f} min, total ~{total / 60:.0f} min "
                     "(+ model loading and process start-up)")
    return "\n".join(lines)

