"""Read records from local files or the Hugging Face hub, split them, and tokenise them."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from forgetkit.config import ConfigError, DatasetSpec
from forgetkit.data.templates import Example, FormatError, pack_examples, tokenize_record

log = logging.getLogger("forgetkit")

# Dataset aliases: name -> function returning a list of records (filled by forgetkit.assets).
ALIASES: dict[str, Callable[[DatasetSpec], list[dict[str, Any]]]] = {}

_LOCAL_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _read_local(path: Path) -> list[dict[str, Any]]:
    kind = _LOCAL_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unsupported data file type {path.suffix!r}; expected one of "
                          f"{', '.join(_LOCAL_KINDS)}")
    if kind == "json":
        text = path.read_text()
        stripped = text.lstrip()
        if stripped.startswith("["):
            return list(json.loads(text))
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    import pandas as pd

    df = pd.read_csv(path) if kind == "csv" else pd.read_parquet(path)
    return df.to_dict(orient="records")


def load_records(spec: DatasetSpec) -> list[dict[str, Any]]:
    """All records of a source, in file order (no shuffling, no limit)."""
    if spec.path is not None:
        if spec.path in ALIASES:
            return ALIASES[spec.path](spec)
        path = Path(spec.path)
        if not path.is_file():
            raise ConfigError(f"data path {spec.path!r}: no such file (and not a dataset alias; "
                              f"known aliases: {', '.join(sorted(ALIASES)) or 'none'})")
        return _read_local(path)
    import datasets  # the hub path, for users with network access

    ds = datasets.load_dataset(spec.name, spec.config, split=spec.split)
    return [dict(r) for r in ds]


def select(records: list[dict[str, Any]], spec: DatasetSpec, seed: int) -> list[dict[str, Any]]:
    """Apply the seeded shuffle and ``limit`` of a spec."""
    if spec.limit is None:
        return records
    if spec.shuffle_before_limit:
        idx = np.random.default_rng([seed, 0xDA7A]).permutation(len(records))[: spec.limit]
        return [records[i] for i in sorted(idx)]
    return records[: spec.limit]


def split_records(records: list[dict[str, Any]], fraction: float, seed: int
                  ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic seeded (train, validation) split; validation gets round(fraction*n) >= 1."""
    n = len(records)
    if fraction <= 0 or n < 2:
        return records, []
    n_val = max(1, round(fraction * n))
    perm = np.random.default_rng([seed, 0x5B17]).permutation(n)
    val = set(perm[:n_val].tolist())
    return ([r for i, r in enumerate(records) if i not in val],
            [r for i, r in enumerate(records) if i in val])


def build_examples(records: list[dict[str, Any]], spec: DatasetSpec, tokenizer: Any,
                   max_length: int, train_on_prompt: bool, packed: bool = False,
                   source: int = 0) -> list[Example]:
    """Tokenise records; records left without any target token after truncation are dropped."""
    out: list[Example] = []
    dropped = 0
    for i, r in enumerate(records):
        try:
            ex = tokenize_record(r, spec.format, spec.fields, tokenizer, max_length,
                                 train_on_prompt, source)
        except FormatError as e:
            where = spec.path or spec.name
            raise ConfigError(f"data {where!r} record {i}: {e} (map columns with "
                              f"'fields:' in the data spec)") from None
        if ex is None:
            dropped += 1
        else:
            out.append(ex)
    if dropped:
        log.warning("%d of %d examples from %s had no target token within max_length=%d and "
                    "were dropped", dropped, len(records), spec.path or spec.name, max_length)
    if packed:
        if spec.format != "text":
            raise ConfigError("data.batching: 'packed' is for format: text (continued "
                              "pre-training); use length_grouped for instruction/chat data")
        out = pack_examples(out, max_length)
    return out
