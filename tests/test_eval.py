"""Evaluation: pure scoring functions, forgetting measures, the checkpoint harness, and equality
with the ``lm_eval`` CLI on the same saved checkpoint and task."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from forgetkit.config import DatasetSpec, MetricSpec
from forgetkit.eval.metrics import exact_match, ratio_stderr, rouge_l, token_f1
from forgetkit.results import forgetting as fg

ROOT = Path(__file__).resolve().parents[1]
TINY_TASK_DIR = ROOT / "tests" / "assets" / "lmeval_tiny"
SMOKE = ROOT / "experiments" / "smoke.yaml"


# ----------------------------------------------------------------------------- pure metrics

def test_answer_matching_hand_values():
    assert exact_match("The Heart.", "heart") == 1.0
    assert exact_match("left heart", "heart") == 0.0
    # pred tokens {left, ventricle}, ref {ventricle}: P=1/2, R=1 -> F1 = 2/3
    assert token_f1("left ventricle", "the ventricle") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0
    # LCS("a b c d", "a c d e") = 3 (a c d): P = 3/4, R = 3/4 -> F = 0.75
    assert rouge_l("a b c d", "a c d e") == pytest.approx(0.75)
    assert rouge_l("x", ["y", "x"]) == 1.0  # best reference counts


def test_ratio_stderr_weights_tokens_and_matches_formula():
    sums, counts = [2.0, 9.0, 4.0], [1, 3, 2]
    r, se = ratio_stderr(sums, counts)
    assert r == pytest.approx(15 / 6)
    resid = sum((s - r * c) ** 2 for s, c in zip(sums, counts, strict=True))
    assert se == pytest.approx(math.sqrt(resid / (3 * 2)) / 2.0)


def test_forgetting_measures():
    assert fg.task_gain(0.30, 0.45) == pytest.approx(0.15)
    assert fg.task_gain(3.2, 3.0, higher_is_better=False) == pytest.approx(0.2)  # NLL fell
    assert fg.forgetting(0.60, 0.55) == pytest.approx(0.05)
    assert fg.forgetting(3.18, 3.30, higher_is_better=False) == pytest.approx(0.12)
    assert fg.forgetting(0.5, 0.6) == pytest.approx(-0.1)  # improvement = negative forgetting
    assert fg.retention_ratio(0.6, 0.45) == pytest.approx(0.75)
    assert fg.retention_ratio(3.0, 4.0, higher_is_better=False) == pytest.approx(0.75)
    assert fg.retention_ratio([0.6, 3.0], [0.45, 4.0], [True, False]) == pytest.approx(0.75)
    assert math.isnan(fg.retention_ratio(0.0, 0.5))
    m, h = fg.mean_ci([1.0, 2.0, 3.0])
    # t_{0.975, 2} = 4.302653 ; s = 1 ; half = 4.302653 / sqrt(3)
    assert m == 2.0 and h == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert math.isnan(fg.mean_ci([1.0])[1])


# ----------------------------------------------------------------------------- harness

@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A saved random-init tiny Llama checkpoint (byte tokenizer)."""
    from forgetkit.config import load_config
    from forgetkit.models import load_model, save_hf_checkpoint

    cfg = load_config(str(SMOKE))
    model, tok = load_model(cfg.model, seed=0)
    return save_hf_checkpoint(model, tok, tmp_path_factory.mktemp("ckpt") / "model")


def test_nll_metrics_equal_a_direct_computation(tiny_ckpt):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from forgetkit.eval.harness import evaluate_checkpoint

    data = ROOT / "experiments" / "data" / "smoke_general.jsonl"
    spec = MetricSpec(name="ppl", kind="perplexity", limit=6,
                      data=DatasetSpec(path=str(data), format="text"))
    got = evaluate_checkpoint(tiny_ckpt, [spec], batch_size=4, progress=False)["ppl"]
    # Independent: one document at a time, HF's own shifted loss, token-weighted mean.
    from forgetkit.data.sources import load_records, select
    from forgetkit.runner import EVAL_SEED

    recs = select(load_records(DatasetSpec(path=str(data), format="text", limit=6)),
                  DatasetSpec(path=str(data), format="text", limit=6), EVAL_SEED)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_ckpt), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_ckpt))
    tot, n = 0.0, 0
    with torch.no_grad():
        for r in recs:
            ids = tok(r["text"])["input_ids"] + [tok.eos_token_id]
            x = torch.tensor([ids])
            loss = model(input_ids=x, labels=x).loss.item()
            tot += loss * (len(ids) - 1)
            n += len(ids) - 1
    assert got["n"] == 6 and got["tokens"] == n
    assert got["value"] == pytest.approx(tot / n, rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(tot / n), rel=1e-5)
    assert got["higher_is_better"] is False and got["stderr"] > 0


def test_answer_nll_and_generation_records(tiny_ckpt):
    from forgetkit.eval.harness import evaluate_checkpoint

    data = ROOT / "experiments" / "data" / "smoke_task.jsonl"
    specs = [MetricSpec(name="ans", kind="answer_nll", limit=8, data=DatasetSpec(path=str(data))),
             MetricSpec(name="gen", kind="generation", limit=3, max_new_tokens=4,
                        data=DatasetSpec(path=str(data)))]
    got = evaluate_checkpoint(tiny_ckpt, specs, batch_size=4, progress=False)
    assert got["ans"]["n"] == 8 and got["ans"]["value"] > 0
    # random init over a 259-token vocabulary: NLL near log(259)
    assert abs(got["ans"]["value"] - math.log(259)) < 0.5
    gen = got["gen"]
    assert gen["n"] == 3 and set(gen["all"]) >= {"exact_match", "token_f1", "rouge_l"}
    assert 0.0 <= gen["value"] <= 1.0 and len(gen["examples"]) == 3


@pytest.mark.slow
def test_numbers_equal_the_lm_eval_cli(tiny_ckpt, tmp_path):
    """forgetkit's lm-eval record equals what ``lm_eval`` prints for the same checkpoint."""
    from forgetkit.eval.harness import evaluate_checkpoint

    spec = MetricSpec(name="rev", kind="lm_eval", task="forgetkit_tiny_reverse",
                      include_path=str(TINY_TASK_DIR))
    ours = evaluate_checkpoint(tiny_ckpt, [spec], batch_size=4, progress=False)["rev"]
    out = tmp_path / "cli"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    # The task YAML's data_files is relative: the plain CLI resolves it against the CWD.
    proc = subprocess.run(
        [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
         f"pretrained={tiny_ckpt},dtype=float32", "--tasks", "forgetkit_tiny_reverse",
         "--include_path", str(TINY_TASK_DIR), "--batch_size", "4", "--device", "cpu",
         "--output_path", str(out)],
        cwd=TINY_TASK_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (res_file,) = list(out.rglob("results_*.json"))
    cli = json.loads(res_file.read_text())["results"]["forgetkit_tiny_reverse"]
    for m in ("acc", "acc_norm"):
        assert ours["all"][m] == cli[f"{m},none"], m
        assert ours["all"][f"{m}_stderr"] == pytest.approx(cli[f"{m}_stderr,none"])
    assert ours["metric"] == "acc_norm"
    assert ours["value"] == cli["acc_norm,none"] and ours["n"] == 20
