"""Experiment trackers (``output.trackers``): TensorBoard, Weights & Biases, Trackio, MLflow.

The trackers are accelerate's own classes (``accelerate.tracking``), driven directly rather
than through ``Accelerator(log_with=...)`` + ``init_trackers``: forgetkit's backends build their
``Accelerator`` before the output is known (and the FSDP/DeepSpeed paths only borrow it), and
accelerate's ``filter_trackers`` silently drops a tracker whose package is missing (a debug log
line), where forgetkit must refuse the config before training. Driving the classes directly
needs no Accelerator at all, so the same object serves the loop and the integrations.

Rank 0 only: the caller passes ``is_main``; every rank constructs a ``Trackers`` (which checks
the packages, so every rank fails alike on a missing one), only rank 0 starts and logs. The
trackers' own ``main_process_only`` gating is switched off per instance, since the gating is
done here. accelerate's tracker classes log through accelerate's logger, which needs an
accelerate ``PartialState``: forgetkit's backends (and a ``Trainer``) already created one through
their ``Accelerator``; otherwise construction creates it, on every rank (so a multi-process
launch initialises it collectively, as ``Accelerator()`` would).

What each tracker receives: ``config`` flattened to dotted keys (``training.lr``) with
str/int/float/bool values (None -> ``"None"``, lists and the like -> their JSON text) as its
hyperparameters, then per :meth:`Trackers.log` call the numeric values of one
``train_log.jsonl`` record (bools, None and strings dropped; ``step`` is the x axis, not a
scalar). TensorBoard writes to ``<run_dir>/tensorboard``; on resume (``start_step``) its
events past the resumed step are purged, as the loop drops those lines from train_log.jsonl.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from forgetkit.config import ConfigError

__all__ = ["TRACKERS", "TrackerUnavailable", "Trackers", "check_trackers", "flat_config"]

# name -> (pip package, availability check name in accelerate.utils)
TRACKERS: dict[str, tuple[str, str]] = {
    "tensorboard": ("tensorboard", "is_tensorboard_available"),
    "wandb": ("wandb", "is_wandb_available"),
    "trackio": ("trackio", "is_trackio_available"),
    "mlflow": ("mlflow", "is_mlflow_available"),
}


class TrackerUnavailable(ConfigError):
    """``output.trackers`` names a tracker whose package is not installed (or an unknown one)."""


def check_trackers(names: Iterable[str]) -> list[str]:
    """The distinct tracker names, in order; raise :class:`TrackerUnavailable` naming the pip
    package of every named tracker that is not installed (one message for all of them)."""
    import accelerate.utils as au

    wanted = list(dict.fromkeys(names))
    unknown = [n for n in wanted if n not in TRACKERS]
    if unknown:
        raise TrackerUnavailable(f"output.trackers: unknown tracker(s) {', '.join(unknown)}; "
                                 f"choose from {', '.join(TRACKERS)}")
    missing = [n for n in wanted if not getattr(au, TRACKERS[n][1])()]
    if missing:
        pkgs = " ".join(TRACKERS[n][0] for n in missing)
        raise TrackerUnavailable(
            f"output.trackers: {', '.join(missing)} named but not installed; pip install {pkgs} "
            "(or remove it from output.trackers)")
    return wanted


def flat_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, str | int | float | bool]:
    """Nested dicts -> dotted keys; values kept when str/int/float/bool, None -> ``"None"``,
    anything else (lists, paths) -> its JSON text (``str`` where JSON cannot say it)."""
    out: dict[str, str | int | float | bool] = {}
    for k, v in config.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping) and v:
            out.update(flat_config(v, key))
        elif isinstance(v, (str, bool, int, float)):
            out[key] = v
        elif v is None:
            out[key] = "None"
        else:
            try:
                out[key] = json.dumps(v)
            except TypeError:
                out[key] = str(v)
    return out


def _scalars(record: Mapping[str, Any]) -> dict[str, float | int]:
    """The numeric values of a log record: real numbers (not bools) and 0-d tensors/arrays."""
    out: dict[str, float | int] = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or v is None:
            continue
        if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # torch / numpy scalars
            v = v.item()
        if isinstance(v, bool):
            continue
        if isinstance(v, numbers.Integral):
            out[k] = int(v)
        elif isinstance(v, numbers.Real):
            out[k] = float(v)
    return out


def _make(name: str, project: str, run_dir: Path, run_name: str, start_step: int) -> Any:
    from accelerate import tracking as at

    if name == "tensorboard":
        kw: dict[str, Any] = {"purge_step": start_step + 1} if start_step > 0 else {}
        return at.TensorBoardTracker("tensorboard", run_dir, **kw)  # -> run_dir/tensorboard
    if name == "wandb":  # accelerate passes its first argument as wandb's project
        return at.WandBTracker(project, name=run_name, dir=str(run_dir))
    if name == "trackio":  # likewise trackio.init(project=..., name=...)
        return at.TrackioTracker(project, name=run_name)
    if name == "mlflow":  # MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME env vars still apply
        return at.MLflowTracker(experiment_name=project, run_name=run_name)
    raise TrackerUnavailable(f"output.trackers: unknown tracker {name!r}")


class Trackers:
    """The trackers of one training run.

    Args:
        names: tracker names (``output.trackers``): any of tensorboard, wandb, trackio, mlflow.
        project: the project / experiment name the trackers group runs under.
        run_dir: the run's output directory (TensorBoard logs go to ``run_dir/tensorboard``,
            wandb keeps its files under it).
        config: the run's config (a nested dict), stored as hyperparameters.
        is_main: rank 0; only it creates, logs to and finishes trackers.
        start_step: the optimizer step a resumed run continues from (0: a fresh run).
        run_name: the run's name in wandb / trackio / mlflow (default: ``run_dir``'s name).

    Raises:
        TrackerUnavailable: (every rank, at construction) a named tracker is not installed.
    """

    def __init__(self, names: Iterable[str], project: str, run_dir: Path,
                 config: Mapping[str, Any], is_main: bool, *, start_step: int = 0,
                 run_name: str | None = None) -> None:
        self.names = check_trackers(names)
        self.is_main = is_main
        self._trackers: list[Any] = []
        if not self.names:
            return
        from accelerate.state import PartialState

        PartialState()  # a no-op where an Accelerator exists (the loop, a Trainer)
        if not is_main:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        hparams = flat_config(config)
        try:
            for name in self.names:
                tracker = _make(name, project, run_dir, run_name or run_dir.name, start_step)
                tracker.main_process_only = False  # gated by is_main here, not by accelerate
                tracker.start()
                self._trackers.append(tracker)
                tracker.store_init_configuration(hparams)
        except BaseException:
            self.finish()
            raise

    @property
    def active(self) -> bool:
        """Whether this process logs anything (rank 0 with at least one tracker)."""
        return bool(self._trackers)

    def log(self, record: Mapping[str, Any], step: int) -> None:
        """Log the numeric values of ``record`` at optimizer step ``step`` (rank 0 only)."""
        if not self._trackers:
            return
        values = _scalars(record)
        if values:
            for tracker in self._trackers:
                tracker.log(values, step=int(step))

    def finish(self) -> None:
        """Close every tracker (flush and end its run); safe to call twice."""
        trackers, self._trackers = self._trackers, []
        errors: list[BaseException] = []
        for tracker in trackers:
            try:
                tracker.finish()
            except Exception as e:  # noqa: BLE001 - finish the others, then re-raise
                errors.append(e)
        if errors:
            raise errors[0]

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.finish()
