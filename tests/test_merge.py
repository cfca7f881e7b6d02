"""Merging toward the base (issue 16): per-layer interpolation and task-vector scaling.

* coefficients 0 and 1 reproduce the base and the fine-tuned weights bit for bit, hence their
  scores (checked with forgetkit's own evaluator on a tiny random-init llama);
* the depth schedule gives each tensor the documented coefficient (recovered from known deltas);
* one task vector at scale 1 is that checkpoint; several scale and add linearly;
* the config refuses bad specs in one line; a merge spec produces its entry in a run's results.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import TINY_LLAMA, tiny_config_dict, write_instruction_data

import forgetkit.results as results
import forgetkit.runner as runner
from forgetkit import run as run_face
from forgetkit.config import ConfigError, ModelConfig, config_from_dict, dump_config
from forgetkit.models import load_model, save_hf_checkpoint
from forgetkit.regularizers.merge import (
    layer_alphas,
    layerwise_state_dict,
    task_vector_state_dict,
    write_layerwise_checkpoint,
    write_task_vector_checkpoint,
)
from forgetkit.regularizers.wise import interpolate_state_dicts, load_hf_state_dict

ROOT = Path(__file__).resolve().parents[1]
GENERAL = ROOT / "experiments" / "data" / "smoke_general.jsonl"


def tiny(seed: int, layers: int = 2, tie: bool = False):
    cfg = {**copy.deepcopy(TINY_LLAMA), "num_hidden_layers": layers, "tie_word_embeddings": tie}
    return load_model(ModelConfig(random_init=cfg, tokenizer="byte"), seed=seed)


def sd_of(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_equal_sd(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"{k} differs"


def expected_alpha(name: str, n: int, bottom: float, top: float) -> float:
    """The README's schedule, written out for llama names (independent of layer_alpha)."""
    if name.startswith("model.layers."):
        i = int(name.split(".")[2])
        return bottom + (top - bottom) * i / (n - 1)
    if name == "model.embed_tokens.weight":
        return bottom
    assert name in ("model.norm.weight", "lm_head.weight"), name  # every llama key is covered
    return top


# ----------------------------------------------------------------------------- pure functions

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_coefficients_0_and_1_reproduce_base_and_finetuned_exactly(dtype):
    m0, _ = tiny(0)
    m1, _ = tiny(1)
    sd0 = {k: v.to(dtype) for k, v in sd_of(m0).items()}
    sd1 = {k: v.to(dtype) for k, v in sd_of(m1).items()}
    assert_equal_sd(layerwise_state_dict(sd0, sd1, 0.0, 0.0), sd0)
    assert_equal_sd(layerwise_state_dict(sd0, sd1, 1.0, 1.0), sd1)
    assert_equal_sd(task_vector_state_dict(sd0, [sd1], [0.0]), sd0)
    assert_equal_sd(task_vector_state_dict(sd0, [sd1], [1.0]), sd1)
    # a constant schedule is WiSE-FT at that alpha, bit for bit
    assert_equal_sd(layerwise_state_dict(sd0, sd1, 0.3, 0.3), interpolate_state_dicts(sd0, sd1, 0.3))


def test_depth_schedule_gives_each_tensor_its_documented_coefficient():
    n = 5
    m0, _ = tiny(0, layers=n)
    sd0 = sd_of(m0)
    gen = torch.Generator().manual_seed(7)
    delta = {k: torch.randn(v.shape, generator=gen) for k, v in sd0.items()}
    sd1 = {k: sd0[k] + delta[k] for k in sd0}
    bottom, top = 0.1, 0.9
    merged = layerwise_state_dict(sd0, sd1, bottom, top)
    coeffs = layer_alphas(list(sd0), bottom, top)
    seen = set()
    for k in sd0:
        want = expected_alpha(k, n, bottom, top)
        assert coeffs[k] == pytest.approx(want, abs=1e-12), k
        # recovered from the merged weights: (theta - theta0) / delta, least squares
        d = delta[k].double()
        got = float(((merged[k].double() - sd0[k].double()) * d).sum() / (d * d).sum())
        assert got == pytest.approx(want, abs=1e-5), k
        seen.add(round(want, 6))
    # the endpoints are exact and all five layers got distinct values
    assert coeffs["model.layers.0.self_attn.q_proj.weight"] == bottom
    assert coeffs[f"model.layers.{n - 1}.mlp.up_proj.weight"] == top
    assert len(seen) == n


def test_single_layer_model_uses_alpha_bottom_for_its_layer():
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight",
             "model.norm.weight", "lm_head.weight"]
    assert layer_alphas(names, 0.2, 0.7) == {names[0]: 0.2, names[1]: 0.2, names[2]: 0.7,
                                             names[3]: 0.7}


def test_task_vectors_scale_and_add_linearly():
    sd0, sda, sdb = (sd_of(tiny(s)[0]) for s in (0, 1, 2))
    both = task_vector_state_dict(sd0, [sda, sdb], [0.3, -0.5])
    twice = task_vector_state_dict(sd0, [sda, sda], [0.25, 0.25])
    half = task_vector_state_dict(sd0, [sda], [0.5])
    for k in sd0:
        a, b, z = sda[k].double(), sdb[k].double(), sd0[k].double()
        want = z + 0.3 * (a - z) - 0.5 * (b - z)
        # rounded once to float32 from a float64 sum: within half an ulp (+ tiny slack)
        torch.testing.assert_close(both[k].double(), want, rtol=2**-23, atol=1e-12)
        # the same merge computed another way, and WiSE-FT's float32 lerp: a few float32
        # roundings at the inputs' magnitude (cancellation makes relative error meaningless)
        scale = torch.maximum(a.abs(), z.abs()) * 2**-24
        assert ((twice[k].double() - half[k].double()).abs() <= 2 * scale).all(), k
        wise = interpolate_state_dicts(sd0, sda, 0.5)[k].double()
        assert ((half[k].double() - wise).abs() <= 4 * scale).all(), k
    with pytest.raises(ValueError, match="scales"):
        task_vector_state_dict(sd0, [sda, sdb], [1.0])
    with pytest.raises(KeyError):
        task_vector_state_dict(sd0, [{k: v for k, v in sda.items() if "norm" not in k}], [1.0])


# ----------------------------------------------------------------------------- checkpoints

def _evaluate(model_dir: Path, tmp_path: Path) -> dict[str, Any]:
    cfg = config_from_dict(tiny_config_dict(tmp_path, evaluation={
        "general": [{"name": "general_nll", "kind": "perplexity", "limit": 4, "max_length": 64,
                     "data": {"path": str(GENERAL), "format": "text"}}],
        "device": "cpu", "batch_size": 4}), "test")
    scores = runner.evaluate(model_dir, cfg)
    for role in scores.values():
        for m in role.values():
            m.pop("seconds", None)  # wall time: the only field that may differ
    return scores


def test_written_checkpoints_score_as_base_and_finetuned(tmp_path):
    (m0, tok), (m1, _) = tiny(0), tiny(1)
    save_hf_checkpoint(m0, tok, tmp_path / "m0")
    save_hf_checkpoint(m1, tok, tmp_path / "m1")
    f0, f1 = load_hf_state_dict(tmp_path / "m0"), load_hf_state_dict(tmp_path / "m1")
    lw0 = write_layerwise_checkpoint(tmp_path / "m0", tmp_path / "m1", 0.0, 0.0, tmp_path / "a")
    lw1 = write_layerwise_checkpoint(tmp_path / "m0", tmp_path / "m1", 1.0, 1.0, tmp_path / "b")
    tv1 = write_task_vector_checkpoint(tmp_path / "m0", [tmp_path / "m1"], [1.0], tmp_path / "c")
    assert_equal_sd(load_hf_state_dict(lw0), f0)
    assert_equal_sd(load_hf_state_dict(lw1), f1)
    assert_equal_sd(load_hf_state_dict(tv1), f1)
    assert (lw0 / "config.json").exists() and (lw0 / "tokenizer.json").exists()
    s0, s1 = _evaluate(tmp_path / "m0", tmp_path), _evaluate(tmp_path / "m1", tmp_path)
    assert s0["general"]["general_nll"]["value"] != s1["general"]["general_nll"]["value"]
    assert _evaluate(lw0, tmp_path) == s0
    assert _evaluate(lw1, tmp_path) == s1
    assert _evaluate(tv1, tmp_path) == s1


def test_tied_head_follows_the_embedding_coefficient(tmp_path):
    from transformers import AutoModelForCausalLM

    (m0, tok), (m1, _) = tiny(0, tie=True), tiny(1, tie=True)
    save_hf_checkpoint(m0, tok, tmp_path / "m0")
    save_hf_checkpoint(m1, tok, tmp_path / "m1")
    assert "lm_head.weight" not in load_hf_state_dict(tmp_path / "m1")  # stored once
    d = write_layerwise_checkpoint(tmp_path / "m0", tmp_path / "m1", 0.25, 0.75, tmp_path / "x")
    m = AutoModelForCausalLM.from_pretrained(str(d))
    emb = m.get_input_embeddings().weight
    assert m.lm_head.weight.data_ptr() == emb.data_ptr()
    e0, e1 = (x.model.embed_tokens.weight.detach() for x in (m0, m1))
    torch.testing.assert_close(emb.detach(), torch.lerp(e0, e1, 0.25))


# ----------------------------------------------------------------------------- config

def _cfg(tmp_path: Path, merge: list[Any]):
    return config_from_dict(tiny_config_dict(tmp_path, evaluation={"merge": merge}), "test.yaml")


def test_merge_specs_load_and_round_trip(tmp_path):
    cfg = _cfg(tmp_path, [
        {"name": "lw", "kind": "layerwise", "alpha_bottom": 0.0, "alpha_top": 1.0},
        {"name": "tv", "kind": "task_vectors", "scales": [0.5]},
        {"name": "tv2", "kind": "task_vectors", "scales": [1.0, -0.5],
         "checkpoints": ["run", str(tmp_path / "other")]}])
    assert [m.name for m in cfg.evaluation.merge] == ["lw", "tv", "tv2"]
    assert cfg.evaluation.merge[1].checkpoints == ["run"]
    again = config_from_dict(yaml.safe_load(dump_config(cfg)), "dumped")
    assert again.evaluation.merge == cfg.evaluation.merge


@pytest.mark.parametrize(("spec", "msg"), [
    ({"name": "a", "kind": "layerwise", "alpha_bottom": 0.1}, "alpha_top: missing"),
    ({"name": "a", "kind": "layerwise", "alpha_bottom": 0.1, "alpha_top": 1.5}, "<= 1.0"),
    ({"name": "a", "kind": "layerwise", "alpha_bottom": 0, "alpha_top": 1, "scales": [1.0]},
     "scales: not used by a merge of kind 'layerwise'"),
    ({"name": "a", "kind": "task_vectors", "alpha_top": 1.0, "scales": [1.0]},
     "alpha_top: not used"),
    ({"name": "a", "kind": "task_vectors"}, "scales: missing"),
    ({"name": "a", "kind": "task_vectors", "scales": [1.0, 1.0]}, "one scale per checkpoint"),
    ({"name": "a", "kind": "task_vectors", "scales": [3.0]}, "scales\\[0\\]"),
    ({"name": "a", "kind": "task_vectors", "scales": [1.0], "checkpoints": ["/x"]},
     "'run'"),
    ({"name": "../x", "kind": "task_vectors", "scales": [1.0]}, "not a safe name"),
    ({"name": "a", "kind": "layerwize", "alpha_bottom": 0, "alpha_top": 1}, "did you mean"),
    ({"kind": "task_vectors", "scales": [1.0]}, "needs a name"),
    ({"name": "a", "kind": "task_vectors", "scales": [1.0], "alpha": 1}, "unknown key"),
])
def test_bad_merge_specs_are_config_errors(tmp_path, spec, msg):
    with pytest.raises(ConfigError, match=msg) as e:
        _cfg(tmp_path, [spec])
    assert "evaluation.merge[0]" in str(e.value) and "\n" not in str(e.value)


def test_duplicate_merge_names_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="unique"):
        _cfg(tmp_path, [{"name": "a", "kind": "task_vectors", "scales": [1.0]},
                        {"name": "a", "kind": "layerwise", "alpha_bottom": 0, "alpha_top": 1}])


# ----------------------------------------------------------------------------- runner

def _weight_sum(model_dir: str | Path) -> float:
    return float(sum(v.double().sum() for v in load_hf_state_dict(model_dir).values()))


def test_merge_specs_land_in_the_run_results(tmp_path, monkeypatch, capsys):
    """The runner with training and evaluation faked (as tests/test_runner_reliability.py does):
    the fake training writes a real fine-tuned checkpoint, the fake evaluator scores a
    checkpoint by the sum of its weights, so each merge's entry shows which weights it scored."""
    (m0, tok), (m1, _) = tiny(0), tiny(1)
    base = save_hf_checkpoint(m0, tok, tmp_path / "base")
    other = save_hf_checkpoint(tiny(2)[0], tok, tmp_path / "other")
    ft = save_hf_checkpoint(m1, tok, tmp_path / "ft")  # what the run's model/ held (deleted)
    scored: list[str] = []

    def train_stage(run: runner.RunSpec, launcher: list[str]) -> dict[str, Any]:
        save_hf_checkpoint(m1, tok, run.dir / "model")
        res = {"steps": 4, "tokens": 100, "target_tokens": 50, "train_time_s": 0.1}
        results.write_json(run.dir / "train_result.json", res)
        return res

    def evaluate(model_dir, cfg) -> dict[str, Any]:
        scored.append(Path(model_dir).name)
        return {"task": {"wsum": {"value": _weight_sum(model_dir), "higher_is_better": True,
                                  "kind": "answer_nll"}}, "general": {}}

    monkeypatch.setattr(runner, "train_stage", train_stage)
    monkeypatch.setattr(runner, "evaluate", evaluate)
    monkeypatch.setattr(runner, "base_checkpoint", lambda cfg, root: str(base))
    monkeypatch.setattr(runner, "layer_summaries", lambda run, base: None)
    monkeypatch.delenv("FORGETKIT_DEBUG", raising=False)

    cfg = tiny_config_dict(tmp_path)
    cfg["name"] = "merge"
    cfg.pop("output")
    eval_data = write_instruction_data(tmp_path / "task_eval.jsonl", n=4, seed=1)
    cfg["evaluation"] = {
        "task": [{"name": "wsum", "kind": "answer_nll", "data": {"path": str(eval_data)}}],
        "wise_alphas": [0.5],
        "merge": [{"name": "lw", "kind": "layerwise", "alpha_bottom": 0.0, "alpha_top": 1.0},
                  {"name": "half", "kind": "task_vectors", "scales": [0.5]},
                  {"name": "sum", "kind": "task_vectors", "scales": [1.0, 0.5],
                   "checkpoints": ["run", str(other)]}]}
    cfg["experiment"] = {"seeds": [0], "arms": [{"name": "naive"}],
                         "results_dir": str(tmp_path / "results" / "{name}")}
    path = tmp_path / "experiment.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert run_face.main([str(path)]) == 0, capsys.readouterr().err

    rdir = tmp_path / "results" / "merge" / "naive" / "seed-0"
    after = json.loads((rdir / "summary.json").read_text())["after"]
    assert after == json.loads((rdir / "eval_after.json").read_text())
    assert set(after["merge"]) == {"lw", "half", "sum"}
    f0, f1, f2 = (load_hf_state_dict(d) for d in (base, ft, other))
    n = 2
    want_lw = sum(float((f0[k].double() + expected_alpha(k, n, 0.0, 1.0)
                         * (f1[k].double() - f0[k].double())).sum()) for k in f0)
    want_half = sum(float((0.5 * (f0[k].double() + f1[k].double())).sum()) for k in f0)
    want_sum = sum(float((f1[k].double() + 0.5 * (f2[k].double() - f0[k].double())).sum())
                   for k in f0)
    got = {k: v["task"]["wsum"]["value"] for k, v in after["merge"].items()}
    assert got["lw"] == pytest.approx(want_lw, rel=1e-6, abs=1e-3)
    assert got["half"] == pytest.approx(want_half, rel=1e-6, abs=1e-3)
    assert got["sum"] == pytest.approx(want_sum, rel=1e-6, abs=1e-3)
    assert after["wise"]["0.5"]["task"]["wsum"]["value"] == pytest.approx(got["half"], abs=1e-3)
    assert len({round(v, 2) for v in got.values()}) == 3  # three different weight sets scored
    assert scored.count("merge-lw") == 1 and "wise-0.5" in scored
    assert not list(rdir.glob("merge-*")) and not list(rdir.glob("wise-*"))  # scratch removed
