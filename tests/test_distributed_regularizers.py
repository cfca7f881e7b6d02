"""Regularizers under 2 CPU processes (gloo): the Fisher and the trained weights equal 1 process.

Three runs of the smoke model (tiny 2-layer Llama), each composing three regularizers::

    ewc   (empirical Fisher, per example, on FISHER_EXAMPLES general-text examples, on the MLP
           weights only: ``include: [mlp]``)
    l2_1  (L2-SP, coupled: gradient term before clipping)
    l2_2  (L2-SP, decoupled: pull toward theta0 after the optimizer step)

trained for MAX_STEPS optimizer steps with a global batch of 8:

    1 process   x micro 2 x accumulation 4   plain backend            (the reference)
    2 processes x micro 2 x accumulation 2   DDP                      (via torchrun)
    2 processes x micro 2 x accumulation 2   FSDP2 (sharded anchors)  (via torchrun)
    1 process   x micro 2 x accumulation 4   no regularizer           (the naive run)

What must hold:

* The Fisher file each run writes (``fisher-ewc.safetensors``, gathered to full tensors) equals
  the reference's. DDP splits the Fisher batches over the ranks, each rank squares its *own*
  per-example gradients (unwrapped module: no gradient all-reduce) and the per-rank sums are
  all-reduced; FSDP runs every example in lockstep on every rank and squares the local shard of
  each per-example gradient. Both must give the per-example Fisher, not the square of a gradient
  averaged over ranks or examples: the test checks that such an estimate (the ``batched``
  estimator with 2 examples per batch -- what "each rank's gradient, averaged by DDP, then
  squared" computes) is far outside the tolerance, so the comparison would catch it.
* Training with the three regularizers gives the same weights, per-step loss, pre-clip gradient
  norm and per-regularizer logged value (``reg/ewc``, ``reg/l2_1``, ``reg/l2_2``) as the
  reference, with the tolerances of tests/test_distributed.py. Under FSDP the anchors are the
  local shards (each rank holds half of theta0) and the logged values are all-reduced.
* Step 1 of every regularized run has the pre-clip gradient norm of the naive run: at theta0
  every regularizer term is 0, so nothing else may enter the first step -- in particular not
  the gradients that the Fisher estimate's backward passes leave on the parameters outside
  ``include`` (1 process: the vmap path; DDP: per rank; FSDP: the per-example loop, in lockstep).

Runtime: four launches, ~100 s on 2 shared cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from dist_utils import max_abs_diff, reports, run_worker, step_logs
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "experiments" / "smoke.yaml"
DATA = REPO / "experiments" / "data" / "smoke_task.jsonl"
GENERAL = REPO / "experiments" / "data" / "smoke_general.jsonl"

NPROC = 2
MAX_STEPS = 4
MICRO = 2
ACCUM_2PROC = 2
ACCUM_1PROC = ACCUM_2PROC * NPROC  # same global batch of 8
ATOL, RTOL = 1e-5, 1e-4  # weights, as in tests/test_distributed.py
LOG_RTOL = 1e-5  # per-step loss, gradient norm and regularizer values
FISHER_RTOL = 1e-5
FISHER_EXAMPLES = 12  # odd number of batches of 4 (3): the DDP split is uneven, 2 + 1
FISHER_BATCH = 4
REG_NAMES = ("ewc", "l2_1", "l2_2")

REGULARIZERS: list[dict[str, Any]] = [
    {"type": "ewc", "lambda": 10.0, "estimator": "empirical",
     "fisher_data": {"path": str(GENERAL), "format": "text"},
     "fisher_examples": FISHER_EXAMPLES, "fisher_batch_size": FISHER_BATCH,
     "include": ["mlp"]},
    {"type": "l2", "lambda": 1.0, "variant": "coupled"},
    {"type": "l2", "lambda": 10.0, "variant": "decoupled"},
]

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)


# ----------------------------------------------------------------------------- helpers
def config_dict(out_dir: Path, accum: int, regularizers: list[dict[str, Any]] | None = None,
                **distributed: Any) -> dict[str, Any]:
    cfg = yaml.safe_load(SMOKE.read_text())
    cfg["data"]["train"].update(path=str(DATA), limit=64)
    cfg["training"].update(micro_batch_size=MICRO, gradient_accumulation_steps=accum,
                           max_steps=MAX_STEPS, log_every=1, eval_every=0, checkpoint_every=0,
                           # no warmup: under transformers' schedule warmup step 0 has lr 0, and
                           # the penalties would stay 0 one step longer
                           warmup_ratio=0.0, warmup_steps=0)
    cfg["regularizers"] = REGULARIZERS if regularizers is None else regularizers
    cfg["distributed"] = {"cpu": True, **distributed}
    cfg["output"] = {"dir": str(out_dir)}
    return cfg


def train(root: Path, name: str, nproc: int, accum: int,
          regularizers: list[dict[str, Any]] | None = None, **distributed: Any) -> Path:
    out = root / name
    config = root / f"{name}.yaml"
    config.write_text(yaml.safe_dump(config_dict(out, accum, regularizers, **distributed),
                                     sort_keys=False))
    run_worker(config, nproc)
    return out


def fisher(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "fisher-ewc.safetensors"))


def rel_l1(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """sum |a - b| / sum |b| over all entries."""
    num = sum((a[k].double() - b[k].double()).abs().sum().item() for k in b)
    return num / sum(b[k].double().abs().sum().item() for k in b)


def assert_fisher_close(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
                        what: str) -> None:
    assert sorted(got) == sorted(ref), what
    scale = max(t.abs().max().item() for t in ref.values())
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=FISHER_RTOL, atol=FISHER_RTOL * scale,
                                   msg=lambda m, k=k: f"{what}: Fisher of {k}: {m}")


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist_regs")
    return {
        "reference": train(root, "reference", 1, ACCUM_1PROC),
        "ddp": train(root, "ddp", NPROC, ACCUM_2PROC, strategy="ddp"),
        "fsdp": train(root, "fsdp", NPROC, ACCUM_2PROC, strategy="fsdp"),
        "naive": train(root, "naive", 1, ACCUM_1PROC, regularizers=[]),
    }


# ----------------------------------------------------------------------------- tests

def test_reference_fisher_is_per_example_and_distinguishable(runs: dict[str, Path]) -> None:
    """The reference Fisher is the per-example empirical Fisher at theta0 (recomputed here),
    and the square of averaged gradients is far outside FISHER_RTOL of it."""
    from forgetkit.config import load_config
    from forgetkit.data.batching import make_batches
    from forgetkit.data.sets import load_examples
    from forgetkit.models import load_model
    from forgetkit.regularizers.fisher import estimate_fisher

    ref = fisher(runs["reference"])
    cfg = load_config(runs["reference"].parent / "reference.yaml")
    rc = cfg.regularizers[0]
    model, tok = load_model(cfg.model)
    examples = load_examples(rc.fisher_data, tok, max_length=cfg.data.max_length,
                             train_on_prompt=cfg.data.train_on_prompt, seed=cfg.seed,
                             limit=rc.fisher_examples)
    assert len(examples) == FISHER_EXAMPLES
    assert ref and all(".mlp." in n for n in ref), sorted(ref)  # include: [mlp]

    def est(batch_size: int, estimator: str) -> dict[str, torch.Tensor]:
        batches = make_batches(examples, batch_size, tok.pad_token_id,
                               cfg.data.pad_to_multiple_of)
        return estimate_fisher(model, batches, estimator, per_example="loop",
                               params=[(n, p) for n, p in model.named_parameters() if n in ref])

    assert_fisher_close(est(FISHER_BATCH, "empirical"), ref, "in-process recomputation")
    # "Each rank's gradient averaged over the 2 ranks, then squared" = the batched estimator on
    # batches of 2. At a random init the mean gradient dominates, so it is "only" ~15% off
    # (near a minimum it would be ~F/2): still ~10^4 times the tolerance.
    wrong = est(2, "batched")
    assert rel_l1(wrong, ref) > 1000 * FISHER_RTOL, rel_l1(wrong, ref)
    with pytest.raises(AssertionError):
        assert_fisher_close(wrong, ref, "batched")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_fisher_equals_one_process(strategy: str, runs: dict[str, Path]) -> None:
    got, ref = fisher(runs[strategy]), fisher(runs["reference"])
    print(f"\n{strategy}: max |F_2proc - F_1proc| = {max_abs_diff(got, ref):.3e} "
          f"(max F {max(t.max().item() for t in ref.values()):.3e})")
    assert_fisher_close(got, ref, strategy)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_training_with_regularizers_equals_one_process(
        strategy: str, runs: dict[str, Path]) -> None:
    out, reference = runs[strategy], runs["reference"]
    reps = reports(out)
    assert [r["rank"] for r in reps] == list(range(NPROC)), reps
    for rep in reps:
        assert rep["world_size"] == NPROC and rep["steps"] == MAX_STEPS, rep
        if strategy == "ddp":
            assert rep["wrapper"] == "DistributedDataParallel", rep
        else:
            assert rep["backend"] == "FSDPBackend" and rep["fsdp"], rep
    (rep,) = reports(reference)
    assert rep["world_size"] == 1 and rep["wrapper"] == "LlamaForCausalLM", rep

    ref_w = load_file(str(reference / "model" / "model.safetensors"))
    got_w = load_file(str(out / "model" / "model.safetensors"))
    assert sorted(got_w) == sorted(ref_w)
    diff = max_abs_diff(got_w, ref_w)
    print(f"\n{strategy}: max |w_2proc - w_1proc| = {diff:.3e}")
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: (
            f"{strategy}: {k} differs from the 1-process run (max diff {diff:.3e}): {m}"))

    ref_log, got_log = step_logs(reference), step_logs(out)
    assert [r["step"] for r in got_log] == [r["step"] for r in ref_log] == \
        list(range(1, MAX_STEPS + 1))
    for a, b in zip(got_log, ref_log, strict=True):
        assert a["lr"] == b["lr"] and a["target_tokens"] == b["target_tokens"], (a, b)
        for key in ("loss", "grad_norm", *(f"reg/{n}" for n in REG_NAMES)):
            assert a[key] == pytest.approx(b[key], rel=LOG_RTOL, abs=1e-12), (key, a, b)


def test_regularizers_are_active(runs: dict[str, Path]) -> None:
    """The equality above is not vacuous: every penalty is of a visible size once the weights
    have moved (coupled terms are logged before the step, so they are 0 at step 1), and the
    gradient norm the runs agree on includes the penalties' gradients (added before clipping)."""
    logs = step_logs(runs["reference"])
    for n in REG_NAMES:
        vals = [r[f"reg/{n}"] for r in logs]
        assert min(vals[1:]) > 1e-3, (n, vals)
    assert max(t.max().item() for t in fisher(runs["reference"]).values()) > 0


@pytest.mark.parametrize("name", ["reference", "ddp", "fsdp"])
def test_step_1_is_the_naive_step(name: str, runs: dict[str, Path]) -> None:
    """At theta0 the three regularizer terms are 0: step 1's pre-clip gradient norm is the naive
    run's (LOG_RTOL: the 2-process runs sum in another order). Fisher-example gradients left on
    the parameters outside ``include`` made it 100-500x larger (890.7 vs 1.748 under FSDP)."""
    got = step_logs(runs[name])[0]
    ref = step_logs(runs["naive"])[0]
    assert got["step"] == ref["step"] == 1
    assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=LOG_RTOL), (
        f"{name}: step-1 gradient norm {got['grad_norm']:.6g} vs naive {ref['grad_norm']:.6g}")


# ----------------------------------------------------------------------------- KL under DDP

KL = [{"type": "kl", "lambda": 1.0, "temperature": 2.0, "batch_size": 2,
       "data": {"path": str(GENERAL), "format": "text"}}]


@pytest.fixture(scope="module")
def kl_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """KL to the initial model: 1 process x accumulation 4 against DDP 2 x 2. KL batch
    ``k = call * world_size + rank``: per optimizer step the 1-process run draws batches
    0, 1, 2, 3 and the ranks 0, 2 / 1, 3 -- the same four batches, each penalty averaged over
    the 4 micro-batches (1/n_micro per call, and DDP's mean over the 2 ranks)."""
    root = tmp_path_factory.mktemp("dist_kl")
    return {"reference": train(root, "kl_reference", 1, ACCUM_1PROC, regularizers=KL),
            "ddp": train(root, "kl_ddp", NPROC, ACCUM_2PROC, regularizers=KL, strategy="ddp")}


def test_two_process_kl_equals_one_process(kl_runs: dict[str, Path]) -> None:
    out, reference = kl_runs["ddp"], kl_runs["reference"]
    for rep in reports(out):
        assert rep["world_size"] == NPROC and rep["wrapper"] == "DistributedDataParallel", rep
    ref_w = load_file(str(reference / "model" / "model.safetensors"))
    got_w = load_file(str(out / "model" / "model.safetensors"))
    diff = max_abs_diff(got_w, ref_w)
    print(f"\nkl ddp: max |w_2proc - w_1proc| = {diff:.3e}")
    for k in ref_w:
        torch.testing.assert_close(got_w[k], ref_w[k], atol=ATOL, rtol=RTOL, msg=lambda m, k=k: (
            f"kl ddp: {k} differs from the 1-process run (max diff {diff:.3e}): {m}"))
    ref_log, got_log = step_logs(reference), step_logs(out)
    assert [r["step"] for r in got_log] == [r["step"] for r in ref_log] == \
        list(range(1, MAX_STEPS + 1))
    for a, b in zip(got_log, ref_log, strict=True):
        for key in ("loss", "grad_norm", "reg/kl"):
            assert a[key] == pytest.approx(b[key], rel=LOG_RTOL, abs=1e-12), (key, a, b)
    # not vacuous: KL is exactly 0 at theta0 (step 1), of a visible size once the weights moved
    vals = [r["reg/kl"] for r in ref_log]
    assert vals[0] == pytest.approx(0.0, abs=1e-9) and min(vals[1:]) > 1e-6, vals
