"""Launch helpers shared by the 2-process CPU (gloo) tests: run ``tests/dist_worker.py`` under
torchrun or alone, and read what a run wrote."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "dist_worker.py"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           # a test session itself started by torchrun must not leak its rendezvous
           if k not in {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"}}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def run_worker(config: Path, nproc: int, *args: str, timeout: float = 420) -> str:
    """Train via tests/dist_worker.py (torchrun when nproc > 1); the combined output."""
    for _attempt in range(3):
        if nproc == 1:
            cmd = [sys.executable, str(WORKER), str(config), *args]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
                   "--master_addr=127.0.0.1", f"--master_port={_free_port()}", str(WORKER),
                   str(config), *args]
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)
        if proc.returncode == 0:
            return proc.stdout
        if "address already in use" not in proc.stdout.lower():  # else: port race, retry
            break
    tail = "\n".join(proc.stdout.splitlines()[-60:])
    pytest.fail(f"{' '.join(cmd)}\nexited with {proc.returncode}:\n{tail}", pytrace=False)


def reports(out_dir: Path) -> list[dict[str, Any]]:
    return [json.loads((out_dir / f"worker-rank{r}.json").read_text())
            for r in range(len(list(out_dir.glob("worker-rank*.json"))))]


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "model" / "model.safetensors"))


def step_logs(out_dir: Path) -> list[dict[str, Any]]:
    lines = (out_dir / "train_log.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, filter(None, lines)) if "loss" in r]


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)
