"""The hub-name experiment files validate (every arm resolved), without running or downloading."""

from __future__ import annotations

from pathlib import Path

import pytest

from forgetkit import assets  # noqa: F401  (registers the dataset aliases the files use)
from forgetkit.config import read_yaml
from forgetkit.data import sources
from forgetkit.runner import plan_runs

HUB = Path(__file__).resolve().parents[1] / "experiments" / "hub"
FILES = sorted(HUB.glob("*.yaml"))


def test_hub_dir_has_experiments() -> None:
    assert FILES, f"no experiment files in {HUB}"


@pytest.mark.parametrize("path", FILES, ids=[p.name for p in FILES])
def test_hub_experiment_plans(path: Path) -> None:
    base, runs = plan_runs(read_yaml(path), str(path))
    assert runs
    assert base.model.name_or_path == "HuggingFaceTB/SmolLM2-135M-Instruct"
    arms = {r.arm for r in runs}
    assert "naive" in arms
    for r in runs:
        cfg = r.config if hasattr(r, "config") else r.cfg
        train = cfg.data.train
        assert train.path in sources.ALIASES or train.name, train
        tasks = {m.task for m in cfg.evaluation.general if m.kind == "lm_eval"}
        assert {"piqa", "boolq", "arc_easy", "hellaswag", "mmlu"} <= tasks
        assert not any(t and t.startswith("fk_") for t in tasks)  # hub variant: built-ins only
        for m in [*cfg.evaluation.task, *cfg.evaluation.general]:
            if m.data is not None and m.data.path:
                assert m.data.path in sources.ALIASES
                # medical evaluation never reads the training split
                assert m.data.split != train.split


def test_medmcqa_hub_refuses_unlabelled_test_split() -> None:
    from forgetkit.config import ConfigError, DatasetSpec

    with pytest.raises(ConfigError, match="no answers"):
        sources.load_records(DatasetSpec(path="medmcqa_hub", split="test"))
