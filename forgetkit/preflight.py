"""Preflight: verify every input a config names before anything runs.

The config schema (:mod:`forgetkit.config`) checks a config's *shape*; this module checks what
the config points at: every data file opened and parsed, the model (path, alias, GGUF file,
``random_init``), the lm-eval task names and ``include_path``, the device, the launcher, and
whether each metric can apply to its data. A typo in any of them used to surface minutes in --
after the base evaluation and a training launch -- as a traceback; here it is one line, found in
seconds, before anything is evaluated, trained or deleted.

:func:`preflight` runs every check (it does not stop at the first problem) and returns them all,
so ``forgetkit.run --dry-run`` can show what was verified; :func:`raise_on_problems` turns the
failed ones into one :class:`ConfigError` with one line per problem. Nothing here loads model
weights or trains: a ``random_init`` model is built on the meta device, an alias is resolved
without converting its GGUF file, a hub id is looked up in the local cache only.

``cache`` lets a caller check many runs that share inputs (the arms and seeds of an experiment):
a data file, model or task already checked is not checked again.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from forgetkit.config import ConfigError, DatasetSpec, MetricSpec, regularizer_data_specs

if TYPE_CHECKING:
    from forgetkit.config import Config

__all__ = ["Check", "preflight", "raise_on_problems", "data_specs"]


@dataclass
class Check:
    """One thing verified (shown by ``forgetkit.run --dry-run``).

    ``what`` says what was checked and what was found ("data.train: x.jsonl (3,087 records)");
    ``problem`` is one line, ``file:line: what is wrong`` where it applies, empty when ``ok``.
    """

    what: str
    ok: bool
    problem: str = ""


def _run(what: str, fn: Callable[[], str]) -> tuple[bool, str]:
    """(ok, what was found or the problem) of one check function.

    ``fn`` returns what it found, or raises ConfigError with the problem. Any other exception
    is a problem too (one line, never a traceback): preflight must not itself become the crash
    it exists to prevent.
    """
    try:
        return True, fn()
    except ConfigError as e:
        return False, str(e)
    except Exception as e:  # noqa: BLE001 - reported, not swallowed
        return False, f"{what}: {type(e).__name__}: {' '.join(str(e).split())}"


def _check(what: str, result: tuple[bool, str]) -> Check:
    ok, text = result
    if ok:
        return Check(f"{what}: {text}" if text else what, True)
    return Check(what, False, text)


def _guard(what: str, fn: Callable[[], str]) -> Check:
    return _check(what, _run(what, fn))


def _cached(cache: dict[Any, Any], key: Any, what: str, fn: Callable[[], str]) -> Check:
    """``_guard`` once per ``key`` (an input shared by many runs); reused under each label."""
    if key not in cache:
        cache[key] = _run(what, fn)
    return _check(what, cache[key])


# ----------------------------------------------------------------------------- data

def data_specs(cfg: Config, evaluation: bool = True) -> Iterator[tuple[str, DatasetSpec]]:
    """(dotted key, spec) of every data source the config reads, in config order."""
    yield "data.train", cfg.data.train
    if cfg.data.validation is not None:
        yield "data.validation", cfg.data.validation
    yield from regularizer_data_specs(cfg)  # data.replay.data, EWC fisher_data, KL data
    if evaluation:
        for key, spec in _metrics(cfg):
            if spec.data is not None:
                yield f"{key}.data", spec.data


def _metrics(cfg: Config) -> Iterator[tuple[str, MetricSpec]]:
    for group in ("task", "general"):
        for i, spec in enumerate(getattr(cfg.evaluation, group)):
            yield f"evaluation.{group}[{i}]", spec


def _check_data(key: str, spec: DatasetSpec) -> str:
    from forgetkit.data.sources import check_source

    return check_source(spec, key)


# ----------------------------------------------------------------------------- model

def _check_model(cfg: Config) -> str:
    from forgetkit.models import check_model

    return check_model(cfg.model)


# ----------------------------------------------------------------------------- evaluation

def _check_metric_data(key: str, spec: MetricSpec) -> str:
    """A metric whose kind cannot apply to its data's format (found by the harness minutes in)."""
    if spec.data is None:
        return ""
    fmt = spec.data.format
    if spec.kind == "perplexity" and fmt != "text":
        raise ConfigError(f"{key}: a perplexity metric scores raw text, but its data has "
                          f"format: {fmt}; use kind: answer_nll for {fmt} data, or text data")
    if spec.kind in ("answer_nll", "generation") and fmt == "text":
        raise ConfigError(f"{key}: a {spec.kind} metric needs a prompt and a response, but its "
                          "data has format: text; use kind: perplexity, or instruction/chat data")
    return f"{spec.kind} on {fmt} data"


def _check_task(key: str, spec: MetricSpec) -> str:
    from forgetkit.eval.lmeval import check_task_name

    # TaskManagers and lm-eval's task index are cached for the whole process by lmeval
    return check_task_name(spec.task or "", spec.include_path, key)


# ----------------------------------------------------------------------------- device

def _cuda_count() -> int:
    """Number of usable CUDA devices (a seam tests replace)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# Launchers that start training on other machines: this machine's devices say nothing there.
_REMOTE_LAUNCHERS = {"srun", "salloc", "sbatch", "mpirun", "mpiexec", "ssh", "pdsh"}


def _check_device(cfg: Config, evaluation: bool, launcher: list[str]) -> str:
    n = _cuda_count()
    remote = bool(launcher) and Path(launcher[0]).name in _REMOTE_LAUNCHERS
    cpu = cfg.distributed.cpu if cfg.distributed.cpu is not None else n == 0
    problems = []
    if remote:
        pass  # training runs elsewhere; only the evaluation device (this process) is checked
    elif not cpu and n == 0:
        problems.append("distributed.cpu: false asks for CUDA, but this machine has no CUDA "
                        "device; set distributed.cpu: true (or leave it unset)")
    mp = cfg.training.mixed_precision
    if not remote and mp == "fp16" and (cpu or n == 0):
        problems.append("training.mixed_precision: fp16 needs a CUDA device (on CPU accelerate "
                        "ignores or rejects it late); use bf16 or no")
    if cfg.distributed.strategy == "deepspeed" and importlib.util.find_spec("deepspeed") is None:
        problems.append("distributed.strategy: deepspeed, but the deepspeed package is not "
                        "installed; pip install 'forgetkit[deepspeed]' (or use ddp/fsdp)")
    found = f"{n} CUDA device(s)" if n else "CPU only"
    if evaluation:
        dev = cfg.evaluation.device
        if dev != "auto":
            import torch

            try:
                d = torch.device(dev)
            except (RuntimeError, ValueError):
                problems.append(f"evaluation.device: {dev!r} is not a device; use auto, cpu, "
                                "cuda or cuda:N")
            else:
                if d.type == "cuda" and (n == 0 or (d.index or 0) >= n):
                    problems.append(f"evaluation.device: {dev!r}, but this machine has {n} "
                                    "CUDA device(s); use auto or cpu")
                elif d.type not in ("cpu", "cuda"):
                    problems.append(f"evaluation.device: {dev!r}: only cpu and cuda are "
                                    "supported; use auto, cpu or cuda:N")
    if problems:
        raise _Problems(problems)
    if remote:
        return f"{found} here; training devices not checked (launched through {launcher[0]})"
    return f"{found}; training on {'CPU' if cpu else 'CUDA'}" + (
        f", mixed precision {mp}" if mp != "no" else "")


class _Problems(ConfigError):
    """Several independent problems from one check (each becomes its own failed Check)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def _device_checks(cfg: Config, evaluation: bool, launcher: list[str]) -> list[Check]:
    try:
        return [Check(f"device: {_check_device(cfg, evaluation, launcher)}", True)]
    except _Problems as e:
        return [Check("device", False, p) for p in e.problems]
    except Exception as e:  # noqa: BLE001 - as in _run: a problem, never a traceback
        return [Check("device", False, f"device: {type(e).__name__}: {' '.join(str(e).split())}")]


# ----------------------------------------------------------------------------- launcher

def _check_launcher(launcher: list[str]) -> str:
    if not launcher:
        return "this Python, one process"
    exe = launcher[0]
    found = shutil.which(exe)
    if found is None:
        beside = Path(sys.executable).parent / exe
        hint = (f"; it is in this Python's environment: activate it or give the full path "
                f"{str(beside)!r}" if beside.is_file() else
                "; install it, give its full path, or use [python, -m, torch.distributed.run, ...]")
        raise ConfigError(f"experiment.launcher: {exe!r} is not on PATH{hint}")
    if "-m" in launcher[1:] and Path(exe).name.startswith("python"):
        i = launcher.index("-m", 1)
        if i + 1 >= len(launcher):
            raise ConfigError("experiment.launcher: '-m' without a module name")
        mod = launcher[i + 1]
        if Path(found).resolve() == Path(sys.executable).resolve():
            try:
                spec = importlib.util.find_spec(mod)
            except (ImportError, ValueError):
                spec = None
            if spec is None:
                raise ConfigError(f"experiment.launcher: module {mod!r} is not importable by "
                                  f"{exe}; install it or fix the name")
    return " ".join(launcher) + f" ({found})"


# ----------------------------------------------------------------------------- entry points

def preflight(cfg: Config, *, launcher: list[str] | None = None, evaluation: bool = True,
              cache: dict[Any, Any] | None = None) -> list[Check]:
    """Check every input of ``cfg``; return one :class:`Check` per thing verified.

    Args:
        cfg: a validated config (one run).
        launcher: the training launcher; default ``cfg.experiment.launcher``.
        evaluation: also check the evaluation metrics (their data, tasks, device).
        cache: shared between calls for runs with common inputs (each checked once).

    Returns:
        Every check, passed or failed, in a stable order. Nothing stops at the first problem.
    """
    from forgetkit import assets  # noqa: F401  (registers the model and dataset aliases)

    cache = {} if cache is None else cache
    checks: list[Check] = []
    for key, spec in data_specs(cfg, evaluation):
        ident = ("data", spec.path, spec.name, spec.config, spec.split, spec.format,
                 tuple(sorted(spec.fields.items())))
        checks.append(_cached(cache, ident, key, lambda k=key, s=spec: _check_data(k, s)))
    model_key = ("model", repr(cfg.model))
    checks.append(_cached(cache, model_key, "model", lambda: _check_model(cfg)))
    if evaluation:
        for key, spec in _metrics(cfg):
            if spec.kind == "lm_eval":
                ident = ("task", spec.task, spec.include_path)
                checks.append(_cached(cache, ident, f"{key} task {spec.task!r}",
                                      lambda k=key, s=spec: _check_task(k, s)))
            else:
                checks.append(_guard(f"{key} ({spec.name})",
                                     lambda k=key, s=spec: _check_metric_data(k, s)))
    lau = list(cfg.experiment.launcher if launcher is None else launcher)
    checks.extend(_device_checks(cfg, evaluation, lau))
    checks.append(_cached(cache, ("launcher", tuple(lau)), "launcher",
                          lambda: _check_launcher(lau)))
    if evaluation:
        for i, m in enumerate(cfg.evaluation.merge):
            for j, ck in enumerate(m.checkpoints):
                if ck != "run":
                    checks.append(_guard(f"evaluation.merge[{i}].checkpoints[{j}]",
                                         lambda c=ck, k=f"evaluation.merge[{i}].checkpoints[{j}]":
                                         _check_checkpoint_dir(k, c)))
    if cfg.training.freeze != type(cfg.training.freeze)():
        checks.append(_guard("training.freeze", lambda: _check_freeze(cfg)))
    if cfg.training.lora is not None:
        checks.append(_cached(cache, ("lora", repr(cfg.model), repr(cfg.training.lora),
                                      cfg.distributed.strategy, repr(cfg.training.freeze)),
                              "training.lora", lambda: _check_lora(cfg)))
    if cfg.output.trackers:
        names = tuple(cfg.output.trackers)
        checks.append(_cached(cache, ("trackers", names), "output.trackers",
                              lambda: _check_trackers(list(names))))
    return checks


def _check_checkpoint_dir(key: str, path: str) -> str:
    """A fine-tuned checkpoint a merge reads: a directory with safetensors weights."""
    p = Path(path)
    if not p.is_dir() or not any(p.glob("*.safetensors")):
        raise ConfigError(f"{key}: {path} is not a checkpoint directory with *.safetensors "
                          "weights (a merge reads it after training)")
    return f"{key}: {path}"


def _check_freeze(cfg: Config) -> str:
    """training.freeze's config-only checks (patterns, combinations); the model-dependent ones
    (a pattern matching no parameter) run when the model loads, before anything is written."""
    from forgetkit.train.freeze import check_freeze

    check_freeze(cfg)
    f = cfg.training.freeze
    parts = (["embeddings"] if f.embeddings else []) + (
        [f"layers 0-{f.bottom_layers - 1}"] if f.bottom_layers else []) + (
        [f"{len(f.patterns)} patterns"] if f.patterns else [])
    return "freeze " + ", ".join(parts)


def _check_lora(cfg: Config) -> str:
    """LoRA's combinations (strategy, freezing) and target modules, on a meta-device model."""
    from forgetkit.train.lora import check_lora_config, check_lora_targets

    check_lora_config(cfg)
    found = check_lora_targets(cfg)
    return found if isinstance(found, str) and found else f"LoRA r={cfg.training.lora.r}"


def _check_trackers(names: list[str]) -> str:
    """Every experiment tracker's package is importable (a missing one fails here, not after
    the before-evaluation)."""
    from forgetkit.train.tracking import check_trackers

    check_trackers(names)
    return ", ".join(names)


def raise_on_problems(checks: list[Check], src: str) -> None:
    """Raise one ConfigError listing every failed check, one line each (nothing when all pass).

    The message starts with ``src`` (the config file) on every line so each stands alone.
    """
    problems = [c.problem or c.what for c in checks if not c.ok]
    if problems:
        raise ConfigError("\n".join(f"{src}: {p}" for p in dict.fromkeys(problems)))
