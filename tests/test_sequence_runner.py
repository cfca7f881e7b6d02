"""Task sequences (``sequence:``) in the runner, with the expensive stages faked.

The training process and the evaluator are replaced by fakes that write what the real ones
write (as in tests/test_runner_reliability.py); planning, identities, reuse, the stage chain,
file clean-up and the sequence results are the real code. The fake evaluator scores a model
by *where it is* (the stage folder), so every entry of the accuracy matrix is known.

* plan: stage folders, each stage starting from the previous stage's model, the online-EWC
  chain, the replay sources, an identity that holds the previous stage's (hash chain) and not
  the model directory's files;
* run: before = previous stage's after (copied), sequence.json against hand computations,
  the long-form tables, what is deleted when, summary.json's ``stage`` field;
* rerun: every stage reused; a changed stage 0 invalidates every stage (chain); a failed stage
  stops its sequence (reported), a rerun resumes there;
* config errors; replay pools drawn only from earlier stages, at the exact ratio, seeded;
* L2-SP ``anchor: base`` vs ``previous`` on real tiny checkpoints.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_config_dict, write_instruction_data

import forgetkit.results as results
import forgetkit.runner as runner
from forgetkit import run as run_face
from forgetkit.config import ConfigError, config_from_dict, read_yaml

STAGES = ("alpha", "beta", "gamma")


def experiment(tmp_path: Path, arms: list[dict[str, Any]] | None = None,
               **extra: Any) -> Path:
    cfg = tiny_config_dict(tmp_path)
    cfg["name"] = "seq"
    cfg.pop("output")
    cfg["data"].pop("train")
    task, stages = [], []
    for k, name in enumerate(STAGES):
        train = write_instruction_data(tmp_path / f"{name}.jsonl", n=24, seed=10 + k)
        ev = write_instruction_data(tmp_path / f"{name}_eval.jsonl", n=4, seed=20 + k)
        task.append({"name": f"{name}_nll", "kind": "answer_nll", "data": {"path": str(ev)}})
        stages.append({"name": name, "data": {"path": str(train)}, "metric": f"{name}_nll"})
    cfg["evaluation"] = {"task": task, "general": [
        {"name": "gen_nll", "kind": "answer_nll", "data": {"path": str(tmp_path / "alpha_eval.jsonl")}}]}
    cfg["sequence"] = {"stages": stages, **extra.pop("sequence", {})}
    cfg["experiment"] = {"seeds": [0], "arms": arms if arms is not None else [{"name": "naive"}],
                         "results_dir": str(tmp_path / "results" / "{name}"), **extra}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def fake_value(model_dir: Any, metric: str) -> float:
    """The fake score of ``metric`` for the model in ``model_dir``: 0.5 + 0.1 * metric index for
    the base model, ``1 + 10 * stage + metric index`` after a stage (all NLLs: lower is better)."""
    names = [f"{s}_nll" for s in STAGES] + ["gen_nll"]
    j = names.index(metric)
    parts = Path(str(model_dir)).parts
    stage = next((p for p in parts if p.startswith("stage-")), None)
    if stage is None:
        return 0.5 + 0.1 * j
    return 1.0 + 10 * int(stage.split("-")[1]) + j


def fake_evaluate(model_dir: Any, cfg: Any) -> dict[str, Any]:
    def entry(name: str) -> dict[str, Any]:
        return {"value": fake_value(model_dir, name), "higher_is_better": False,
                "kind": "answer_nll",
                # the real per-item format (forgetkit.results.stats): two items whose summed
                # NLL over their token counts is the value
                "items": {"stat": "ratio", "id": ["0:a", "1:b"],
                          "score": [fake_value(model_dir, name) * 2, fake_value(model_dir, name)],
                          "count": [2, 1]}}

    return {"task": {m.name: entry(m.name) for m in cfg.evaluation.task},
            "general": {m.name: entry(m.name) for m in cfg.evaluation.general}}


class Fakes:
    def __init__(self) -> None:
        self.trained: list[str] = []
        self.fail: dict[str, BaseException] = {}
        self.starts: list[str] = []

    def train_stage(self, run: runner.RunSpec, launcher: list[str]) -> dict[str, Any]:
        self.trained.append(run.label)
        start = run.cfg.model.name_or_path
        if run.stage is not None and run.stage.prev is not None:
            # the stage starts from the previous stage's saved model, which must exist now
            assert Path(start, "config.json").is_file(), start
        self.starts.append(str(start))
        (run.dir / "checkpoints" / "step-2").mkdir(parents=True, exist_ok=True)
        if run.label in self.fail:
            raise self.fail[run.label]
        res = {"steps": 4, "tokens": 100, "target_tokens": 50, "train_time_s": 0.1}
        results.write_json(run.dir / "train_result.json", res)
        (run.dir / "model").mkdir(exist_ok=True)
        (run.dir / "model" / "config.json").write_text("{}")
        return res


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Fakes:
    f = Fakes()
    monkeypatch.setattr(runner, "train_stage", f.train_stage)
    monkeypatch.setattr(runner, "evaluate", fake_evaluate)
    monkeypatch.setattr(runner, "base_checkpoint", lambda cfg, root: "base-model")
    monkeypatch.setattr(runner, "layer_summaries", lambda run, base: None)
    monkeypatch.delenv("FORGETKIT_DEBUG", raising=False)
    return f


def cli(capsys: pytest.CaptureFixture[str], *args: Any) -> tuple[int, str]:
    rc = run_face.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def plan(config: Path, **kw: Any) -> list[runner.RunSpec]:
    return runner.plan_runs(read_yaml(config), str(config), **kw)[1]


# ----------------------------------------------------------------------------- planning

EWC_ONLINE = {"type": "ewc", "lambda": 1.0, "online_gamma": 0.5, "fisher_examples": 4,
              "fisher_data": {"path": "PLACEHOLDER"}}


def test_plan_expands_stages_in_order_each_starting_from_the_previous(tmp_path):
    ewc = {**EWC_ONLINE, "fisher_data": {"path": str(tmp_path / "alpha_eval.jsonl")}}
    config = experiment(tmp_path, [{"name": "naive"},
                                   {"name": "ewc", "overrides": {"regularizers": [ewc]}}],
                        seeds=[0, 1])
    runs = plan(config)
    root = tmp_path / "results" / "seq"
    want = [(s, a, k) for s in (0, 1) for a in ("naive", "ewc") for k in range(3)]
    assert [(r.seed, r.arm, r.stage.index) for r in runs] == want  # seed-major, stages in order
    for r in runs:
        st = r.stage
        assert r.dir == root / r.arm / f"seed-{r.seed}" / f"stage-{st.index}-{STAGES[st.index]}"
        assert st.count == 3 and st.metric == f"{STAGES[st.index]}_nll"
        assert r.cfg.sequence is None and r.cfg.output.dir == str(r.dir)
        assert r.cfg.data.train.path == str(tmp_path / f"{STAGES[st.index]}.jsonl")
        if st.index == 0:
            assert st.prev is None and r.cfg.model.random_init is not None
        else:
            assert st.prev.dir == r.dir.parent / f"stage-{st.index - 1}-{STAGES[st.index - 1]}"
            assert r.cfg.model.name_or_path == str(st.prev.dir / "model")
            assert r.cfg.model.random_init is None
        if r.arm == "ewc":
            rc = r.cfg.regularizers[0]
            if st.index == 0:  # as configured (no shared cache for online EWC)
                assert rc.fisher_data.path == str(tmp_path / "alpha_eval.jsonl")
                assert rc.fisher_path is None
            else:  # the previous stage's data, its accumulated Fisher
                assert rc.fisher_data == st.prev.cfg.data.train
                assert rc.fisher_path == str(st.prev.dir / "fisher-ewc.safetensors")
    text = runner.describe_plan(runner.plan_runs(read_yaml(config), str(config))[0], runs)
    assert "12 runs (2 arms x 2 seeds x 3 stages)" in text
    assert "sequence: 0:alpha [alpha_nll] -> 1:beta [beta_nll] -> 2:gamma [gamma_nll]" in text
    assert text.count("stage 2:gamma") == 4


def test_stage_identity_is_a_hash_chain_not_the_model_files(tmp_path):
    from forgetkit.identity import identity_digest

    config = experiment(tmp_path)
    runs = plan(config)
    idents = [r.identity() for r in runs]
    assert "sequence.previous" not in idents[0]
    for k in (1, 2):
        assert idents[k]["sequence.previous"] == identity_digest(idents[k - 1])
        assert idents[k]["model.name_or_path"] == runner.PREVIOUS_MODEL
        assert idents[k]["sequence.stage.index"] == k
    # the previous stage's model appearing (or changing) does not change the identity
    for r in runs:
        (r.dir / "model").mkdir(parents=True)
        (r.dir / "model" / "config.json").write_text("{}")
    assert [r.identity() for r in plan(config)] == idents
    # a change in stage 0 alone changes every stage's identity
    raw = read_yaml(config)
    raw["sequence"]["stages"][0]["overrides"] = {"training.lr": 0.002}
    changed = [r.identity() for r in runner.plan_runs(raw, str(config))[1]]
    assert all(a != b for a, b in zip(idents, changed, strict=True))
    assert changed[1]["training.lr"] == idents[1]["training.lr"]  # only the chain differs
    # a change in the last stage leaves the earlier ones alone
    raw = read_yaml(config)
    raw["sequence"]["stages"][2]["overrides"] = {"training.lr": 0.002}
    last = [r.identity() for r in runner.plan_runs(raw, str(config))[1]]
    assert last[:2] == idents[:2] and last[2] != idents[2]


def test_stage_overrides_apply_after_the_arm(tmp_path):
    config = experiment(tmp_path, [{"name": "fast", "overrides": {"training.lr": 0.01,
                                                                 "training.max_steps": 3}}])
    raw = read_yaml(config)
    raw["sequence"]["stages"][1]["overrides"] = {"training.max_steps": 7}
    runs = runner.plan_runs(raw, str(config))[1]
    assert [r.cfg.training.max_steps for r in runs] == [3, 7, 3]
    assert {r.cfg.training.lr for r in runs} == {0.01}


# ----------------------------------------------------------------------------- running

def hand_measures(r: list[list[float]], base: list[float]) -> dict[str, Any]:
    """BWT, FWT, final average, learning accuracy and forgetting of an NLL matrix (lower is
    better: improvement = -score), written out by hand for T = 3."""
    return {
        "final_average": (r[2][0] + r[2][1] + r[2][2]) / 3,
        "learning_accuracy": (r[0][0] + r[1][1] + r[2][2]) / 3,
        "bwt": (-(r[2][0] - r[0][0]) - (r[2][1] - r[1][1])) / 2,
        "fwt": (-(r[0][1] - base[1]) - (r[1][2] - base[2])) / 2,
        "task_forgetting": [max(-r[0][0], -r[1][0]) + r[2][0], -r[1][1] + r[2][1]],
    }


def test_sequence_runs_and_writes_its_results(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "seq"
    rc, err = cli(capsys, config)
    assert rc == 0, err
    assert "all 3 runs succeeded" in err
    seq_dir = root / "naive" / "seed-0"
    dirs = [seq_dir / f"stage-{k}-{n}" for k, n in enumerate(STAGES)]
    assert fakes.trained == [f"naive seed 0 stage {k}-{n}" for k, n in enumerate(STAGES)]
    assert fakes.starts[1:] == [str(dirs[0] / "model"), str(dirs[1] / "model")]
    # before: stage 0 the base scores, stage k >= 1 stage k-1's after-scores (copied)
    b0 = json.loads((dirs[0] / "eval_before.json").read_text())
    assert b0["task"]["alpha_nll"]["value"] == fake_value("base-model", "alpha_nll")
    for k in (1, 2):
        before = json.loads((dirs[k] / "eval_before.json").read_text())
        prev_after = json.loads((dirs[k - 1] / "eval_after.json").read_text())
        assert before["task"] == prev_after["task"] and before["general"] == prev_after["general"]
        assert before["model"] == str(dirs[k - 1] / "model")
    for k, d in enumerate(dirs):
        s = json.loads((d / "summary.json").read_text())
        assert s["status"] == "ok"
        assert s["stage"] == {"index": k, "name": STAGES[k], "count": 3,
                              "metric": f"{STAGES[k]}_nll"}
        # keep_checkpoints false: nothing of the models is left once the sequence is done
        assert not (d / "model").exists() and not (d / "checkpoints").exists()
    seq = json.loads((seq_dir / "sequence.json").read_text())
    r = [[fake_value(dirs[i] / "model", f"{STAGES[j]}_nll") for j in range(3)] for i in range(3)]
    base = [fake_value("base-model", f"{n}_nll") for n in STAGES]
    assert seq["stages"] == list(STAGES) and seq["metrics"] == [f"{n}_nll" for n in STAGES]
    assert seq["R"] == r and seq["base"] == base
    assert seq["higher_is_better"] == [False] * 3
    assert seq["general"] == {"gen_nll": [fake_value("base-model", "gen_nll")]
                              + [fake_value(d / "model", "gen_nll") for d in dirs]}
    for k, v in hand_measures(r, base).items():
        assert seq[k] == pytest.approx(v), k
    with (root / "sequence_matrix.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 3 + 9
    got = {(int(x["stage_index"]), x["task"]): float(x["value"]) for x in rows}
    assert all(got[(-1, n)] == base[j] for j, n in enumerate(STAGES))
    assert all(got[(i, STAGES[j])] == r[i][j] for i in range(3) for j in range(3))
    assert {x["metric"] for x in rows if x["task"] == "beta"} == {"beta_nll"}
    with (root / "sequence_summary.csv").open() as fh:
        (srow,) = list(csv.DictReader(fh))
    assert srow["arm"] == "naive" and float(srow["bwt"]) == pytest.approx(seq["bwt"])
    # stage runs are not rows of the single-run tables
    assert not (root / "summary.csv").exists()
    plan_json = json.loads((root / "plan.json").read_text())
    assert [x["stage"]["name"] for x in plan_json["runs"]] == list(STAGES)

    # a rerun reuses every stage, trains nothing, and rewrites the same sequence.json
    rc, err = cli(capsys, config)
    assert rc == 0 and "3 reused from earlier" in err, err
    assert len(fakes.trained) == 3
    assert json.loads((seq_dir / "sequence.json").read_text()) == seq


def test_models_are_kept_until_the_next_stage_finished(tmp_path, fakes, capsys, monkeypatch):
    config = experiment(tmp_path)
    seen: list[tuple[str, bool, bool]] = []
    real = fakes.train_stage

    def train(run: runner.RunSpec, launcher: list[str]) -> dict[str, Any]:
        prev = run.stage.prev
        seen.append((run.stage.name, prev is not None and (prev.dir / "model").is_dir(),
                     prev is not None and (prev.dir / "checkpoints").exists()))
        return real(run, launcher)

    monkeypatch.setattr(runner, "train_stage", train)
    assert cli(capsys, config)[0] == 0
    # the previous stage's model is there when a stage starts; its checkpoints are not
    assert seen == [("alpha", False, False), ("beta", True, False), ("gamma", True, False)]


def test_keep_checkpoints_keeps_every_stage(tmp_path, fakes, capsys):
    config = experiment(tmp_path, keep_checkpoints=True)
    assert cli(capsys, config)[0] == 0
    for k, n in enumerate(STAGES):
        d = tmp_path / "results" / "seq" / "naive" / "seed-0" / f"stage-{k}-{n}"
        assert (d / "model" / "config.json").is_file() and (d / "checkpoints").is_dir()


def test_changed_stage_0_invalidates_every_stage(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    assert cli(capsys, config)[0] == 0
    raw = read_yaml(config)
    raw["sequence"]["stages"][0]["data"]["limit"] = 20
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    rc, err = cli(capsys, config)
    assert rc == 2, err
    assert err.count("sequence.previous:") == 2, err  # stages 1 and 2: through the chain
    assert "data.train.limit: null -> 20" in err
    assert len(fakes.trained) == 3  # nothing retrained without --force
    seq = tmp_path / "results" / "seq" / "naive" / "seed-0" / "sequence.json"
    fakes.fail["naive seed 0 stage 2-gamma"] = RuntimeError("boom")
    rc, err = cli(capsys, config, "--force")
    assert rc == 1 and len(fakes.trained) == 6, err
    # stages 0 and 1 were replaced, stage 2's old result put back: the old sequence.json (of
    # the old stages) is gone, and so are the tables built from it
    assert not seq.exists() and not (seq.parents[2] / "sequence_summary.csv").exists()
    del fakes.fail["naive seed 0 stage 2-gamma"]
    rc, err = cli(capsys, config, "--force")
    assert rc == 0, err
    assert len(fakes.trained) == 9 and seq.is_file()


def test_failed_stage_stops_its_sequence_and_a_rerun_resumes_there(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    fakes.fail["naive seed 0 stage 1-beta"] = RuntimeError("boom")
    rc, err = cli(capsys, config)
    assert rc == 1, err
    assert "naive seed 0 stage 2-gamma (not started: it fine-tunes the final model of naive " \
           "seed 0 stage 1-beta, which did not finish)" in err, err
    root = tmp_path / "results" / "seq" / "naive" / "seed-0"
    assert not (root / "stage-2-gamma").exists() and not (root / "sequence.json").exists()
    assert (root / "stage-0-alpha" / "model").is_dir()  # still the start of stage 1
    del fakes.fail["naive seed 0 stage 1-beta"]
    rc, err = cli(capsys, config)
    assert rc == 0, err
    assert fakes.trained[-2:] == ["naive seed 0 stage 1-beta", "naive seed 0 stage 2-gamma"]
    assert fakes.trained.count("naive seed 0 stage 0-alpha") == 1
    assert (root / "sequence.json").is_file()


def test_a_deleted_start_model_is_a_failed_check(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    fakes.fail["naive seed 0 stage 1-beta"] = RuntimeError("boom")
    assert cli(capsys, config)[0] == 1
    del fakes.fail["naive seed 0 stage 1-beta"]
    start = tmp_path / "results" / "seq" / "naive" / "seed-0" / "stage-0-alpha" / "model"
    runner._remove(start, tmp_path / "results" / "seq")
    rc, err = cli(capsys, config)
    assert rc == 2 and "was deleted" in err and "--force" in err, err


# ----------------------------------------------------------------------------- config errors

def _raw(tmp_path: Path) -> dict[str, Any]:
    return read_yaml(experiment(tmp_path))


@pytest.mark.parametrize("mutate, message", [
    (lambda s: s["stages"][1].update(metirc="x"),
     r"unknown key 'sequence.stages\[1\].metirc'; did you mean 'sequence.stages\[1\].metric'"),
    (lambda s: s["stages"][2].update(metric="gama_nll"),
     r"sequence.stages\[2\].metric: 'gama_nll' is not an evaluation.task metric .* did you "
     r"mean 'gamma_nll'"),
    (lambda s: s["stages"][1].update(name="alpha"),
     r"sequence.stages\[1\].name: 'alpha' is already the name of sequence.stages\[0\]"),
    (lambda s: s.update(stages=s["stages"][:1]),
     r"sequence.stages: a sequence needs at least two stages, got 1"),
    (lambda s: s.update(replay={"ratio": 0.2, "buffer": 3}),
     r"unknown key 'sequence.replay.buffer'; did you mean 'sequence.replay.buffer_per_stage'"),
    (lambda s: s["stages"][0].update(name="../x"), r"sequence.stages\[0\].name: '../x' is not "
     "a safe name"),
    (lambda s: s["stages"][1].update(overrides={"evaluation.batch_size": 2}),
     r"sequence.stages\[1\].overrides.evaluation.batch_size: a stage cannot change evaluation: "
     "every stage is scored on the same metrics"),
    (lambda s: s["stages"][0].update(overrides={"training.lrr": 1}),
     r"sequence stage 0 \('alpha'\).*unknown key 'training.lrr'; did you mean 'training.lr'"),
])
def test_sequence_config_errors(tmp_path, mutate, message):
    raw = _raw(tmp_path)
    mutate(raw["sequence"])
    with pytest.raises(ConfigError, match=message):
        runner.plan_runs(raw, "seq.yaml")


def test_replay_ratio_of_the_arm_must_agree_with_the_sequence(tmp_path):
    raw = _raw(tmp_path)
    raw["sequence"]["replay"] = {"ratio": 0.2, "buffer_per_stage": 4}
    raw["data"]["replay"] = {"data": {"path": str(tmp_path / "alpha_eval.jsonl")}, "ratio": 0.3}
    with pytest.raises(ConfigError, match="data.replay.ratio 0.3 and sequence.replay.ratio 0.2 "
                       "disagree"):
        runner.plan_runs(raw, "seq.yaml")


def test_l2_anchor_base_is_refused_with_lora():
    from conftest import TINY_LLAMA

    raw = {"model": {"random_init": dict(TINY_LLAMA), "tokenizer": "byte"},
           "data": {"train": {"path": "x.jsonl"}}, "training": {"lora": {"r": 4}},
           "regularizers": [{"type": "l2", "anchor": "base"}]}
    with pytest.raises(ConfigError, match=r"regularizers\[0\].anchor: 'base' .* training.lora"):
        config_from_dict(raw)
    raw["regularizers"] = [{"type": "l2", "anchor": "bse"}]
    raw["training"] = {}
    with pytest.raises(ConfigError, match="did you mean 'base'"):
        config_from_dict(raw)


# ----------------------------------------------------------------------------- replay

def _examples_of(path: Path, tok: Any) -> set[tuple[int, ...]]:
    """Every example of a data file, tokenised as a run does (input ids)."""
    from forgetkit.config import DatasetSpec
    from forgetkit.data.sets import load_examples

    return {tuple(e.input_ids) for e in load_examples(DatasetSpec(path=str(path)), tok,
                                                      max_length=256)}


def test_replay_across_stages_draws_only_from_earlier_stages(tmp_path):
    import numpy as np

    from forgetkit.data.batching import epoch_stream
    from forgetkit.data.sets import build_example_sets
    from forgetkit.models import build_byte_tokenizer

    config = experiment(tmp_path, [
        {"name": "replay", "overrides": {"sequence.replay": {"ratio": 0.25,
                                                             "buffer_per_stage": 5}}}],
        seeds=[0, 1])
    runs = plan(config)
    tok = build_byte_tokenizer()
    by = {(r.seed, r.stage.index): r for r in runs}
    assert by[(0, 0)].cfg.data.replay is None  # stage 0: no sequence replay
    pools = {}
    for (seed, k), r in by.items():
        if k == 0:
            continue
        rp = r.cfg.data.replay
        assert rp.data is None and rp.ratio == 0.25
        assert [s.data for s in rp.sources] == [by[(seed, j)].cfg.data.train for j in range(k)]
        assert {s.examples for s in rp.sources} == {5}
        sets = build_example_sets(r.cfg, tok)
        assert len(sets.replay) == 5 * k and all(e.source == 1 for e in sets.replay)
        assert sets.replay_ratio == 0.25
        # each buffer holds examples of its stage's file only (the pool lists them in order)
        for j in range(k):
            got = {tuple(e.input_ids) for e in sets.replay[5 * j:5 * (j + 1)]}
            assert len(got) == 5 and got <= _examples_of(tmp_path / f"{STAGES[j]}.jsonl", tok)
        later = _examples_of(tmp_path / f"{STAGES[k]}.jsonl", tok)
        assert not {tuple(e.input_ids) for e in sets.replay} & later
        pools[(seed, k)] = [tuple(e.input_ids) for e in sets.replay]
        # the planner mixes it at exactly the ratio: round(0.25 * T) of T slots
        s = epoch_stream(len(sets.train), len(sets.replay), sets.replay_ratio, r.cfg.seed, 0)
        n = len(s.task_idx)
        assert int((s.replay_idx >= 0).sum()) == round(0.25 * n)
        assert int((s.task_idx >= 0).sum()) == len(sets.train)
        assert set(s.replay_idx[s.replay_idx >= 0].tolist()) <= set(range(len(sets.replay)))
        assert np.all((s.task_idx >= 0) ^ (s.replay_idx >= 0))
    # seeded: the same seed gives the same buffer (stage 2's first buffer is stage 1's), another
    # seed another one
    assert pools[(0, 2)][:5] == pools[(0, 1)]
    again = build_example_sets(plan(config)[1].cfg, tok)
    assert [tuple(e.input_ids) for e in again.replay] == pools[(0, 1)]
    assert pools[(1, 1)] != pools[(0, 1)]


def test_replay_pool_keeps_the_arms_own_source_first(tmp_path):
    from forgetkit.data.sets import build_example_sets
    from forgetkit.models import build_byte_tokenizer

    general = tmp_path / "alpha_eval.jsonl"  # any instruction file stands for general data
    config = experiment(tmp_path, [{"name": "both", "overrides": {
        "data.replay": {"data": {"path": str(general)}},
        "sequence.replay": {"ratio": 0.1, "buffer_per_stage": 3}}}])
    r1 = plan(config)[1]
    assert r1.cfg.data.replay.data.path == str(general) and len(r1.cfg.data.replay.sources) == 1
    sets = build_example_sets(r1.cfg, build_byte_tokenizer())
    assert len(sets.replay) == 4 + 3
    tok = build_byte_tokenizer()
    assert {tuple(e.input_ids) for e in sets.replay[:4]} == _examples_of(general, tok)
    assert {tuple(e.input_ids) for e in sets.replay[4:]} <= _examples_of(
        tmp_path / "alpha.jsonl", tok)


# ----------------------------------------------------------------------------- L2-SP anchors

def test_l2_anchor_base_vs_previous(tmp_path):
    """At stage 1 (its model = stage 0's final weights) ``anchor: base`` pulls toward the base
    model's weights and ``previous`` toward stage 0's, tensor for tensor."""
    import torch
    from conftest import TINY_LLAMA

    from forgetkit.config import ModelConfig
    from forgetkit.models import load_model, save_hf_checkpoint
    from forgetkit.regularizers.base import RegContext
    from forgetkit.regularizers.l2 import L2SP

    base_model, tok = load_model(ModelConfig(random_init=dict(TINY_LLAMA), tokenizer="byte"))
    save_hf_checkpoint(base_model, tok, tmp_path / "base")
    with torch.no_grad():  # "stage 0's training": every weight moves
        for p in base_model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    save_hf_checkpoint(base_model, tok, tmp_path / "stage0")
    model, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "stage0"), tokenizer="byte"))
    base_w, _ = load_model(ModelConfig(name_or_path=str(tmp_path / "base"), tokenizer="byte"))
    base_sd = dict(base_w.named_parameters())
    start_sd = {n: p.detach().clone() for n, p in model.named_parameters()}
    ctx = RegContext(model=model, params=model.named_parameters, device=torch.device("cpu"))
    to_base = L2SP(1.0, anchor="base", anchor_path=tmp_path / "base")
    to_prev = L2SP(1.0)
    to_base.prepare(ctx)
    to_prev.prepare(ctx)
    assert to_base.names == to_prev.names and len(to_base.names) == len(base_sd)
    for n, a, b in zip(to_base.names, to_base.anchor, to_prev.anchor, strict=True):
        assert torch.equal(a, base_sd[n].detach()), n
        assert torch.equal(b, start_sd[n]), n
        assert not torch.equal(a, b), n
    # a checkpoint of another shape is refused, not approximated
    other, tok2 = load_model(ModelConfig(random_init={**TINY_LLAMA, "hidden_size": 32,
                                                       "intermediate_size": 64},
                                         tokenizer="byte"))
    save_hf_checkpoint(other, tok2, tmp_path / "other")
    with pytest.raises(ValueError, match="has shape .* a checkpoint of another model"):
        L2SP(1.0, anchor="base", anchor_path=tmp_path / "other").prepare(ctx)
    with pytest.raises(FileNotFoundError, match="not a safetensors checkpoint"):
        L2SP(1.0, anchor="base", anchor_path=tmp_path / "nowhere").prepare(ctx)


def test_runner_gives_anchor_base_the_base_checkpoint_from_stage_1(tmp_path, monkeypatch):
    config = experiment(tmp_path, [{"name": "l2", "overrides": {
        "regularizers": [{"type": "l2", "anchor": "base"}, {"type": "l2"}]}}])
    runs = plan(config)
    root = tmp_path / "results" / "seq"
    base_dir = tmp_path / "base-ckpt"
    base_dir.mkdir()
    calls = []

    def fake_base(cfg: Any, r: Path) -> str:
        calls.append(cfg.model.random_init is not None)
        return str(base_dir)

    monkeypatch.setattr(runner, "base_checkpoint", fake_base)
    for r in runs:
        runner.resolve_stage_inputs(r, root)
    assert runs[0].cfg.regularizers[0].anchor_path is None  # stage 0 starts at the base
    for r in runs[1:]:
        assert r.cfg.regularizers[0].anchor_path == str(base_dir)
        assert r.cfg.regularizers[1].anchor_path is None  # previous: the stage's start
        assert r.identity()["regularizers.0.anchor_path"] == runner.BASE_ANCHOR
    assert calls == [True, True]  # resolved from stage 0's (the base's) model config


def test_nan_measures_stay_empty_cells(tmp_path):
    from forgetkit.results.sequence import sequence_record, write_sequence_tables

    def tree(v: float) -> dict[str, Any]:
        return {"task": {m: {"value": v, "higher_is_better": True} for m in ("a", "b")},
                "general": {}}

    rec = sequence_record(["s0", "s1"], ["a", "b"], tree(0.1),
                          [tree(0.5), {"task": {"a": {"value": None, "higher_is_better": True},
                                                "b": {"value": 0.7, "higher_is_better": True}},
                                       "general": {}}])
    assert math.isnan(rec["bwt"]) and rec["fwt"] == pytest.approx(0.5 - 0.1)
    results.write_json(tmp_path / "arm" / "seed-3" / "sequence.json", rec)
    assert write_sequence_tables(tmp_path) == 1
    with (tmp_path / "sequence_summary.csv").open() as fh:
        (row,) = list(csv.DictReader(fh))
    assert row["bwt"] == "" and row["seed"] == "3"


def test_dry_run_shows_the_stages_and_writes_nothing(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    rc, err = cli(capsys, config, "--dry-run")
    assert rc == 0, err
    assert "3 runs (1 arms x 1 seeds x 3 stages)" in err
    assert "sequence: 0:alpha [alpha_nll] -> 1:beta [beta_nll] -> 2:gamma [gamma_nll]" in err
    assert "stage 1:beta" in err and "estimated time" in err
    assert not (tmp_path / "results").exists() and fakes.trained == []


def test_forgetkit_train_refuses_a_sequence(tmp_path, capsys):
    from forgetkit.train.__main__ import main

    rc = main([str(experiment(tmp_path)), "data.train.path=x.jsonl"])
    err = capsys.readouterr().err
    assert rc == 2 and "sequence: a task sequence is run by python -m forgetkit.run" in err, err


def test_runs_saved_before_the_sequence_keys_are_still_reused(tmp_path, fakes, capsys):
    """identity.json files written before ``sequence``, L2-SP's ``anchor``/``anchor_path`` and
    ``data.replay.sources`` existed read them at their defaults (forgetkit.identity.ADDED_KEYS,
    ADDED_NESTED): such runs are still reused; a real change is still seen."""
    cfg = tiny_config_dict(tmp_path)
    cfg["name"] = "old"
    cfg.pop("output")
    ev = write_instruction_data(tmp_path / "ev.jsonl", n=4, seed=1)
    cfg["evaluation"] = {"task": [{"name": "alpha_nll", "kind": "answer_nll",
                                   "data": {"path": str(ev)}}]}
    cfg["regularizers"] = [{"type": "l2"}]
    cfg["experiment"] = {"arms": [
        {"name": "l2"},
        {"name": "replay", "overrides": {"data.replay": {"data": {"path": str(ev)}},
                                         "regularizers": []}}],
        "results_dir": str(tmp_path / "results" / "{name}")}
    config = tmp_path / "old.yaml"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert cli(capsys, config)[0] == 0
    new_keys = {"sequence", "regularizers.0.anchor", "regularizers.0.anchor_path",
                "data.replay.sources"}
    for arm in ("l2", "replay"):
        p = tmp_path / "results" / "old" / arm / "seed-0" / "identity.json"
        ident = json.loads(p.read_text())
        assert "sequence" in ident and ({"regularizers.0.anchor", "data.replay.sources"}
                                        & set(ident))
        p.write_text(json.dumps({k: v for k, v in ident.items() if k not in new_keys}))
    rc, err = cli(capsys, config)
    assert rc == 0 and "2 reused" in err, err
    rc, err = cli(capsys, config, "--arms", "l2", "regularizers.0.anchor=base")
    assert rc == 2 and 'regularizers.0.anchor: "previous" -> "base"' in err, err


# ----------------------------------------------------------------------------- the chain of results

def _summaries(root: Path) -> list[dict[str, Any]]:
    return [json.loads((root / f"stage-{k}-{n}" / "summary.json").read_text())
            for k, n in enumerate(STAGES)]


def test_each_stage_records_the_result_it_started_from(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    assert cli(capsys, config)[0] == 0
    s = _summaries(tmp_path / "results" / "seq" / "naive" / "seed-0")
    assert len({x["instance"] for x in s}) == 3 and s[0]["started_from"] is None
    assert [x["started_from"] for x in s[1:]] == [s[0]["instance"], s[1]["instance"]]


def test_a_stage_whose_predecessor_was_trained_again_is_not_reused(tmp_path, fakes, capsys):
    """Its identity is unchanged (configs), but the weights it started from are gone: a stage
    0 deleted by hand and trained again makes stages 1 and 2 train again, with a warning."""
    import shutil

    config = experiment(tmp_path)
    assert cli(capsys, config)[0] == 0
    root = tmp_path / "results" / "seq" / "naive" / "seed-0"
    shutil.rmtree(root / "stage-0-alpha")
    rc, err = cli(capsys, config)
    assert rc == 0, err
    assert fakes.trained[3:] == [f"naive seed 0 stage {k}-{n}" for k, n in enumerate(STAGES)]
    assert err.count("than the present one (trained again since): trained again") == 2, err
    s = _summaries(root)
    assert [x["started_from"] for x in s[1:]] == [s[0]["instance"], s[1]["instance"]]
    rc, err = cli(capsys, config)  # and now the chain is whole again: all reused
    assert rc == 0 and "3 reused from earlier" in err and len(fakes.trained) == 6, err


def test_force_with_a_failed_later_stage_leaves_no_stale_chain(tmp_path, fakes, capsys):
    """--force trains stage 0 again, stage 1 fails (its old result is put back), stage 2 does
    not start: a plain rerun must not reuse the old stages 1 and 2 on top of the new stage 0."""
    config = experiment(tmp_path)
    assert cli(capsys, config)[0] == 0
    fakes.fail["naive seed 0 stage 1-beta"] = RuntimeError("boom")
    rc, err = cli(capsys, config, "--force")
    assert rc == 1 and "put back" in err, err
    del fakes.fail["naive seed 0 stage 1-beta"]
    rc, err = cli(capsys, config)
    assert rc == 0, err
    assert fakes.trained[-2:] == ["naive seed 0 stage 1-beta", "naive seed 0 stage 2-gamma"]
    assert fakes.trained.count("naive seed 0 stage 0-alpha") == 2
    s = _summaries(tmp_path / "results" / "seq" / "naive" / "seed-0")
    assert [x["started_from"] for x in s[1:]] == [s[0]["instance"], s[1]["instance"]]


def test_resume_from_checkpoints_of_another_predecessor_is_refused(tmp_path, fakes, capsys,
                                                                   caplog):
    config = experiment(tmp_path)
    fakes.fail["naive seed 0 stage 1-beta"] = RuntimeError("boom")  # leaves checkpoints/
    assert cli(capsys, config)[0] == 1
    root = tmp_path / "results" / "seq" / "naive" / "seed-0"
    p = root / "stage-1-beta" / runner.STARTED_FROM
    assert json.loads(p.read_text())["instance"] == _summaries_0(root)["instance"]
    p.write_text(json.dumps({"instance": "an-older-stage-0"}))
    del fakes.fail["naive seed 0 stage 1-beta"]
    with caplog.at_level("ERROR", logger="forgetkit"):  # the full message (stderr shortens it)
        rc, err = cli(capsys, config)
    assert rc == 1, err
    assert "stage-1-beta: its checkpoints were trained from another result" in caplog.text, \
        caplog.text
    assert fakes.trained.count("naive seed 0 stage 1-beta") == 1  # refused before training


def _summaries_0(root: Path) -> dict[str, Any]:
    return json.loads((root / "stage-0-alpha" / "summary.json").read_text())


def test_online_ewc_refuses_a_missing_previous_fisher(tmp_path, fakes, capsys, caplog):
    """Stage k >= 1 of online EWC reads F_{k-1} from stage k-1's own copy; when that file is
    missing (the fake training, like a deleted file, writes none) the stage fails before
    training, instead of using the new estimate alone."""
    ewc = {**EWC_ONLINE, "fisher_data": {"path": str(tmp_path / "alpha_eval.jsonl")}}
    config = experiment(tmp_path, arms=[{"name": "online", "overrides": {"regularizers": [ewc]}}])
    with caplog.at_level("ERROR", logger="forgetkit"):
        rc, err = cli(capsys, config)
    assert rc == 1, err
    assert "(online EWC) continues the Fisher of online seed 0 stage 0-alpha" in caplog.text
    assert "stage-0-alpha/fisher-ewc.safetensors is missing" in caplog.text, caplog.text
    assert [x for x in fakes.trained if "stage 1" in x] == []  # refused before training
