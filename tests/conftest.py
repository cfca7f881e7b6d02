"""Shared fixtures: tiny random-init models and tiny local data written by the tests."""

from __future__ import annotations

import copy
import json
import os
import random
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

ROOT = Path(__file__).resolve().parents[1]

# CI (CI=true) installs every optional dependency (`make install`): there a missing one is a
# broken install step and must fail, not skip. Elsewhere (a user without the DeepSpeed extra or
# the offline data packages) the tests that need it are skipped with the install command.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def skip_unless_installed(missing: bool, reason: str) -> None:
    """Skip the calling test when an optional dependency is missing, except under CI."""
    if missing and not IN_CI:
        pytest.skip(reason)

def sigint_default() -> None:
    """``preexec_fn`` of a subprocess a test interrupts: SIGINT back to its default action.
    A process started in the background by a non-interactive shell (a CI runner, ``cmd &``)
    inherits SIGINT *ignored*, and Python then never raises KeyboardInterrupt: a Ctrl-C test
    must not depend on how the suite was started."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture
def ctrl_c_raises():
    """In this process, SIGINT raises KeyboardInterrupt (Python's own handler) for the test,
    even where the suite inherited SIGINT ignored (see ``sigint_default``)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


TINY_LLAMA = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
}


def write_instruction_data(path: Path, n: int = 64, seed: int = 0) -> Path:
    """Variable-length 'reverse the word' records (prompt masked, short responses)."""
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    with path.open("w") as f:
        for _ in range(n):
            w = "".join(rng.choice(letters) for _ in range(rng.randint(3, 24)))
            f.write(json.dumps({"instruction": "Reverse.", "input": w, "output": w[::-1]}) + "\n")
    return path


def tiny_config_dict(tmp_path: Path, **sections: Any) -> dict[str, Any]:
    data = tmp_path / "task.jsonl"
    if not data.exists():
        write_instruction_data(data)
    cfg: dict[str, Any] = {
        "name": "tiny",
        "seed": 0,
        "model": {"random_init": copy.deepcopy(TINY_LLAMA), "tokenizer": "byte"},
        "data": {"train": {"path": str(data), "format": "instruction"},
                 "validation_fraction": 0.125, "max_length": 256},
        "training": {"micro_batch_size": 4, "gradient_accumulation_steps": 1, "max_steps": 4,
                     "lr": 1e-3, "warmup_steps": 1, "log_every": 1, "resume": True},
        "output": {"dir": str(tmp_path / "run"), "save_model": True},
    }
    for sec, vals in sections.items():
        if isinstance(vals, dict) and isinstance(cfg.get(sec), dict):
            cfg[sec].update(vals)
        else:
            cfg[sec] = vals
    return cfg


@pytest.fixture
def tiny_cfg(tmp_path):
    from forgetkit.config import config_from_dict

    def make(**sections: Any):
        return config_from_dict(tiny_config_dict(tmp_path, **sections), "test")

    return make
