"""L2-SP with an ``anchor_path`` (a sequence's ``anchor: base``) under FSDP2 on 2 CPU processes.

theta0 is read from a checkpoint that is *not* the run's starting weights (the base model of a
later stage); under FSDP each rank keeps only its shard of it. Two runs of the smoke model,
decoupled L2-SP (its pull is exactly ``lr * lambda * (theta - theta0)``, so a wrong anchor moves
the weights visibly):

    1 process   x micro 2 x accumulation 4   plain backend   (the reference)
    2 processes x micro 2 x accumulation 2   FSDP2           (sharded anchors)

What must hold: the checkpointed theta0 fingerprint (global sum, sum of squares, count; all-
reduced over the shards) is the anchor checkpoint's and not the starting weights'; the FSDP run's
final weights equal the reference's (the tolerances of tests/test_distributed.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from dist_utils import reports, run_worker
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smoke.yaml"
DATA = REPO / "experiments" / "data" / "smoke_task.jsonl"
ATOL, RTOL = 1e-5, 1e-4  # weights, as in tests/test_distributed.py

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


def _fingerprint(t: dict[str, torch.Tensor], names: list[str]) -> list[float]:
    xs = [t[n].double() for n in names]
    return [float(sum(x.sum() for x in xs)), float(sum((x * x).sum() for x in xs)),
            float(sum(x.numel() for x in xs))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Path]]:
    from forgetkit.config import config_from_dict
    from forgetkit.models import load_model, save_hf_checkpoint

    root = tmp_path_factory.mktemp("seq_dist")
    base = yaml.safe_load(SMOKE.read_text())
    model, tok = load_model(config_from_dict(base).model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # "the base model": other weights than the run starts from
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    save_hf_checkpoint(model, tok, root / "anchor")
    out: dict[str, Path] = {}
    for name, nproc, accum, dist in (("reference", 1, 4, {}), ("fsdp", 2, 2,
                                                               {"strategy": "fsdp"})):
        cfg = yaml.safe_load(SMOKE.read_text())
        cfg["data"]["train"].update(path=str(DATA), limit=64)
        cfg["training"].update(micro_batch_size=2, gradient_accumulation_steps=accum,
                               max_steps=3, log_every=1, eval_every=0, checkpoint_every=0,
                               warmup_ratio=0.0, warmup_steps=0)
        cfg["regularizers"] = [{"type": "l2", "lambda": 10.0, "variant": "decoupled",
                                "anchor": "base", "anchor_path": str(root / "anchor")}]
        cfg["distributed"] = {"cpu": True, **dist}
        cfg["output"] = {"dir": str(root / name)}
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        run_worker(path, nproc)
        out[name] = root / name
    return root, out


def test_anchor_path_is_theta0_sharded_or_not(runs):
    root, out = runs
    anchor = load_file(str(root / "anchor" / "model.safetensors"))
    assert reports(out["fsdp"])[0]["fsdp"] is True  # FSDP really ran
    fingerprints = []
    for name in ("reference", "fsdp"):
        ckpt = max((out[name] / "checkpoints").glob("step-*"),
                   key=lambda p: int(p.name.split("-")[1]))
        state = json.loads((ckpt / "regularizers-rank0.json").read_text())["l2"]
        fp = state["fingerprint"]["theta0"]
        assert fp == pytest.approx(_fingerprint(anchor, state["names"]), rel=1e-9), name
        fingerprints.append(fp)
    assert fingerprints[0] == pytest.approx(fingerprints[1], rel=1e-9)
    ref = load_file(str(out["reference"] / "model" / "model.safetensors"))
    got = load_file(str(out["fsdp"] / "model" / "model.safetensors"))
    assert sorted(ref) == sorted(got)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=RTOL, msg=k)
    # the pull went toward the anchor, not the start: the trained weights are nearer the anchor
    # than the start was (a pull toward the start would leave them about as far)
    from forgetkit.config import config_from_dict
    from forgetkit.models import load_model

    start, _ = load_model(config_from_dict(yaml.safe_load(SMOKE.read_text())).model)
    s = {n: p.detach() for n, p in start.named_parameters()}

    def dist(a: dict[str, torch.Tensor]) -> float:
        return sum(float((a[k].double() - anchor[k].double()).pow(2).sum()) for k in s) ** 0.5

    assert dist(ref) < 0.99 * dist(s)
