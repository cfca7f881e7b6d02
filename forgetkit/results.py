"""The results contract: what a run writes, where, and the tables built from it.

Layout (read by ``forgetkit.report`` and by pandas)::

    results/<experiment>/
        plan.json                      arms x seeds, resolved at launch
        summary.csv                    one row per run (see ``summary_rows``)
        summary_agg.csv                per arm: mean and 95 % CI half-width over seeds
        _cache/eval_before-<hash>.json before-scores, shared by runs with the same base + eval
        <arm>/seed-<s>/
            config.yaml  env.json  train_log.jsonl  train_result.json
            eval_before.json  eval_after.json  summary.json
            model/ checkpoints/        kept only with experiment.keep_checkpoints

Every file is written atomically (temporary file, then rename): a kill never leaves half a file.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

SUMMARY = "summary.json"


def write_json(path: Path, obj: Any) -> None:
    """Atomic JSON write (NaN becomes null so every JSON reader accepts the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(_clean(obj), fh, indent=1, sort_keys=False)
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)


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
