"""The runner's promises (README "What forgetkit guarantees"), each tested by injecting the fault:

* every check runs before anything is evaluated, trained, moved or deleted (corrupt data, a
  changed config, a held lock: exit 2, nothing touched);
* ``--force`` sets the finished run aside and deletes it only after the new run succeeded; a
  failed or interrupted replacement puts the old run back;
* a finished run is reused only while its identity (resolved config + data digests) matches;
* one writer per results directory (a second process: one line, exit 2);
* exit statuses 0 / 1 / 2 / 130, one line and no traceback (the traceback goes to run.log, and
  to the log under ``--debug``);
* disk full is named, temporary files are removed, the other arms go on.

The expensive stages (training subprocess, evaluation) are replaced by fakes that write what
the real ones write; preflight, identities, locks and the results tree are the real code.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import tiny_config_dict, write_instruction_data

import forgetkit.results as results
import forgetkit.runner as runner
from forgetkit import run as run_face
from forgetkit.locking import dir_lock

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers

def experiment(tmp_path: Path, arms: list[dict[str, Any]] | None = None) -> Path:
    cfg = tiny_config_dict(tmp_path)
    cfg["name"] = "rel"
    cfg.pop("output")
    eval_data = write_instruction_data(tmp_path / "task_eval.jsonl", n=4, seed=1)
    cfg["evaluation"] = {"task": [{"name": "task_nll", "kind": "answer_nll",
                                   "data": {"path": str(eval_data)}}]}
    cfg["experiment"] = {
        "seeds": [0],
        "arms": arms if arms is not None else [
            {"name": "naive"},
            {"name": "l2", "overrides": {"regularizers": [{"type": "l2", "lambda": 1.0}]}}],
        "results_dir": str(tmp_path / "results" / "{name}")}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


SCORES = {"task": {"task_nll": {"value": 1.0, "higher_is_better": False, "kind": "answer_nll"}},
          "general": {}}


class Fakes:
    """Stand-ins for the training process and the evaluator (they write the same files)."""

    def __init__(self) -> None:
        self.trained: list[str] = []
        self.fail: dict[str, BaseException] = {}
        self.result: dict[str, Any] = {}

    def train_stage(self, run: runner.RunSpec, launcher: list[str]) -> dict[str, Any]:
        self.trained.append(run.label)
        (run.dir / "checkpoints" / "step-2").mkdir(parents=True, exist_ok=True)
        if run.label in self.fail:
            raise self.fail[run.label]
        res = {"steps": 4, "tokens": 100, "target_tokens": 50, "train_time_s": 0.1,
               **self.result}
        results.write_json(run.dir / "train_result.json", res)
        (run.dir / "model").mkdir(exist_ok=True)
        return res


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> Fakes:
    f = Fakes()
    monkeypatch.setattr(runner, "train_stage", f.train_stage)
    monkeypatch.setattr(runner, "evaluate", lambda model_dir, cfg: json.loads(json.dumps(SCORES)))
    monkeypatch.setattr(runner, "base_checkpoint", lambda cfg, root: "base-model")
    monkeypatch.setattr(runner, "layer_summaries", lambda run, base: None)
    monkeypatch.delenv("FORGETKIT_DEBUG", raising=False)
    return f


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    rc = run_face.main([str(a) for a in args])
    return rc, capsys.readouterr().err


def snapshot(root: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under root (lock file aside) with its mtime and bytes."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".forgetkit.lock"}


def summary(root: Path, arm: str, seed: int = 0) -> dict[str, Any]:
    return json.loads((root / arm / f"seed-{seed}" / "summary.json").read_text())


def no_traceback(err: str) -> None:
    assert "Traceback" not in err, f"a traceback reached the user:\n{err[-3000:]}"


# ----------------------------------------------------------------------------- reuse

def test_rerun_with_the_same_config_reuses_and_saves_identity(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    rc, err = cli(capsys, config)
    assert rc == 0, err
    assert "all 2 runs succeeded" in err
    ident = json.loads((root / "naive" / "seed-0" / "identity.json").read_text())
    assert ident["training.lr"] == 0.001 and any(k.startswith("data_sha256.") for k in ident)
    before = snapshot(root / "naive")
    rc, err = cli(capsys, config)
    assert rc == 0 and "2 reused from earlier" in err, err
    assert fakes.trained == ["naive seed 0", "l2 seed 0"], fakes.trained
    assert snapshot(root / "naive") == before


def test_changed_lr_is_not_reused_and_nothing_is_touched(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    assert cli(capsys, config)[0] == 0
    before = snapshot(root)
    rc, err = cli(capsys, config, "training.lr=0.002")
    assert rc == 2, err
    assert "training.lr: 0.001 -> 0.002" in err, err
    assert "--force" in err and "experiment.results_dir" in err, err
    no_traceback(err)
    assert fakes.trained == ["naive seed 0", "l2 seed 0"], "a mismatching run was retrained"
    assert snapshot(root) == before


def test_run_finished_before_identities_is_checked_from_its_config_yaml(tmp_path, fakes,
                                                                        capsys):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    assert cli(capsys, config)[0] == 0
    for arm in ("naive", "l2"):
        d = root / arm / "seed-0"
        (d / "identity.json").unlink()
        old = yaml.safe_load((d / "config.yaml").read_text())
        old["output"]["overwrite"] = False  # a key since removed from the schema
        (d / "config.yaml").write_text(yaml.safe_dump(old))
    # Such a run predates versioned numerics (forgetkit.identity.NUMERICS_VERSION): it is
    # checked from its config.yaml, and its numbers are not today's, so it is not reused.
    before = snapshot(root)
    rc, err = cli(capsys, config)
    assert rc == 2 and "forgetkit.numerics: 1 -> 3" in err and "schedules" in err, err
    assert "3: training.logits 'targets'" in err, err  # every change since, not the last only
    assert "training.warmup_steps" not in err, err  # the config keys themselves still match
    rc, err = cli(capsys, config, "training.warmup_steps=2")
    assert rc == 2 and "training.warmup_steps: 1 -> 2" in err, err
    assert fakes.trained == ["naive seed 0", "l2 seed 0"] and snapshot(root) == before


def test_keys_added_to_the_schema_later_do_not_invalidate_a_saved_run(tmp_path, fakes,
                                                                       capsys):
    """An identity.json saved before training.lora / training.freeze / evaluation.merge
    existed reads them at their defaults (forgetkit.identity.ADDED_KEYS): still reused."""
    from forgetkit.identity import ADDED_KEYS, _excluded

    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    assert cli(capsys, config)[0] == 0
    for arm in ("naive", "l2"):
        p = root / arm / "seed-0" / "identity.json"
        ident = json.loads(p.read_text())
        kept = {k: v for k, v in ident.items() if not _excluded(k, ADDED_KEYS)}
        assert len(kept) < len(ident)
        p.write_text(json.dumps(kept))
    rc, err = cli(capsys, config)
    assert rc == 0 and "2 reused" in err, err
    rc, err = cli(capsys, config, "training.freeze.bottom_layers=1")  # a real change: seen
    assert rc == 2 and "training.freeze.bottom_layers: 0 -> 1" in err, err


def test_finished_lora_run_is_reused(tmp_path, fakes, capsys):
    """A section whose default is None (training.lora) is saved as its nested keys; reading the
    identity back must not add the bare key at its default (it did until 2026-12-04: every
    finished LoRA run read as changed, 'training.lora: null -> (absent)', and a resumed study
    refused it)."""
    config = experiment(tmp_path, [{"name": "lora", "overrides": {"training": {"lora": {"r": 2}}}}])
    root = tmp_path / "results" / "rel"
    assert cli(capsys, config)[0] == 0
    saved = json.loads((root / "lora" / "seed-0" / "identity.json").read_text())
    assert saved["training.lora.r"] == 2 and "training.lora" not in saved
    assert runner.saved_identity(root / "lora" / "seed-0") == saved
    rc, err = cli(capsys, config)
    assert rc == 0 and "1 reused" in err, err
    assert fakes.trained == ["lora seed 0"]


def test_run_of_older_numerics_is_not_reused(tmp_path, fakes, capsys):
    """A finished run whose identity.json was saved before forgetkit's numerics were versioned
    (version 1) is not reused as today's: same config, other computation."""
    from forgetkit.identity import NUMERICS_KEY, NUMERICS_VERSION

    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    assert cli(capsys, config)[0] == 0
    p = root / "naive" / "seed-0" / "identity.json"
    ident = json.loads(p.read_text())
    assert ident.pop(NUMERICS_KEY) == NUMERICS_VERSION
    p.write_text(json.dumps(ident))
    rc, err = cli(capsys, config)
    assert rc == 2 and "forgetkit.numerics: 1 -> 3" in err, err
    no_traceback(err)
    assert fakes.trained == ["naive seed 0", "l2 seed 0"]


def test_edited_data_file_is_a_changed_identity(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    assert cli(capsys, config)[0] == 0
    write_instruction_data(tmp_path / "task.jsonl", n=64, seed=99)  # same path, new contents
    rc, err = cli(capsys, config)
    assert rc == 2 and "data_sha256." in err and "task.jsonl" in err, err


def test_unfinished_run_with_checkpoints_of_another_config_stops(tmp_path, fakes, capsys):
    config = experiment(tmp_path, [{"name": "naive"}])
    root = tmp_path / "results" / "rel"
    fakes.fail["naive seed 0"] = RuntimeError("boom")
    assert cli(capsys, config)[0] == 1  # leaves checkpoints/step-2 and a failed summary
    rc, err = cli(capsys, config, "training.lr=0.002")
    assert rc == 2 and "unfinished run" in err and "training.lr" in err, err
    del fakes.fail["naive seed 0"]
    rc, err = cli(capsys, config)  # the same config resumes
    assert rc == 0, err
    assert summary(root, "naive")["status"] == "ok"


# ----------------------------------------------------------------------------- --force

def test_force_with_corrupt_data_keeps_the_finished_run(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    assert cli(capsys, config)[0] == 0
    before = snapshot(root)
    with (tmp_path / "task.jsonl").open("a") as fh:
        fh.write("{not json\n")
    rc, err = cli(capsys, config, "--force")
    assert rc == 2, err
    assert "task.jsonl" in err, err
    no_traceback(err)
    assert snapshot(root) == before, "the finished runs changed though preflight failed"
    assert not (root / "_replaced").exists()


def test_force_whose_training_fails_puts_the_old_run_back(tmp_path, fakes, capsys, caplog):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    assert cli(capsys, config)[0] == 0
    old_naive = snapshot(root / "naive")
    fakes.fail["naive seed 0"] = runner.TrainingFailed(
        "NonFiniteLoss: non-finite loss at step 3 (training exited with status 1)")
    with caplog.at_level(logging.INFO, logger="forgetkit"):
        rc, err = cli(capsys, config, "--force")
    assert rc == 1, err
    assert "1 of 2 runs failed: naive seed 0 (NonFiniteLoss: non-finite loss at step 3" in err
    no_traceback(err)
    assert snapshot(root / "naive") == old_naive, "the finished run was not restored intact"
    assert "put back" in caplog.text
    failed = list((root / "_failed").glob("*/naive/seed-0/summary.json"))
    assert len(failed) == 1 and json.loads(failed[0].read_text())["status"] == "failed"
    assert summary(root, "l2")["status"] == "ok"  # replaced: its new run succeeded
    assert not list((root / "_replaced").rglob("summary.json")), "old l2 not removed"


def test_force_interrupted_puts_the_old_run_back(tmp_path, fakes, capsys):
    config = experiment(tmp_path, [{"name": "naive"}])
    root = tmp_path / "results" / "rel"
    assert cli(capsys, config)[0] == 0
    old = snapshot(root / "naive")
    fakes.fail["naive seed 0"] = KeyboardInterrupt()
    rc, err = cli(capsys, config, "--force")
    assert rc == 130, err
    assert "interrupted during run 1/1 (naive seed 0)" in err and "put back" in err, err
    assert snapshot(root / "naive") == old


def test_unsafe_arm_name_never_reaches_the_file_system(tmp_path, fakes, capsys):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("precious")
    config = experiment(tmp_path, [{"name": "../../victim"}])
    rc, err = cli(capsys, config, "--force")
    assert rc == 2, err
    no_traceback(err)
    assert (victim / "keep.txt").read_text() == "precious"
    assert fakes.trained == []


def test_inside_refuses_paths_outside_the_root(tmp_path):
    root = tmp_path / "results"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert runner.inside(root / "a" / "seed-0", root) == (root / "a" / "seed-0").resolve()
    for bad in (root / ".." / "outside", root, root / "link", root / "a" / ".." / ".."):
        with pytest.raises(runner.ConfigError, match="outside the results directory"):
            runner.inside(bad, root)
    with pytest.raises(runner.ConfigError):
        runner._remove(root / "link", root)
    assert (tmp_path / "outside").is_dir()


# ----------------------------------------------------------------------------- one writer

def test_second_process_on_a_locked_results_directory_exits_2(tmp_path, fakes):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with dir_lock(root, "results directory"):
        proc = subprocess.run([sys.executable, "-m", "forgetkit.run", str(config)], cwd=ROOT,
                              env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    no_traceback(proc.stderr)
    line = [ln for ln in proc.stderr.splitlines() if "in use by forgetkit pid" in ln]
    assert line and str(os.getpid()) in line[0], proc.stderr[-3000:]
    assert not list(root.glob("*/seed-*")), "the second process wrote run folders"


def test_the_lock_is_held_for_the_whole_experiment(tmp_path, fakes, capsys, monkeypatch):
    config = experiment(tmp_path, [{"name": "naive"}])
    root = tmp_path / "results" / "rel"
    seen: list[str] = []

    def probe(run, launcher):
        try:
            with dir_lock(root, "results directory"):
                seen.append("free")
        except runner.ConfigError as e:
            seen.append(str(e))
        return Fakes.train_stage(fakes, run, launcher)

    monkeypatch.setattr(runner, "train_stage", probe)
    assert cli(capsys, config)[0] == 0
    assert len(seen) == 1 and "in use by forgetkit" in seen[0], seen


# ----------------------------------------------------------------------------- exit statuses

def test_failed_runs_exit_1_with_one_line_and_the_traceback_in_run_log(tmp_path, fakes,
                                                                      capsys, caplog):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    fakes.fail["l2 seed 0"] = ValueError("boom at step 2")
    rc, err = cli(capsys, config)
    assert rc == 1, err
    assert "forgetkit: 1 of 2 runs failed: l2 seed 0 (ValueError: boom at step 2)" in err, err
    no_traceback(err)
    s = summary(root, "l2")
    assert s["status"] == "failed" and s["error"] == "ValueError: boom at step 2"
    assert "traceback" not in s
    log_text = (root / "l2" / "seed-0" / "run.log").read_text()
    assert "Traceback" in log_text and "boom at step 2" in log_text
    assert summary(root, "naive")["status"] == "ok"  # the other arm went on
    # --debug: the traceback is logged too
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="forgetkit"):
        rc, err = cli(capsys, config, "--debug")
    assert rc == 1
    assert "Traceback" in caplog.text and "boom at step 2" in caplog.text


def test_ctrl_c_exits_130_names_the_run_and_resumes(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    fakes.fail["l2 seed 0"] = KeyboardInterrupt(
        "interrupted at step 2 (last checkpoint step-2); rerun the same command to resume")
    rc, err = cli(capsys, config)
    assert rc == 130, err
    assert ("interrupted during run 2/2 (l2 seed 0): interrupted at step 2 (last checkpoint "
            "step-2); finished runs are kept; rerun the same command to resume") in err, err
    no_traceback(err)
    assert not (root / "l2" / "seed-0" / "summary.json").exists()
    del fakes.fail["l2 seed 0"]
    rc, err = cli(capsys, config)
    assert rc == 0, err
    assert fakes.trained == ["naive seed 0", "l2 seed 0", "l2 seed 0"], fakes.trained


def test_collapsed_training_is_a_warning(tmp_path, fakes, capsys):
    config = experiment(tmp_path, [{"name": "naive"}])
    root = tmp_path / "results" / "rel"
    fakes.result = {"collapsed": True, "collapse": {"reason": "gradient norm exactly 0",
                                                     "from_step": 1, "to_step": 4}}
    rc, err = cli(capsys, config)
    assert rc == 0, err
    assert ("1 warning(s): naive seed 0: training collapsed (gradient norm exactly 0, steps "
            "1-4)") in err, err
    assert "training collapsed" in summary(root, "naive")["warnings"][0]
    assert "training collapsed" in (root / "summary.csv").read_text()
    rc, err = cli(capsys, config)  # a reused run keeps its warning
    assert rc == 0 and "training collapsed" in err, err


@pytest.mark.parametrize("text", ["", "# only a comment\n", "- a\n- b\n", "just a string\n"])
def test_empty_or_non_mapping_config_exits_2_in_one_line(tmp_path, capsys, text):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    rc, err = cli(capsys, path)
    assert rc == 2, err
    no_traceback(err)
    lines = [ln for ln in err.splitlines() if ln.startswith("forgetkit: ")]
    assert len(lines) == 1 and str(path) in lines[0], err


def test_dry_run_shows_the_checks_and_writes_nothing(tmp_path, fakes, capsys):
    config = experiment(tmp_path)
    rc, err = cli(capsys, config, "--dry-run")
    assert rc == 0, err
    assert "✓ data.train" in err and "✓ results directory" in err, err
    assert not (tmp_path / "results").exists()
    (tmp_path / "task_eval.jsonl").unlink()
    rc, err = cli(capsys, config, "--dry-run")
    assert rc == 2 and "✗" in err and "task_eval.jsonl" in err, err
    assert not (tmp_path / "results").exists()


def test_dry_run_estimates_only_the_runs_left(tmp_path, fakes, capsys):
    """Finished runs (reused) are not in the time estimate: 'of the 1 runs left (1 finished)';
    with every run finished, nothing is estimated."""
    config = experiment(tmp_path)
    rc, err = cli(capsys, config, "--dry-run")
    assert rc == 0 and "estimated time (rough" in err, err
    full = float(err.split("total ~")[1].split(" min")[0])
    assert cli(capsys, config, "experiment.seeds=[0]", "--arms", "naive")[0] == 0
    rc, err = cli(capsys, config, "--dry-run")
    assert rc == 0 and "estimated time of the 1 runs left (1 finished)" in err, err
    assert float(err.split("total ~")[1].split(" min")[0]) <= full
    assert cli(capsys, config)[0] == 0
    rc, err = cli(capsys, config, "--dry-run")
    assert rc == 0 and "nothing left to run" in err and "total ~" not in err, err


# ----------------------------------------------------------------------------- disk full

def _enospc_when(monkeypatch: pytest.MonkeyPatch, *parts: str) -> None:
    """json.dump in forgetkit.results writes half a file, then fails with ENOSPC, for paths
    containing every one of ``parts``."""
    real = results.json.dump

    def dump(obj, fh, **kw):
        if all(p in fh.name for p in parts):
            fh.write('{"half": ')
            fh.flush()
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, fh, **kw)

    monkeypatch.setattr(results.json, "dump", dump)


def test_disk_full_is_named_tmp_files_removed_other_arms_continue(tmp_path, fakes, capsys,
                                                                  monkeypatch):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    _enospc_when(monkeypatch, "naive", "eval_after.json")
    rc, err = cli(capsys, config)
    assert rc == 1, err
    no_traceback(err)
    s = summary(root, "naive")
    assert s["status"] == "failed"
    assert "disk full while writing" in s["error"] and "eval_after.json" in s["error"]
    assert "MB free on /" in s["error"], s["error"]
    assert summary(root, "l2")["status"] == "ok"
    assert not list(root.rglob("*.tmp")), list(root.rglob("*.tmp"))


def test_summary_that_cannot_be_written_stops_with_exit_1(tmp_path, fakes, capsys, monkeypatch):
    config = experiment(tmp_path)
    root = tmp_path / "results" / "rel"
    _enospc_when(monkeypatch, "naive", "summary.json")
    rc, err = cli(capsys, config)
    assert rc == 1, err
    no_traceback(err)
    last = err.strip().splitlines()[-1]
    assert last.startswith("forgetkit: ") and "disk full while writing" in last, err
    assert "summary.json" in last and "MB free on" in last, last
    assert fakes.trained == ["naive seed 0"], "the experiment went on without recording results"
    assert not list(root.rglob("*.tmp"))


def test_write_json_removes_its_temporary_file_on_any_failure(tmp_path, monkeypatch):
    _enospc_when(monkeypatch, "x.json")
    with pytest.raises(OSError, match="disk full while writing .*x.json: .*MB free on"):
        results.write_json(tmp_path / "x.json", {"a": 1})
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------- shared caches

def test_cache_keys_follow_the_contents_of_their_data(tmp_path):
    from forgetkit.config import read_yaml

    general = tmp_path / "general.jsonl"
    general.write_text("".join(json.dumps({"text": f"line {i}"}) + "\n" for i in range(8)))
    fisher = {"type": "ewc", "fisher_data": {"path": str(general), "format": "text"},
              "fisher_examples": 4}
    config = experiment(tmp_path, [{"name": "ewc", "overrides": {"regularizers": [fisher]}}])

    def keys() -> tuple[str, str | None]:
        _, runs = runner.plan_runs(read_yaml(config), str(config))
        return runner.eval_cache_key(runs[0].cfg), runs[0].cfg.regularizers[0].fisher_path

    ev0, fi0 = keys()
    assert keys() == (ev0, fi0)  # stable
    general.write_text(general.read_text() + json.dumps({"text": "more"}) + "\n")
    ev1, fi1 = keys()
    assert fi1 != fi0 and ev1 == ev0  # the Fisher data changed, the eval data did not
    write_instruction_data(tmp_path / "task_eval.jsonl", n=4, seed=7)
    ev2, fi2 = keys()
    assert ev2 != ev1 and fi2 == fi1
    # the Fisher cache file is named by role in the identity: moving the results tree does
    # not make a finished run look like another config
    _, runs = runner.plan_runs(read_yaml(config), str(config))
    assert runner.identity_of(runs[0].cfg)["regularizers.0.fisher_path"].startswith("(the ")


# ----------------------------------------------------------------------------- forgetkit.train

def test_train_face_exit_statuses(tmp_path, capsys, monkeypatch):
    from forgetkit.train import __main__ as train_face
    from forgetkit.train import loop

    cfg = tiny_config_dict(tmp_path)
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = Path(cfg["output"]["dir"])
    monkeypatch.delenv("FORGETKIT_DEBUG", raising=False)

    def fail(exc: BaseException):
        def train(*a, **k):
            out.mkdir(parents=True, exist_ok=True)
            raise exc
        monkeypatch.setattr(loop, "train", train)
        rc = train_face.main([str(path)])
        return rc, capsys.readouterr().err

    rc, err = fail(loop.NonFiniteLoss("non-finite loss at step 3; lower training.lr"))
    assert rc == 1 and "forgetkit: NonFiniteLoss: non-finite loss at step 3" in err, err
    no_traceback(err)
    assert "Traceback" in (out / "run.log").read_text()
    rc, err = fail(OSError(errno.ENOSPC, "No space left on device", str(out / "x")))
    assert rc == 1 and "disk full while writing" in err and "MB free on" in err, err
    rc, err = fail(KeyboardInterrupt())
    assert rc == 130 and "rerun the same command to resume" in err, err
    no_traceback(err)
    rc = train_face.main([str(path), "--dry-run"])
    err = capsys.readouterr().err
    assert rc == 0 and "✓ data.train" in err, err
    (tmp_path / "task.jsonl").write_text("{broken\n")
    rc = train_face.main([str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "task.jsonl" in err, err
    no_traceback(err)


def main_with_fakes(argv: list[str]) -> int:
    """``forgetkit.run`` with the fake stages, for tests that need their own process."""
    f = Fakes()
    runner.train_stage = f.train_stage
    runner.evaluate = lambda model_dir, cfg: json.loads(json.dumps(SCORES))
    runner.base_checkpoint = lambda cfg, root: "base-model"
    runner.layer_summaries = lambda run, base: None
    return run_face.main(argv)


def _private_mounts() -> list[str] | None:
    """A command prefix that gives its process a private mount namespace (so it can mount a
    small tmpfs), or None where this machine does not allow one."""
    for prefix in (["unshare", "-m"], ["unshare", "-Urm"]):
        try:
            ok = subprocess.run([*prefix, "true"], capture_output=True, timeout=30).returncode == 0
        except (OSError, subprocess.SubprocessError):
            ok = False
        if ok:
            return prefix
    return None


def test_a_really_full_disk_stops_with_one_line_and_no_tmp_files(tmp_path):
    """The results directory on a 256 KiB tmpfs filled to a few pages: the write that hits the
    full disk is named, with the free space; nothing half-written is left."""
    prefix = _private_mounts()
    if prefix is None:
        pytest.skip("needs a private mount namespace (unshare -m) to mount a small tmpfs")
    config = experiment(tmp_path)
    root = tmp_path / "results"
    root.mkdir()
    script = (f"mount -t tmpfs -o size=256k tmpfs {root} || exit 99; "
              f"dd if=/dev/zero of={root}/filler bs=4096 count=60 2>/dev/null; cd {ROOT}; "
              f"{sys.executable} -c 'import sys; sys.path.insert(0, \"tests\"); "
              f"import test_runner_reliability as t; sys.exit(t.main_with_fakes([\"{config}\"]))'; "
              f"rc=$?; find {root} -name '*.tmp'; exit $rc")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([*prefix, "sh", "-c", script], env=env, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 99:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    err = proc.stderr
    no_traceback(err)
    last = [ln for ln in err.splitlines() if ln.startswith("forgetkit: ")][-1]
    assert "disk full while writing" in last and f"MB free on {root}" in last, err[-3000:]
    assert ".tmp" not in proc.stdout, f"temporary files left behind: {proc.stdout}"


def test_results_dir_with_an_unknown_placeholder_is_a_config_error(tmp_path):
    from forgetkit.config import ConfigError, config_from_dict

    raw = tiny_config_dict(tmp_path)
    raw["experiment"] = {"results_dir": str(tmp_path / "results" / "{nme}")}
    with pytest.raises(ConfigError, match=r"experiment.results_dir.*\{nme\}.*\{name\}"):
        config_from_dict(raw, "x.yaml")


def test_grid_values_become_safe_distinct_names():
    from forgetkit.config import ArmSpec, check_slug
    from forgetkit.runner import expand_arms

    arms = [ArmSpec(name="b", grid={"data.train.path": ["/data/a/task.jsonl", "/data/b/task.jsonl"],
                                    "training.lr": [1e-4], "regularizers.0.include": [["mlp"]]})]
    names = [n for n, _, _ in expand_arms(arms)]
    assert len(set(names)) == 2, names  # same file name in two folders: still two names
    for n in names:
        check_slug(n, "experiment.arms", "test")  # raises if unsafe
    assert names[0].startswith("b@path=task.jsonl-") and "@lr=0.0001@" in names[0], names


def test_interrupt_stops_the_whole_training_group_before_returning(tmp_path, monkeypatch):
    """A trainer (and a worker it started, as torchrun does) that ignore SIGINT are killed
    after the grace period: nothing of the group survives to write into a run folder that
    --force puts back."""
    import signal
    import time

    monkeypatch.setattr(runner, "STOP_GRACE_S", 1.0)
    pids = tmp_path / "pids"
    code = ("import os, signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "w = subprocess.Popen([sys.executable, '-c', 'import signal, time; "
            "signal.signal(signal.SIGINT, signal.SIG_IGN); time.sleep(60)'])\n"
            f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{w.pid}}')\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 30
    while not (pids.exists() and len(pids.read_text().split()) == 2):
        assert time.monotonic() < deadline, "the child did not start"
        time.sleep(0.05)
    t0 = time.monotonic()
    runner._stop_group(proc)
    assert proc.poll() is not None and time.monotonic() - t0 < 20
    worker = int(pids.read_text().split()[1])
    for _ in range(100):  # the orphaned worker is reaped by init: wait until it is gone
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        os.kill(worker, signal.SIGKILL)
        pytest.fail("the worker of the training process survived the interrupt")
