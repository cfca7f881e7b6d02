"""Read records from local files or the Hugging Face hub, split them, and tokenise them.

Reading validates: :func:`load_records` decodes (UTF-8, a leading BOM accepted), parses
(JSON array, JSON Lines, CSV, Parquet) and checks every record against its format's fields
before anything is tokenised, and every problem is one ConfigError line, ``file:line: what is
wrong``. Training, the Fisher, replay and evaluation all read through it, so they fail alike;
:func:`check_source` is the same check for preflight (aliases and hub datasets without
downloading).
"""

from __future__ import annotations

import difflib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from forgetkit.config import ConfigError, DatasetSpec
from forgetkit.data.templates import (
    Example,
    FormatError,
    check_record,
    pack_examples,
    tokenize_record,
)

log = logging.getLogger("forgetkit")

# Dataset aliases: name -> function returning a list of records (filled by forgetkit.assets).
ALIASES: dict[str, Callable[[DatasetSpec], list[dict[str, Any]]]] = {}

_LOCAL_KINDS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _decode(path: Path) -> str:
    """The file's text: UTF-8, with a leading byte-order mark accepted (editors on Windows write
    one; it carries no content). Anything that is not UTF-8 is named with its line and byte."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                          f"{col}); re-save the file as UTF-8") from None


def _json_records(path: Path, text: str) -> tuple[list[dict[str, Any]], list[int]]:
    """(records, 1-based line of each) of a JSON array or JSON Lines file."""
    if not text.strip():
        raise ConfigError(f"{path}: empty file (no records)")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})"
                              ) from None
        if not isinstance(data, list):  # pragma: no cover - '[' always parses to a list
            raise ConfigError(f"{path}: expected a JSON list of objects")
        for i, r in enumerate(data):
            if not isinstance(r, dict):
                raise ConfigError(f"{path}: item {i + 1} of the JSON list is "
                                  f"{type(r).__name__}, not an object; expected a list of "
                                  "objects ([{...}, ...])")
        if not data:
            raise ConfigError(f"{path}: the JSON list is empty (no records)")
        return data, _array_item_lines(text, len(data))
    records, lines = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError as e:
            hint = ("; a .json file must hold one list of objects, a .jsonl file one object per "
                    "line" if n == 1 and line.strip() == "{" else "")
            raise ConfigError(f"{path}:{n}: not valid JSON: {e.msg} (column {e.colno}){hint}"
                              ) from None
        if not isinstance(r, dict):
            raise ConfigError(f"{path}:{n}: expected a JSON object per line, got "
                              f"{type(r).__name__}")
        records.append(r)
        lines.append(n)
    return records, lines


def _array_item_lines(text: str, n: int) -> list[int]:
    """1-based line on which each of the ``n`` items of a (valid) JSON array starts.

    json keeps no positions, so the array is walked once more with ``raw_decode``; 0 for all
    when the walk disagrees (then the item number is the locator)."""
    dec = json.JSONDecoder()
    pos = text.index("[") + 1
    line, counted = 1 + text.count("\n", 0, pos), pos
    out = []
    try:
        for _ in range(n):
            while text[pos] in " \t\r\n,":
                pos += 1
            line += text.count("\n", counted, pos)
            counted = pos
            out.append(line)
            _, pos = dec.raw_decode(text, pos)
    except (ValueError, IndexError):
        return [0] * n
    return out


def read_located(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, locator of each: ``file:line`` or ``file: item N``) of a local data file.

    Raises ConfigError (one line naming the file and, where it applies, the line) for a file
    that cannot be read, decoded or parsed, or holds no records.
    """
    kind = _LOCAL_KINDS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(f"{path}: unsupported data file type {path.suffix!r}; expected one of "
                          f"{', '.join(_LOCAL_KINDS)}")
    if kind == "json":
        records, lines = _json_records(path, _decode(path))
        nested = [k for k, v in records[0].items() if isinstance(v, list) and v
                  and all(isinstance(x, dict) for x in v)] if len(records) == 1 else []
        if path.suffix.lower() == ".json" and nested:
            raise ConfigError(f"{path}: expected a JSON list of objects ([{{...}}, ...]) or one "
                              f"object per line; this file is one object whose records seem to "
                              f"be under {nested[0]!r}: save that list alone")
        return records, [f"{path}:{n}" if n else f"{path}: item {i + 1}"
                         for i, n in enumerate(lines)]
    import pandas as pd

    try:
        if kind == "csv":
            df = pd.read_csv(path, encoding="utf-8-sig")
        else:
            df = pd.read_parquet(path)
    except UnicodeDecodeError:
        _decode(path)  # names the line and byte
        raise
    except pd.errors.EmptyDataError:
        raise ConfigError(f"{path}: empty file (no records)") from None
    except Exception as e:  # noqa: BLE001 - pandas/pyarrow raise many types for a bad file
        raise ConfigError(f"{path}: cannot read as {kind}: {' '.join(str(e).split())}"
                          ) from None
    if df.empty:
        raise ConfigError(f"{path}: no records (only a header?)")
    records = df.to_dict(orient="records")
    off = 2 if kind == "csv" else 1  # csv: line 1 is the header
    return records, ([f"{path}:{i + off}" for i in range(len(records))] if kind == "csv"
                     else [f"{path}: row {i + 1}" for i in range(len(records))])


def _resolve_path(spec: DatasetSpec, key: str | None = None) -> Path:
    assert spec.path is not None
    path = Path(spec.path)
    if not path.is_file():
        what = "is a directory, not a file" if path.is_dir() else "no such file"
        if not path.is_absolute() and not path.is_dir():
            what += f" (relative paths are read from the current directory, {os.getcwd()})"
        near = difflib.get_close_matches(spec.path, sorted(ALIASES), n=1, cutoff=0.6)
        hint = (f"; did you mean the dataset alias {near[0]!r}?" if near else
                f" (and not a dataset alias; known aliases: {', '.join(sorted(ALIASES)) or 'none'})")
        raise ConfigError(f"{key + '.path' if key else 'data path'} {spec.path!r}: {what}{hint}")
    return path


def load_located(spec: DatasetSpec) -> tuple[list[dict[str, Any]], list[str]]:
    """(records, locator of each) of a source, every record checked against the spec's format.

    The one place data files are parsed, so training, the Fisher, replay and evaluation all
    fail with the same one-line ``file:line: what is wrong`` ConfigError.
    """
    if spec.path is not None and spec.path in ALIASES:
        records = ALIASES[spec.path](spec)
        locs = [f"dataset alias {spec.path!r} (split {spec.split}) record {i + 1}"
                for i in range(len(records))]
    elif spec.path is not None:
        records, locs = read_located(_resolve_path(spec))
    else:
        import datasets  # the hub path, for users with network access

        try:
            ds = datasets.load_dataset(spec.name, spec.config, split=spec.split)
        except Exception as e:  # noqa: BLE001 - network, name, config, split: one line each
            raise ConfigError(f"hub dataset {spec.name!r} (config {spec.config}, split "
                              f"{spec.split}): cannot load: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None
        records = [dict(r) for r in ds]
        locs = [f"hub dataset {spec.name!r} (split {spec.split}) record {i + 1}"
                for i in range(len(records))]
    if not records:
        raise ConfigError(f"data {spec.path or spec.name!r}: no records")
    for r, loc in zip(records, locs, strict=True):
        problem = check_record(r, spec.format, spec.fields)
        if problem:
            raise ConfigError(f"{loc}: {problem} (format: {spec.format}; map columns with "
                              "'fields:' in the data spec)")
    return records, locs


def load_records(spec: DatasetSpec) -> list[dict[str, Any]]:
    """All records of a source, in file order (no shuffling, no limit), each checked.

    Raises ConfigError naming the file and line of the first record that cannot be used.
    """
    return load_located(spec)[0]


def hub_dataset_cached(name: str) -> bool:
    """Whether a hub dataset has anything in the local caches (datasets' or the hub's)."""
    from huggingface_hub.constants import HF_HUB_CACHE

    folder = "datasets--" + name.replace("/", "--")
    if (Path(HF_HUB_CACHE) / folder).is_dir():
        return True
    try:
        from datasets import config as ds_config

        root = Path(ds_config.HF_DATASETS_CACHE)
    except Exception:  # noqa: BLE001 - datasets missing or broken: nothing cached
        return False
    stem = name.replace("/", "___")
    return any(root.glob(f"{stem}*")) or any(root.glob(f"*/{stem}*"))


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE or HF_DATASETS_OFFLINE forbids the network."""
    on = ("", "0", "false", "no", "off")
    return any(os.environ.get(k, "").lower() not in on
               for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


def check_source(spec: DatasetSpec, key: str = "data") -> str:
    """Verify a data source without training: a local file is read and every record checked;
    an alias resolves to installed files; a hub dataset is accepted online, and offline only
    when it is in the local cache. Returns a one-line description; raises ConfigError."""
    if spec.path is not None and spec.path in ALIASES:
        check = ALIAS_CHECKS.get(spec.path)
        if check is not None:
            return f"dataset alias {spec.path!r} ({check(spec)})"
        records, _ = load_located(spec)
        return f"dataset alias {spec.path!r} ({len(records):,} records)"
    if spec.path is not None:
        _resolve_path(spec, key)  # a missing file named with its key
        records, _ = load_located(spec)
        return f"{spec.path} ({len(records):,} records, format {spec.format})"
    if not spec.name:
        raise ConfigError(f"{key}: expected 'path' (local file or alias) or 'name' (hub "
                          "dataset), got neither")
    if hub_offline() and not hub_dataset_cached(spec.name):
        raise ConfigError(f"{key}.name: hub dataset {spec.name!r} is not in the local cache and "
                          "HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; download it once online, or "
                          "use a local file (path:)")
    return f"hub dataset {spec.name!r} (split {spec.split}; read when the run starts)"


# Cheap checks for aliases (name -> spec -> description; raises ConfigError): verify an alias
# resolves to files that exist without reading them all. Filled by forgetkit.assets.
ALIAS_CHECKS: dict[str, Callable[[DatasetSpec], str]] = {}


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
