"""End to end: a tiny model learns task A, then task B; the mitigations forget less of A.

The setting (all through the real loop, ``forgetkit.train.loop.train``, with the regularizers
built from the config by ``build_regularizers``):

* task A, "reverse the word", chat format (the byte tokenizer's template; the loss is on the
  answer only): a random-init 2-layer Llama (width 64, byte tokenizer) is trained on it for
  A_STEPS steps and saved as a HF checkpoint, theta_A (``<out>/model``);
* task B, "uppercase the word", on other words: theta_A is fine-tuned on it for B_STEPS steps
  (``model.name_or_path`` = the theta_A directory, tokenizer read from there too), four times
  with the same seed, data order and optimizer: naive, L2-SP (coupled, lambda L2_LAMBDA), EWC
  (empirical Fisher on task-A training data, lambda EWC_LAMBDA) and replay (task-A training data
  mixed in at REPLAY_RATIO). The gradient clip acts on the loss gradient only
  (``clip_scope: loss``): the coupled L2-SP/EWC terms are added after it, so a stiff EWC term
  cannot shrink the task gradient of every weight (see results/ewc_medical: inside the clip,
  EWC made forgetting worse; here it removed as little as 11 % of naive's rise on some CPUs);
* held-out losses (mean per answer token, on words seen in neither training set) of both tasks
  are measured for theta_A and every fine-tuned model.

Why the verdicts are *relative*. 230 optimizer steps from a random init are a chaotic
trajectory: the last-bit differences between CPU kernels (Intel/AMD, ``ATEN_CPU_CAPABILITY``
default / avx2 / avx512) grow until two machines train visibly different models, with the same
distribution of outcomes. Naive's rise of task-A loss was 0.72 nats on an AVX-512 Xeon and
1.76 / 2.31 on an AMD EPYC with default / AVX2 kernels, same seed. So no fixed nats margin holds
everywhere; what holds is the *shape*: naive forgets a good part of what A learned and each
mitigation removes a part of that rise. The thresholds below come from the distribution of
those fractions over 11 perturbed trajectories (stage seeds 0-5 x default/AVX2 kernels on an
AMD EPYC; a seed changes the trajectory far more than a kernel set does, so this over-samples
the machine-to-machine spread; ``OMP_NUM_THREADS`` 1 vs 2 gave bit-identical results):

    quantity (this file's settings)                        min    mean   max
    naive rise / what A learned  (init - theta_A)          0.20   0.64   1.29
    share of naive's rise removed, L2-SP (lambda 1)        0.23   0.63   0.86
                                   EWC (lambda 1e3)        0.48   0.79   1.00
                                   replay (30 %)           0.62   0.80   0.95
    share of naive's task-B gain kept, every mitigation    0.72   0.88   1.08

* FORGOTTEN_SHARE = 0.10: naive loses at least 10 % of what stage A learned (observed >= 20 %).
* REMOVED_SHARE = 0.125: each mitigation removes at least 1/8 of naive's rise (observed >= 23 %;
  for L2-SP that is 2.2 standard deviations below its mean 0.63, sd 0.18). A mitigation that is
  inactive or acts the wrong way removes 0 or less.
* MEAN_REMOVED_SHARE = 1/3: the three together remove at least a third on average (observed
  >= 0.53).
* KEPT_GAIN_SHARE = 0.5: every run keeps at least half of naive's task-B improvement (observed
  >= 0.72): the mitigations do not win by not learning B.

Runtime: ~30-45 s on one (shared) CPU core.
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from forgetkit.config import DatasetSpec, ModelConfig, config_from_dict
from forgetkit.data.batching import make_batches
from forgetkit.data.sets import load_examples
from forgetkit.data.templates import IGNORE_INDEX
from forgetkit.models import load_model
from forgetkit.train.loop import token_losses, train

pytestmark = pytest.mark.slow

TINY = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "tie_word_embeddings": True}
MAX_LENGTH = 64
A_STEPS, A_LR = 200, 3e-3
B_STEPS, B_LR, B_BATCH = 30, 1e-3, 32
SEED = 0
L2_LAMBDA = 1.0
EWC_LAMBDA = 1000.0
REPLAY_RATIO = 0.3
B_CLIP_SCOPE = "loss"
# Thresholds, all relative to what this test measures; see the module docstring for the data.
FORGOTTEN_SHARE = 0.10
REMOVED_SHARE = 0.125
MEAN_REMOVED_SHARE = 1 / 3
KEPT_GAIN_SHARE = 0.5

TASK_A = ("Reverse.", lambda w: w[::-1])
TASK_B = ("Uppercase.", str.upper)


def _words(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 10)))
            for _ in range(n)]


def _write(path: Path, words: list[str], task: tuple[str, Any]) -> Path:
    instruction, answer = task
    with path.open("w") as f:
        for w in words:
            f.write(json.dumps({"instruction": instruction, "input": w,
                                "output": answer(w)}) + "\n")
    return path


def _spec(path: Path) -> dict[str, Any]:
    return {"path": str(path), "format": "chat"}


def _config(out: Path, model: dict[str, Any], data: Path, steps: int, lr: float,
            batch: int, regularizers: Sequence[dict[str, Any]] = (),
            clip_scope: str = "all", replay: dict[str, Any] | None = None) -> Any:
    return config_from_dict({
        "name": out.name, "seed": SEED, "model": model,
        "data": {"train": _spec(data), "validation_fraction": 0.0, "max_length": MAX_LENGTH,
                 "replay": replay},
        "training": {"micro_batch_size": batch, "max_steps": steps, "lr": lr,
                     "warmup_ratio": 0.1, "scheduler": "cosine", "log_every": 10,
                     "resume": False, "clip_scope": clip_scope},
        "regularizers": list(regularizers),
        "output": {"dir": str(out)},
    })


def _run(cfg: Any) -> Path:
    result = train(cfg, progress=False)
    assert result.model_dir is not None
    return result.model_dir


@torch.no_grad()
def heldout_loss(model_dir: Path | None, data: Path, model_cfg: dict[str, Any] | None = None
                 ) -> float:
    """Mean loss per answer token of ``data`` under the HF checkpoint ``model_dir``."""
    mc = ModelConfig(**(model_cfg or {"name_or_path": str(model_dir)}))
    model, tok = load_model(mc)
    model.eval()
    examples = load_examples(DatasetSpec(**_spec(data)), tok, max_length=MAX_LENGTH)
    total = count = 0.0
    for b in make_batches(examples, 64, tok.pad_token_id):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        total += token_losses(out, b["labels"]).sum().item()
        count += (b["labels"] != IGNORE_INDEX).sum().item()
    return total / count


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """method -> {"A": task-A held-out loss, "B": task-B held-out loss}; plus init, theta_A."""
    root = tmp_path_factory.mktemp("forgetting")
    a_train = _write(root / "a_train.jsonl", _words(256, 1), TASK_A)
    a_test = _write(root / "a_test.jsonl", _words(64, 2), TASK_A)
    b_train = _write(root / "b_train.jsonl", _words(256, 3), TASK_B)
    b_test = _write(root / "b_test.jsonl", _words(64, 4), TASK_B)

    init = {"random_init": TINY, "tokenizer": "byte"}
    theta_a = _run(_config(root / "task_a", init, a_train, A_STEPS, A_LR, 16))
    out: dict[str, dict[str, Any]] = {
        "init": {"A": heldout_loss(None, a_test, init), "B": heldout_loss(None, b_test, init)},
        "theta_A": {"A": heldout_loss(theta_a, a_test), "B": heldout_loss(theta_a, b_test)},
    }
    methods: dict[str, dict[str, Any]] = {  # _config keywords of each method
        "naive": {},
        "l2": {"regularizers": [{"type": "l2", "lambda": L2_LAMBDA}]},
        "ewc": {"regularizers": [{"type": "ewc", "lambda": EWC_LAMBDA,
                                  "fisher_data": _spec(a_train), "fisher_examples": 64,
                                  "fisher_batch_size": 16}]},
        "replay": {"replay": {"ratio": REPLAY_RATIO, "data": _spec(a_train)}},
    }
    start = {"name_or_path": str(theta_a)}  # the HF checkpoint dir (tokenizer saved with it)
    for name, kw in methods.items():
        run_dir = root / f"task_b_{name}"
        model_dir = _run(_config(run_dir, start, b_train, B_STEPS, B_LR, B_BATCH,
                                 clip_scope=B_CLIP_SCOPE, **kw))
        out[name] = {"A": heldout_loss(model_dir, a_test), "B": heldout_loss(model_dir, b_test)}
        logs = [json.loads(x) for x in (run_dir / "train_log.jsonl").read_text().splitlines()]
        out[name]["logged"] = logs
    print("\n" + "\n".join(f"{k:8s} task A {v['A']:.4f}  task B {v['B']:.4f}"
                           for k, v in out.items()))
    return out


def _removed_share(results: dict[str, dict[str, Any]], method: str) -> float:
    """Share of naive's rise of task-A loss that ``method`` did not suffer."""
    a, naive, got = results["theta_A"]["A"], results["naive"]["A"], results[method]["A"]
    return (naive - got) / (naive - a)


def test_task_a_is_learned_then_forgotten(results: dict[str, dict[str, Any]]) -> None:
    """theta_A learned task A (far below the random init), and naive fine-tuning on B forgets
    a good part of it: the mitigations have something to mitigate."""
    init, theta_a, naive = results["init"]["A"], results["theta_A"]["A"], results["naive"]["A"]
    learned, rise = init - theta_a, naive - theta_a
    assert learned > 2.0, f"stage A learned only {learned:.3f} nats (init {init:.3f})"
    assert rise > FORGOTTEN_SHARE * learned, (
        f"naive fine-tuning on B raised task-A loss by {rise:.3f} nats, < {FORGOTTEN_SHARE:.0%} "
        f"of the {learned:.3f} that stage A learned: too little forgetting to test mitigations")


@pytest.mark.parametrize("method", ["l2", "ewc", "replay"])
def test_mitigation_keeps_task_a(method: str, results: dict[str, dict[str, Any]]) -> None:
    share = _removed_share(results, method)
    rise = results["naive"]["A"] - results["theta_A"]["A"]
    assert share > REMOVED_SHARE, (
        f"{method} removed {share:.1%} of naive's rise of task-A loss ({rise:.3f} nats; task-A "
        f"loss {results[method]['A']:.3f} vs naive {results['naive']['A']:.3f}, theta_A "
        f"{results['theta_A']['A']:.3f}), expected > {REMOVED_SHARE:.1%}")


def test_mitigations_together_remove_a_third(results: dict[str, dict[str, Any]]) -> None:
    shares = {m: _removed_share(results, m) for m in ("l2", "ewc", "replay")}
    mean = sum(shares.values()) / len(shares)
    assert mean > MEAN_REMOVED_SHARE, (
        f"mean share of naive's rise removed {mean:.1%} <= {MEAN_REMOVED_SHARE:.1%}: "
        + ", ".join(f"{m} {v:.1%}" for m, v in shares.items()))


@pytest.mark.parametrize("method", ["naive", "l2", "ewc", "replay"])
def test_task_b_is_still_learned(method: str, results: dict[str, dict[str, Any]]) -> None:
    """Each run keeps at least KEPT_GAIN_SHARE of naive fine-tuning's task-B improvement."""
    before, naive, got = results["theta_A"]["B"], results["naive"]["B"], results[method]["B"]
    kept = (before - got) / (before - naive)
    assert kept > KEPT_GAIN_SHARE, (
        f"{method} kept {kept:.1%} of naive's task-B gain (task-B loss {got:.3f}; theta_A "
        f"{before:.3f}, naive {naive:.3f}), expected > {KEPT_GAIN_SHARE:.0%}")


def test_the_mitigations_were_active(results: dict[str, dict[str, Any]]) -> None:
    """The regularizers logged their penalties and replay really mixed task-A examples in."""
    def steps(m: str) -> list[dict[str, Any]]:
        return [r for r in results[m]["logged"] if "loss" in r]

    assert all("reg/l2" in r and r["reg/l2"] > 0 for r in steps("l2"))
    assert all("reg/ewc" in r and r["reg/ewc"] > 0 for r in steps("ewc"))
    assert all("loss/replay" in r for r in steps("replay"))
    assert not any(k.startswith(("reg/", "loss/replay")) for r in steps("naive") for k in r)
