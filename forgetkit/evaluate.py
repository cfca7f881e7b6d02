"""``python -m forgetkit.evaluate``: forgetkit's before/after evaluation of checkpoints trained
anywhere (LLaMA-Factory, Axolotl, TRL, your own loop, a WiSE-FT mix); nothing is trained.

The same evaluation suite, per-item scores, statistics and tables as ``python -m forgetkit.run``,
for fine-tuned models you already have::

    python -m forgetkit.evaluate --config experiments/ewc_medical.yaml \\
        --base smollm2-135m-instruct \\
        --tuned sft=ckpts/sft-seed0 --tuned sft=ckpts/sft-seed1 --tuned dpo=ckpts/dpo \\
        evaluation.batch_size=4

    python -m forgetkit.report results/ewc_medical-eval      # figures and tables, unchanged

Arguments::

    --config SUITE.yaml  an experiment or config YAML; only its evaluation:, analysis: and name
                         are read (its model:, data:, training:, arms are ignored)
    --base BASE          the model the checkpoints were fine-tuned from: a local HF directory,
                         a hub id, or a forgetkit model alias (smollm2-135m-instruct)
    --tuned NAME=PATH    a fine-tuned checkpoint: a local HF directory (config.json, weights,
                         tokenizer files). Repeat it; the same NAME given again is another seed of
                         one arm (seed 0, 1, ... in the order given). NAME: letters, digits, ._-=@+
    --out DIR            results root (default results/<config name>-eval)
    --force              re-evaluate finished results that no longer match (the old result is
                         replaced only once the new one has succeeded)
    --dry-run            print the plan and every check; evaluate nothing
    --debug              full tracebacks
    key=value            overrides of evaluation.* and analysis.* (as in forgetkit.run)

What it writes (the runner's results contract, forgetkit.results; ``train`` is empty)::

    <out>/_cache/eval_before-<key>.json  the base model's scores, computed once per base model
                                         + evaluation settings + data, reused by every later call
    <out>/<NAME>/seed-<k>/  config.yaml env.json identity.json eval_before.json eval_after.json
                            summary.json, drift.json (relative weight drift per layer, when
                            base and checkpoint are local safetensors checkpoints)
    <out>/summary.csv, summary_agg.csv, points.csv, columns.json, analysis.json

``summary.json`` has ``status, arm, seed, grid ({}), before, after, train ({}), warnings,
source {tuned, base}, wall_time_s``; ``seed`` is the checkpoint's position among its NAME's
(the tables average over it as over training seeds). The per-item scores stay in
eval_before/eval_after.json, so the tables' paired statistics pair every checkpoint's items
with the base model's.
Evaluation settings with WiSE-FT points (``evaluation.wise_alphas``) or merges
(``evaluation.merge``; ``run`` = the checkpoint) score those too, between the base and each
checkpoint (both need safetensors weights then).

Before anything is evaluated or written, everything is checked: every NAME and PATH (a directory
with config.json, its weights -- every shard an index lists -- and tokenizer files), that each
checkpoint's architecture matches the base (model_type, vocab_size, hidden_size,
num_hidden_layers), the suite's data files and lm-eval tasks, the device, what happens to
results already in ``<out>``, and the results directory's lock.

A finished ``<NAME>/seed-<k>`` is reused while its identity matches: the evaluation settings and
data digests, the base model, the checkpoint's path and a cheap digest of it (config.json's
content; size and mtime of its weight and tokenizer files). One that differs is refused, naming
the differing keys, unless ``--force``. Exit status: 0 every checkpoint evaluated (or reused);
1 some failed (one line names them; the traceback is in their run.log); 2 bad input or a failed
check; 130 interrupted. Give each suite + base its own ``--out`` (the default does): a
forgetkit.run results directory holds trained runs whose folders this tool refuses to reuse.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgetkit.cli import debug_enabled, guarded, setup_logging
from forgetkit.config import (
    Config,
    ConfigError,
    MergeSpec,
    apply_overrides,
    check_slug,
    config_from_dict,
    config_to_dict,
    parse_overrides,
    read_yaml,
)

if TYPE_CHECKING:
    import torch

    from forgetkit.preflight import Check

log = logging.getLogger("forgetkit")

TOOL = "forgetkit.evaluate"  # identity.json's "tool": which face wrote a result folder
TMP = "_tmp"  # results being written; moved into <NAME>/seed-<k> once complete
ARCH_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers")
OVERRIDABLE = ("name", "evaluation", "analysis")  # top-level sections an override may set
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")
# Files the evaluation reads besides config.json (hashed by content): their size and mtime are
# the checkpoint's cheap digest (weights are gigabytes: never hashed).
DIGEST_PATTERNS = WEIGHT_PATTERNS + ("*.index.json", "tokenizer*", "special_tokens_map.json",
                                     "added_tokens.json", "vocab.*", "merges.txt", "*.model",
                                     "chat_template.*", "generation_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
REMEDIES = ("Rerun with --force to re-evaluate it (the old result is kept until the new one has "
            "succeeded), or use another --out to keep both.")


# ----------------------------------------------------------------------------- inputs

@dataclass
class Target:
    """One checkpoint to score: arm NAME, its seed index, where it is, where its results go."""

    name: str
    seed: int
    given: str  # PATH as the user wrote it
    path: Path  # resolved
    dir: Path  # <out>/<NAME>/seed-<k>

    @property
    def label(self) -> str:
        return f"{self.name} seed {self.seed}"


def parse_tuned(items: list[str]) -> list[tuple[str, str]]:
    """``["NAME=PATH", ...]`` -> ``[(NAME, PATH), ...]``; ConfigError for an item without ``=``."""
    out = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--tuned {item!r}: expected NAME=PATH (an arm name and a "
                              "checkpoint directory), e.g. --tuned sft=ckpts/sft-seed0")
        out.append((name.strip(), path.strip()))
    return out


def suite_config(raw: dict[str, Any], base: str, overrides: dict[str, Any], src: str) -> Config:
    """The evaluation-only config: the suite's ``name``, ``evaluation:`` and ``analysis:`` with
    ``model.name_or_path = base``; every other section of the file is dropped (nothing is
    trained). Overrides may set only those sections (any other key would be silently unused)."""
    for key in overrides:
        if key.split(".", 1)[0] not in OVERRIDABLE:
            raise ConfigError(f"override {key!r}: forgetkit.evaluate reads only evaluation.*, "
                              "analysis.* and name (the model is --base; nothing is trained)")
    r: dict[str, Any] = {k: copy.deepcopy(raw[k]) for k in OVERRIDABLE if k in raw}
    apply_overrides(r, overrides)
    r["model"] = {"name_or_path": base}
    cfg = config_from_dict(r, src)
    if not cfg.evaluation.task and not cfg.evaluation.general:
        raise ConfigError(f"{src}: evaluation: no task or general metrics to score; use a suite "
                          "with evaluation.task / evaluation.general (e.g. "
                          "experiments/ewc_medical.yaml)")
    return cfg


def saved_config(cfg: Config) -> str:
    """config.yaml of a result: the sections the evaluation used, fully resolved (loadable with
    ``config_from_dict``; no training sections: nothing was trained)."""
    import yaml

    d = config_to_dict(cfg)
    return yaml.safe_dump({k: d[k] for k in ("name", "model", "evaluation", "analysis")},
                          sort_keys=False)


def default_out(cfg: Config) -> Path:
    return Path("results") / f"{cfg.name}-eval"


def plan_targets(tuned: list[tuple[str, str]], root: Path) -> tuple[list[Target], list[Check]]:
    """One :class:`Target` per ``--tuned`` (seeds numbered per NAME in the order given) and the
    problems with the names (unsafe, reserved, a checkpoint given twice under one name)."""
    from forgetkit.preflight import Check
    from forgetkit.runner import inside

    targets: list[Target] = []
    problems: list[Check] = []
    seen: set[tuple[str, Path]] = set()
    for name, given in tuned:
        what = f"--tuned {name}={given}"
        try:
            check_slug(name, "NAME", what)
            if name.startswith("_"):
                raise ConfigError(f"{what}: NAME: {name!r} starts with '_', which forgetkit "
                                  "reserves for its own folders (_cache, _tmp, _replaced); "
                                  "choose another name")
            seed = sum(1 for t in targets if t.name == name)
            path = Path(given).expanduser().resolve()
            if (name, path) in seen:
                raise ConfigError(f"{what}: this checkpoint is already given under the name "
                                  f"{name!r}; give each seed's checkpoint once")
            seen.add((name, path))
            d = root / name / f"seed-{seed}"
            inside(d, root)
        except ConfigError as e:
            problems.append(Check(what, False, str(e)))
            continue
        targets.append(Target(name, seed, given, path, d))
    return targets, problems


# ----------------------------------------------------------------------------- checks

def suite_checks(cfg: Config) -> list[Check]:
    """forgetkit.preflight's checks that apply without training: the base model, every metric's
    data file and lm-eval task, whether each metric fits its data, the device, merge
    checkpoints (the training-only checks -- data.train, launcher -- are left out)."""
    from forgetkit.preflight import Check, preflight

    out = []
    for c in preflight(cfg, launcher=[]):
        if not c.what.startswith(("model", "evaluation.", "device")):
            continue  # data.train, the launcher: nothing is trained
        if c.ok and c.what.startswith("device:"):
            c = Check(c.what.split("; training on")[0], True)
        out.append(c)
    return out


def _weight_files(p: Path) -> list[Path]:
    return sorted({f for pat in WEIGHT_PATTERNS for f in p.glob(pat) if f.is_file()})


def check_checkpoint_dir(what: str, p: Path, needs_safetensors: bool = False) -> str:
    """A local HF checkpoint the harness can load: config.json, weights (each shard an index
    lists), tokenizer files. Returns what was found; raises ConfigError naming the fix."""
    if not p.exists():
        raise ConfigError(f"{what}: no such directory ({p})")
    if not p.is_dir():
        raise ConfigError(f"{what}: {p} is a file; expected a checkpoint directory (holding "
                          "config.json and the weights)")
    if not (p / "config.json").is_file():
        if (p / "adapter_config.json").is_file():
            raise ConfigError(f"{what}: {p} is a LoRA adapter, not a full checkpoint; merge it "
                              "first (peft: model.merge_and_unload().save_pretrained(DIR), and "
                              "the tokenizer's save_pretrained(DIR)) and evaluate DIR")
        subs = sorted(d.name for d in p.glob("checkpoint-*") if (d / "config.json").is_file())
        hint = (f"; it holds the checkpoints {', '.join(subs[:4])}"
                + (" ..." if len(subs) > 4 else "") + ": pass one of them" if subs else
                "; is this the directory save_pretrained wrote?")
        raise ConfigError(f"{what}: {p} holds no config.json{hint}")
    weights = _weight_files(p)
    if not weights:
        raise ConfigError(f"{what}: {p} holds no weights (*.safetensors or pytorch_model*.bin)")
    for index in sorted(p.glob("*.index.json")):
        try:
            shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
        except (OSError, ValueError, AttributeError) as e:
            raise ConfigError(f"{what}: {index} is unreadable ({e})") from None
        missing = sorted(s for s in shards if not (p / s).is_file())
        if missing:
            raise ConfigError(f"{what}: {index.name} lists {len(missing)} shard(s) that are not "
                              f"in {p}, e.g. {missing[0]} (an incomplete copy?)")
    if needs_safetensors and not any(f.suffix == ".safetensors" for f in weights):
        raise ConfigError(f"{what}: evaluation.wise_alphas / evaluation.merge read safetensors "
                          f"weights, and {p} has only pytorch_model*.bin; re-save it with "
                          "save_pretrained(safe_serialization=True) or drop those settings")
    if not any((p / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{what}: {p} holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                          "each checkpoint is scored with its own tokenizer: save the base "
                          "model's tokenizer into it (tokenizer.save_pretrained)")
    size = sum(f.stat().st_size for f in weights)
    return f"{what}: {p} ({len(weights)} weight file(s), {size / 2**20:.1f} MiB)"


def architecture(conf: Any) -> dict[str, Any]:
    """The fields a fine-tuned checkpoint must share with its base (ARCH_KEYS) from a
    transformers config (the text model's, for a composite config)."""
    text = conf.get_text_config() if hasattr(conf, "get_text_config") else conf
    return {k: getattr(text, k, getattr(conf, k, None)) for k in ARCH_KEYS}


def _arch_of_dir(p: Path) -> dict[str, Any]:
    from transformers import AutoConfig

    try:
        return architecture(AutoConfig.from_pretrained(str(p)))
    except Exception as e:  # noqa: BLE001 - a user's file: one line, never a traceback
        raise ConfigError(f"{p / 'config.json'}: transformers cannot read it: "
                          f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None


def arch_mismatch(tuned: dict[str, Any], base: dict[str, Any]) -> list[str]:
    """``"hidden_size 32 (checkpoint) vs 64 (base)"`` for every differing field."""
    return [f"{k} {tuned.get(k)!r} (checkpoint) vs {base.get(k)!r} (base)"
            for k in ARCH_KEYS if tuned.get(k) != base.get(k)]


def checkpoint_checks(cfg: Config, targets: list[Target], base_ok: bool) -> list[Check]:
    """Every --tuned directory (:func:`check_checkpoint_dir`) and its architecture against the
    base model's (read from its config only; the base's own location is checked by
    :func:`suite_checks`)."""
    from forgetkit.models import hf_config
    from forgetkit.preflight import Check

    ev = cfg.evaluation
    post_hoc = bool(ev.wise_alphas or ev.merge)
    base_arch: dict[str, Any] | None = None
    out: list[Check] = []
    if base_ok:
        try:
            base_arch = architecture(hf_config(cfg.model))
        except ConfigError as e:
            out.append(Check("--base", False, f"--base: {e}"))
        except Exception as e:  # noqa: BLE001
            out.append(Check("--base", False, f"--base {cfg.model.name_or_path}: cannot read its "
                             f"config: {type(e).__name__}: {' '.join(str(e).split())[:300]}"))
        base_dir = Path(cfg.model.name_or_path or "")
        if post_hoc and base_dir.is_dir() and not any(base_dir.glob("*.safetensors")):
            out.append(Check("--base", False, f"--base: evaluation.wise_alphas / "
                             f"evaluation.merge read safetensors weights, and {base_dir} has "
                             "none; re-save it with safe_serialization=True or drop those"))
    for t in targets:
        what = f"--tuned {t.name}={t.given}"
        try:
            found = check_checkpoint_dir(what, t.path, needs_safetensors=post_hoc)
            arch = _arch_of_dir(t.path)
            if base_arch is not None:
                diff = arch_mismatch(arch, base_arch)
                if diff:
                    raise ConfigError(f"{what}: not a fine-tune of the base "
                                      f"{cfg.model.name_or_path}: {'; '.join(diff)} (a fine-tune "
                                      "keeps its base's architecture: is --base the model it "
                                      "was trained from?)")
                found += f", {arch['model_type']} like the base"
            out.append(Check(found, True))
        except ConfigError as e:
            out.append(Check(what, False, str(e)))
    return out


def checkpoint_digest(p: Path) -> dict[str, Any]:
    """Cheap fingerprint of a checkpoint directory: sha256 of config.json's content and
    ``[size, mtime_ns]`` of every weight, index, tokenizer and generation-config file
    (a checkpoint replaced or re-saved in place changes it; weights are never read)."""
    out: dict[str, Any] = {
        "config_sha256": hashlib.sha256((p / "config.json").read_bytes()).hexdigest()}
    files = sorted({f for pat in DIGEST_PATTERNS for f in p.glob(pat) if f.is_file()})
    for f in files:
        st = f.stat()
        out[f"file.{f.name}"] = [st.st_size, st.st_mtime_ns]
    return out


def identity_of(cfg: Config, t: Target) -> dict[str, Any]:
    """What a finished result must match to be reused (flat, diffed key by key): the evaluation
    settings and data digests and the base model (``model.*``, ``eval_cache_key``), forgetkit's
    numerics version, and the checkpoint (``tuned.path`` and :func:`checkpoint_digest`)."""
    from forgetkit.identity import NUMERICS_KEY, run_identity
    from forgetkit.runner import eval_cache_key

    ident: dict[str, Any] = {"tool": TOOL}
    ident.update({k: v for k, v in run_identity(cfg).items()
                  if k.startswith(("model.", "evaluation.", "data_sha256.")) or k == NUMERICS_KEY})
    ident["eval_cache_key"] = eval_cache_key(cfg)
    ident["tuned.path"] = str(t.path)
    ident.update({f"tuned.{k}": v for k, v in checkpoint_digest(t.path).items()})
    return ident


def reuse_checks(cfg: Config, targets: list[Target], force: bool) -> list[Check]:
    """What happens to each result folder that already exists (nothing is changed here):
    finished with the same identity: reused; finished otherwise: a problem naming the keys,
    unless ``force``; unfinished (a failed attempt): evaluated again. Seeds of an arm beyond
    this command's checkpoints are named (they stay in the tables)."""
    from forgetkit.identity import format_mismatch, identity_diff
    from forgetkit.preflight import Check
    from forgetkit.results import IDENTITY, is_finished, read_json

    out = []
    for t in targets:
        what = f"{t.label} ({t.dir})"
        if not t.dir.exists():
            continue
        if not is_finished(t.dir):
            out.append(Check(f"{what}: unfinished (an earlier attempt failed), evaluated again",
                             True))
            continue
        if force:
            out.append(Check(f"{what}: finished; re-evaluated (--force: the old result is "
                             "replaced once the new one has succeeded)", True))
            continue
        try:
            old = read_json(t.dir / IDENTITY)
            if not isinstance(old, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as e:
            out.append(Check(what, False, f"{what}: cannot tell what it evaluated "
                             f"({t.dir / IDENTITY}: {e}). {REMEDIES}"))
            continue
        if old.get("tool") != TOOL:
            out.append(Check(what, False, f"{what}: holds a result of forgetkit.run (a trained "
                             f"arm), not of {TOOL}; use another NAME or --out (or --force to "
                             "replace it)"))
            continue
        diff = identity_diff(old, identity_of(cfg, t))
        if diff:
            out.append(Check(what, False, format_mismatch(f"the finished result {t.dir}", diff,
                                                          REMEDIES)))
        else:
            out.append(Check(f"{what}: finished, reused (same checkpoint and evaluation)", True))
    arm_dirs: dict[str, tuple[Path, int]] = {}  # NAME -> (its folder, its checkpoints here)
    for t in targets:
        arm_dirs[t.name] = (t.dir.parent, arm_dirs.get(t.name, (t.dir.parent, 0))[1] + 1)
    for name, (arm_dir, n) in arm_dirs.items():
        for d in sorted(arm_dir.glob("seed-*")):
            k = d.name.removeprefix("seed-")
            if k.isdigit() and int(k) >= n and is_finished(d):
                out.append(Check(f"{d}: an earlier result of {name}, not among this command's "
                                 f"{n} checkpoint(s) of {name}; it stays in the tables (delete "
                                 "it to drop it)", True))
    return out


def check_all(cfg: Config, targets: list[Target], name_checks: list[Check], root: Path,
              force: bool) -> list[Check]:
    """Everything verified before anything is evaluated or written."""
    from forgetkit.runner import lock_check

    suite = suite_checks(cfg)
    base_ok = all(c.ok for c in suite if c.what.startswith("model"))
    return (suite + name_checks + checkpoint_checks(cfg, targets, base_ok)
            + reuse_checks(cfg, targets, force) + [lock_check(root)])


# ----------------------------------------------------------------------------- the plan

def _items(spec: Any) -> str:
    """How many items a metric scores, read from its data (lm-eval tasks: their limit)."""
    if spec.kind == "lm_eval":
        return f"task {spec.task}, " + (f"{spec.limit} items" if spec.limit else "every item")
    try:
        from forgetkit.data.sources import load_records, select
        from forgetkit.runner import EVAL_SEED

        d = spec.data
        if spec.limit is not None and d.limit is None:
            d = type(d)(**{**d.__dict__, "limit": spec.limit})
        n = len(select(load_records(d), d, EVAL_SEED))
        return f"{d.path or d.name}, {n} items"
    except Exception:  # noqa: BLE001 - the plan only describes; the checks report problems
        return f"{spec.data.path or spec.data.name if spec.data else '?'}, ? items"


def describe(cfg: Config, targets: list[Target], root: Path, force: bool) -> str:
    """The --dry-run text (also printed before a real run): metrics, checkpoints, what is
    reused, where the results go. Loads no model."""
    from forgetkit.results import is_finished
    from forgetkit.runner import eval_cache_key

    ev = cfg.evaluation
    arms = list(dict.fromkeys(t.name for t in targets))
    lines = [f"evaluate '{cfg.name}': {len(targets)} checkpoint(s) in {len(arms)} arm(s) against "
             f"the base {cfg.model.name_or_path}; nothing is trained; results in {root}",
             f"metrics ({len(ev.task)} task, {len(ev.general)} general):"]
    for role, specs in (("task", ev.task), ("general", ev.general)):
        for s in specs:
            lines.append(f"  {role:<8} {s.name:<20} {s.kind:<11} {_items(s)}")
    if ev.wise_alphas or ev.merge:
        lines.append(f"  per checkpoint also: WiSE-FT alphas {list(ev.wise_alphas)}, merges "
                     f"{[m.name for m in ev.merge]} (between the base and the checkpoint)")
    lines.append("checkpoints:")
    for t in targets:
        state = ("re-evaluated (--force)" if force else "finished, reused if it matches") \
            if is_finished(t.dir) else "new"
        lines.append(f"  {t.name:<20} seed {t.seed:<3} {t.path}  [{state}]")
    try:
        cache = root / "_cache" / f"eval_before-{eval_cache_key(cfg)}.json"
        how = "reused from" if cache.exists() else "computed once, cached in"
        lines.append(f"base model's scores: {how} {cache}")
    except Exception:  # noqa: BLE001 - an unreadable data file is reported by the checks
        pass
    ref = cfg.analysis.reference_arm
    if ref and ref not in arms:
        lines.append(f"note: analysis.reference_arm {ref!r} is not among the checkpoints' names "
                     "(no matched-gain comparison); override analysis.reference_arm=NAME")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- evaluating

@dataclass
class Outcome:
    """What evaluate_checkpoints did: the face turns it into the end line and exit status."""

    root: Path
    total: int
    reused: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (label, error line)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failed

    def message(self) -> str:
        if self.failed:
            head = (f"{len(self.failed)} of {self.total} checkpoints failed: "
                    + ", ".join(f"{label} ({err[:160]})" for label, err in self.failed))
        else:
            head = f"all {self.total} checkpoints evaluated" + (
                f" ({self.reused} reused from earlier)" if self.reused else "")
        if self.warnings:
            head += f"; {len(self.warnings)} warning(s): " + "; ".join(self.warnings)
        return head


class _LazyWeights(Mapping):
    """The tensors of a checkpoint's safetensors files, read one at a time (drift of a 7B
    model must not hold two copies of it in memory)."""

    def __init__(self, model_dir: Path) -> None:
        from safetensors import safe_open

        self._where: dict[str, Path] = {}
        for f in sorted(Path(model_dir).glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():  # noqa: SIM118 - safe_open has keys(), no __iter__
                    self._where[k] = f

    def __getitem__(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self._where[key]), framework="pt") as fh:
            return fh.get_tensor(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def _drift(base: str, tuned: Path) -> dict[str, Any] | None:
    """drift.json's content (forgetkit.drift) when both are local safetensors checkpoints with
    common tensor names; else None."""
    from forgetkit.drift import drift_record

    if not Path(base).is_dir():
        return None
    theta0, theta = _LazyWeights(Path(base)), _LazyWeights(tuned)
    if not theta0 or not theta or not set(theta0) & set(theta):
        return None
    return drift_record(theta0, theta)


def _post_hoc(cfg: Config, base: str, t: Target, scratch: Path) -> dict[str, Any]:
    """``{"wise": {alpha: scores}, "merge": {name: scores}}`` between the base and the
    checkpoint, as the runner scores them after training (``run`` = this checkpoint); each
    merged checkpoint is deleted once scored."""
    from forgetkit.regularizers.merge import (
        write_layerwise_checkpoint,
        write_task_vector_checkpoint,
    )
    from forgetkit.runner import evaluate

    ev = cfg.evaluation
    out: dict[str, Any] = {}
    for a in ev.wise_alphas:
        d = scratch / f"wise-{a}"
        try:
            write_layerwise_checkpoint(base, t.path, a, a, d)
            out.setdefault("wise", {})[str(a)] = evaluate(d, cfg)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    for m in ev.merge:
        d = scratch / f"merge-{m.name}"
        try:
            if m.kind == "layerwise":
                assert m.alpha_bottom is not None and m.alpha_top is not None  # config-checked
                write_layerwise_checkpoint(base, t.path, m.alpha_bottom, m.alpha_top, d)
            else:
                dirs = [t.path if c == MergeSpec.RUN else Path(c) for c in m.checkpoints]
                write_task_vector_checkpoint(base, dirs, m.scales, d)
            out.setdefault("merge", {})[m.name] = evaluate(d, cfg)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    return out


def score_one(cfg: Config, t: Target, root: Path, work: Path, base_given: str) -> dict[str, Any]:
    """Evaluate one checkpoint into ``work`` (a fresh folder): every file of the results
    contract; returns its summary (also written as summary.json)."""
    from forgetkit.results import IDENTITY, SUMMARY, environment, write_json, write_text
    from forgetkit.runner import before_scores, evaluate, without_items

    work.mkdir(parents=True, exist_ok=True)
    write_text(work / "config.yaml", saved_config(cfg))
    write_json(work / IDENTITY, identity_of(cfg, t))
    write_json(work / "env.json", environment())
    t0 = time.perf_counter()
    before, hit = before_scores(cfg, root)
    write_json(work / "eval_before.json", before)
    base = str(before.get("model") or cfg.model.name_or_path)
    t1 = time.perf_counter()
    after = evaluate(t.path, cfg)
    after["seconds"] = time.perf_counter() - t1
    after.update(_post_hoc(cfg, base, t, work))
    write_json(work / "eval_after.json", after)
    warnings = []
    try:
        drift = _drift(base, t.path)
        if drift is not None:
            write_json(work / "drift.json", drift)
    except Exception as e:  # noqa: BLE001 - a side file: never fails the scores
        warnings.append(f"no drift.json: {type(e).__name__}: {' '.join(str(e).split())[:200]}")
    summary = {"status": "ok", "arm": t.name, "seed": t.seed, "grid": {},
               "before_cache_hit": hit, "before": without_items(before),
               "after": without_items(after), "train": {}, "warnings": warnings,
               "source": {"tuned": str(t.path), "base": base_given, "base_checkpoint": base,
                          "tool": TOOL},
               "wall_time_s": time.perf_counter() - t0}
    write_json(work / SUMMARY, summary)
    return summary


def _swap(work: Path, final: Path, root: Path, stamp: str) -> None:
    """Put a complete result folder in place: the old one (if any) is set aside, the new one
    renamed in, then the old one deleted (a kill in between leaves it under _replaced/)."""
    from forgetkit.runner import REPLACED, _move, _prune_empty, _remove

    aside = None
    if final.exists():
        aside = root / REPLACED / stamp / final.relative_to(root)
        _move(final, aside, root)
    _move(work, final, root)
    if aside is not None:
        _remove(aside, root)
        _prune_empty(aside.parent, root)  # _replaced/ too, once empty


def _record_failure(t: Target, e: Exception, work: Path, root: Path, stamp: str,
                    head: str, outcome: Outcome) -> None:
    """A failed checkpoint: its traceback in run.log, a failed summary.json in its folder --
    unless a finished result is there (--force): that one is kept, the attempt goes to
    _failed/ for its log."""
    from forgetkit.results import RUN_LOG, SUMMARY, is_finished, write_json
    from forgetkit.runner import FAILED, _error_line, _move

    err = _error_line(e, work)
    log.error("%s: failed: %s", head, err)
    tb = "".join(traceback.format_exception(e))
    log.debug("%s: traceback:\n%s", head, tb)
    work.mkdir(parents=True, exist_ok=True)
    (work / RUN_LOG).write_text(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {head} failed:\n{tb}\n")
    write_json(work / SUMMARY, {"status": "failed", "arm": t.name, "seed": t.seed, "grid": {},
                                "error": err, "log": RUN_LOG,
                                "source": {"tuned": str(t.path), "tool": TOOL}})
    outcome.failed.append((t.label, err))
    if is_finished(t.dir):
        kept = root / FAILED / stamp / t.dir.relative_to(root)
        _move(work, kept, root)
        note = (f"the new evaluation failed, so the earlier result in {t.dir} was kept (the "
                f"failed attempt is in {kept})")
        log.warning("%s: %s", head, note)
        outcome.warnings.append(f"{t.label}: {note}")
    else:
        _swap(work, t.dir, root, stamp)


def evaluate_checkpoints(cfg: Config, targets: list[Target], root: Path, base_given: str,
                         force: bool = False, src: str = "") -> Outcome:
    """Score every checkpoint not already finished with the same identity; one checkpoint's
    failure is recorded and the others continue. Holds the results directory's lock
    throughout and re-checks the result folders under it (another process may have written
    one since the checks). Ends with the tables (forgetkit.results.summary.write_tables).

    Raises:
        ConfigError: a result folder that no longer matches (LockHeld: the lock is taken).
        RunInterrupted: Ctrl-C; finished results are kept; a rerun goes on.
    """
    from forgetkit.locking import dir_lock
    from forgetkit.preflight import raise_on_problems
    from forgetkit.results import is_finished
    from forgetkit.results.summary import write_tables
    from forgetkit.runner import RunInterrupted, _prune_empty, inside, write_plan_files

    outcome = Outcome(root, len(targets))
    with dir_lock(root, "results directory"):
        raise_on_problems(reuse_checks(cfg, targets, force), src or TOOL)
        write_plan_files(root, cfg, [{"arm": t.name, "seed": t.seed, "grid": {},
                                      "dir": str(t.dir), "tuned": str(t.path)}
                                     for t in targets], tool=TOOL, base=base_given)
        stamp = time.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}"
        for i, t in enumerate(targets, 1):
            head = f"[{i}/{len(targets)}] {t.label} ({t.path})"
            if is_finished(t.dir) and not force:
                log.info("%s: finished earlier with the same checkpoint and evaluation, reused "
                         "(--force re-evaluates)", head)
                outcome.reused += 1
                continue
            work = inside(root / TMP / stamp / t.name / f"seed-{t.seed}", root)
            log.info("%s: evaluating", head)
            try:
                s = score_one(cfg, t, root, work, base_given)
                _swap(work, t.dir, root, stamp)
                log.info("%s: done in %.0fs", head, s["wall_time_s"])
                for w in s["warnings"]:
                    log.warning("%s: %s", head, w)
                    outcome.warnings.append(f"{t.label}: {w}")
            except KeyboardInterrupt:
                raise RunInterrupted(
                    f"interrupted while evaluating checkpoint {i}/{len(targets)} ({t.label}); "
                    "finished results are kept; rerun the same command to go on") from None
            except Exception as e:  # recorded; the other checkpoints continue
                _record_failure(t, e, work, root, stamp, head, outcome)
            finally:
                if work.exists():
                    shutil.rmtree(work, ignore_errors=True)
                _prune_empty(work.parent, root)
            if i < len(targets):
                write_tables(root)  # the tables so far (a long evaluation shows its progress)
        write_tables(root)
    return outcome


# ----------------------------------------------------------------------------- the face

@guarded
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m forgetkit.evaluate",
        description="Score fine-tuned checkpoints (trained anywhere) against their base model "
                    "with forgetkit's evaluation suite; nothing is trained.")
    ap.add_argument("--config", required=True,
                    help="experiment/config YAML (its evaluation: and analysis: are used)")
    ap.add_argument("--base", required=True,
                    help="the base model: local HF directory, hub id or forgetkit alias")
    ap.add_argument("--tuned", action="append", required=True, metavar="NAME=PATH",
                    help="a fine-tuned HF checkpoint directory; repeat (same NAME = more seeds)")
    ap.add_argument("--out", help="results root (default results/<config name>-eval)")
    ap.add_argument("--force", action="store_true",
                    help="re-evaluate finished results (each replaced once its new one succeeded)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and checks only")
    ap.add_argument("--debug", action="store_true", help="show full tracebacks")
    ap.add_argument("overrides", nargs="*", help="evaluation.*/analysis.* key=value overrides")
    args = ap.parse_intermixed_args(argv)

    from forgetkit import assets  # noqa: F401  (registers model and dataset aliases)

    raw = read_yaml(args.config)
    over = parse_overrides(args.overrides)
    src = args.config + (" (with command-line overrides)" if over else "")
    cfg = suite_config(raw, args.base, over, src)
    root = Path(args.out) if args.out else default_out(cfg)
    targets, name_checks = plan_targets(parse_tuned(args.tuned), root)
    checks = check_all(cfg, targets, name_checks, root, args.force)
    from forgetkit.runner import show_plan

    if show_plan(describe(cfg, targets, root, args.force), checks, src, args.dry_run):
        return 0
    setup_logging(debug_enabled(argv))
    outcome = evaluate_checkpoints(cfg, targets, root, args.base, force=args.force, src=src)
    print(f"results: {root}/summary.csv", file=sys.stderr)
    print(f"forgetkit: {outcome.message()}", file=sys.stderr)
    return 0 if outcome.ok else 1


if __name__ == "__main__":
    sys.exit(main())
