"""The results contract: what a run writes, where, and the tables built from it.

Layout (read by ``forgetkit.report`` and by pandas)::

    results/<experiment>/
        plan.json                      arms x seeds, resolved at launch
        summary.csv                    one row per run (see ``summary_rows``)
        summary_agg.csv                per arm: mean and 95 % CI half-width over seeds
        _cache/eval_before-<hash>.json before-scores, shared by runs with the same base + eval
        _replaced/<stamp>/<arm>/seed-<s>/  a finished run set aside by --force until its
                                       replacement has succeeded
        <arm>/seed-<s>/
            config.yaml  identity.json env.json  train_log.jsonl  train_result.json
            eval_before.json  eval_after.json  summary.json
            run.log                    the traceback of a failed attempt
            model/ checkpoints/        kept only with experiment.keep_checkpoints
        sequence_matrix.csv sequence_summary.csv   a task sequence (``sequence:``): long-form
                                       R and its measures (forgetkit.results.sequence)
        <arm>/seed-<s>/                a task sequence's arm x seed:
            sequence.json              R, base scores, general scores, BWT/FWT/...
            stage-<k>-<name>/          one run per stage (the files above + ``stage`` in
                                       summary.json); not rows of summary.csv

Every file is written atomically (temporary file, then rename): a kill never leaves half a file.
"""

from __future__ import annotations

import errno
import json
import math
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"
IDENTITY = "identity.json"  # run_identity(cfg) of the run: what a rerun must match to reuse it
RUN_LOG = "run.log"  # the full traceback of a failed attempt (the summary keeps one line)


def free_space(path: Path) -> str:
    """``"N MB free on /mount/point"`` for the file system holding ``path`` (for disk-full
    messages: the user needs to know which disk and how much is left)."""
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        free = shutil.disk_usage(p).free
    except OSError:
        return "free space unknown"
    mount = p.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"{free / 2**20:.0f} MB free on {mount}"


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC (no space) or EDQUOT (quota): the disk, not the data, is the problem."""
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def disk_full_line(e: OSError, path: Path | str | None = None) -> str:
    """One line for a disk-full error: its own message when it carries one (raised by
    :func:`disk_full_error` or the training loop's DiskFull), else "disk full while writing X:
    N MB free on /p (No space left on device)"."""
    own = e.strerror or str(e)
    if e.strerror and e.strerror != os.strerror(e.errno or errno.ENOSPC):
        return own
    where = getattr(e, "filename", None) or path or os.getcwd()
    return f"disk full while writing {where}: {free_space(Path(where))} ({own})"


def disk_full_error(path: Path, e: OSError) -> OSError:
    """The same error, named as what it is: "disk full while writing X: N MB free on /p"."""
    return OSError(e.errno, f"disk full while writing {path}: {free_space(path)}")


def _atomic_write(path: Path, write: Any) -> None:
    """Write to ``<name>*.tmp`` beside ``path``, then rename over it: a kill never leaves half a
    file, and a failed write (disk full) removes its temporary file instead of leaving it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    try:
        with open(tmp, "w") as fh:  # opened by name: fh.name says which file a failure hit
            write(fh)
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if is_disk_full(e):
            raise disk_full_error(path, e) from e  # type: ignore[arg-type]
        raise


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (NaN becomes null so every JSON reader accepts the file)."""
    clean = _clean(obj)
    _atomic_write(path, lambda fh: json.dump(clean, fh, indent=1, sort_keys=False))


def write_text(path: Path, text: str) -> None:
    """Atomic text write (see :func:`_atomic_write`)."""
    _atomic_write(path, lambda fh: fh.write(text))


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())


def _clean(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    return obj


def run_dir(results_root: Path, arm: str, seed: int) -> Path:
    return results_root / arm / f"seed-{seed}"


def is_finished(rdir: Path) -> bool:
    p = rdir / SUMMARY
    if not p.exists():
        return False
    try:
        return read_json(p).get("status") == "ok"
    except (json.JSONDecodeError, OSError):
        return False


def git_revision(cwd: Path | None = None) -> str | None:
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                             text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=cwd, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (rev + ("-dirty" if dirty else "")) if rev else None


def environment() -> dict[str, Any]:
    """Versions, git revision and device: saved as env.json beside every run."""
    import importlib.metadata as md

    import torch

    def ver(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    dev: dict[str, Any] = {"cuda": torch.cuda.is_available(), "cpu": platform.processor() or
                           platform.machine(), "cpu_count": os.cpu_count()}
    if torch.cuda.is_available():
        dev["gpu"] = torch.cuda.get_device_name(0)
        dev["gpu_count"] = torch.cuda.device_count()
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "forgetkit": ver("forgetkit"),
        "torch": torch.__version__,
        "transformers": ver("transformers"),
        "accelerate": ver("accelerate"),
        "lm_eval": ver("lm_eval") or ver("lm-eval"),
        "datasets": ver("datasets"),
        "deepspeed": ver("deepspeed"),
        "git_revision": git_revision(Path(__file__).resolve().parent),
        "device": dev,
    }
