"""training.lora: peft LoRA adapters in forgetkit's loop (tiny random-init llama, CPU)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from forgetkit.config import ConfigError
from forgetkit.train.loop import train

LORA = {"r": 4, "alpha": 8.0, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def _losses(out_dir):
    recs = [json.loads(x) for x in (out_dir / "train_log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


class BaseWatch:
    """A no-op regularizer that, after every optimizer step, records whether every frozen
    (base) tensor is still bitwise what it was at ``prepare`` and how far the adapters moved."""

    name, kind = "watch", "watch"

    def __init__(self):
        self.base_equal: list[bool] = []
        self.b_norm: list[float] = []

    def prepare(self, ctx):
        self.named = list(ctx.params())
        self.base0 = {n: p.detach().clone() for n, p in self.named if not p.requires_grad}

    def penalty(self, ctx, batch):
        return None

    def grad_term(self, ctx):
        return None

    def after_step(self, ctx, lr):
        self.base_equal.append(all(torch.equal(p, self.base0[n]) for n, p in self.named
                                   if not p.requires_grad))
        self.b_norm.append(sum(float(p.detach().norm()) for n, p in self.named if "lora_B" in n))
        return None

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_only_adapters_train_and_count(tiny_cfg):
    from forgetkit.models import load_model

    cfg = tiny_cfg(training={"lora": LORA, "max_steps": 3})
    watch = BaseWatch()
    res = train(cfg, [watch], progress=False)
    # The frozen tensors are the base model's init, bitwise, and stay so through training.
    init, _ = load_model(cfg.model)
    init_sd = init.state_dict()
    names = {n for n, p in watch.named if not p.requires_grad}
    assert names and all("lora_" not in n for n in names)
    for n in names:
        plain = n.removeprefix("base_model.model.").replace(".base_layer.", ".")
        assert torch.equal(watch.base0[n], init_sd[plain]), n
    assert watch.base_equal == [True, True, True]
    assert watch.b_norm[-1] > 0  # B started at 0 and moved
    trainable = [n for n, p in watch.named if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # 2 layers x (q, v, down) adapters: A (r x d_in) + B (d_out x r).
    # q: 64->64, v: 64->32 (2 kv heads of 16), down: 128->64.
    expected = 2 * sum(4 * (i + o) for i, o in ((64, 64), (64, 32), (128, 64)))
    info = json.loads((res.out_dir / "train_result.json").read_text())["lora"]
    assert info["trainable_params"] == expected
    assert info["adapted_modules"] == 6
    # ... and equals peft's own count on the same wrapped model.
    from forgetkit.train.lora import apply_lora

    peft_model, again = apply_lora(load_model(cfg.model)[0], cfg.training.lora)
    assert (again["trainable_params"], again["total_params"]) == \
        peft_model.get_nb_trainable_parameters()
    assert again["trainable_params"] == expected


# Merged vs unmerged forward: the merged linear computes (W + s B A) x, the adapter
# W x + s B (A x): the same product in another summation order. Per output, fp32 rounding is
# bounded by ~n u |W||x| (n <= 128 the inner dimension, u = 6e-8: ~1e-5 relative), compounded
# over 2 layers x 7 matmuls and the head: a few 1e-5 of the logit scale at most (measured: 4e-7
# under default and AVX2 kernels, 1 and 2 threads). MERGE_RTOL = 2e-4 of max |logits|; a merge
# that dropped the adapter is off by the adapter's effect, asserted below to be > 50x that.
MERGE_RTOL = 2e-4


def test_merged_checkpoint_equals_peft_model(tiny_cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from forgetkit.models import load_model

    cfg = tiny_cfg(training={"lora": LORA, "max_steps": 4, "lr": 2e-2})
    res = train(cfg, progress=False)
    merged = AutoModelForCausalLM.from_pretrained(str(res.model_dir)).eval()
    assert not any("lora" in k for k in load_file(str(res.model_dir / "model.safetensors")))
    base, _ = load_model(cfg.model)
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    peft = PeftModel.from_pretrained(base, str(res.out_dir / "adapter")).eval()
    adapter_files = load_file(str(res.out_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter_files and all("lora_" in k for k in adapter_files)  # the adapter only
    ids = torch.randint(0, 250, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a = merged(input_ids=ids).logits
        b = peft(input_ids=ids).logits
        with peft.disable_adapter():
            c = peft(input_ids=ids).logits
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    effect = float((b - c).abs().max())
    assert diff <= MERGE_RTOL * scale, (diff, scale)
    assert effect > 50 * MERGE_RTOL * scale, (effect, scale)  # the adapter did change the model
    # The loss of the merged checkpoint equals the peft model's (same tolerance on the logits:
    # cross-entropy is 1-Lipschitz in each logit per token).
    labels = ids[:, 1:].reshape(-1)
    la = torch.nn.functional.cross_entropy(a[:, :-1].reshape(-1, a.shape[-1]), labels)
    lb = torch.nn.functional.cross_entropy(b[:, :-1].reshape(-1, b.shape[-1]), labels)
    assert abs(float(la - lb)) <= 2 * MERGE_RTOL * scale
    # Merging changed only the adapted weights.
    msd = merged.state_dict()
    for k, v in base_sd.items():
        adapted = any(f"{t}." in k for t in LORA["target_modules"])
        assert torch.equal(msd[k], v) != adapted or k.endswith("bias"), k


def test_resume_equals_uninterrupted(tiny_cfg, tmp_path):
    sec = {"lora": {**LORA, "dropout": 0.1}, "max_steps": 6, "checkpoint_every": 2,
           "keep_checkpoints": 5}
    full = train(tiny_cfg(training=sec, output={"dir": str(tmp_path / "full")}), progress=False)
    cfg = tiny_cfg(training=sec, output={"dir": str(tmp_path / "cut")})
    first = train(cfg, progress=False)
    shutil.rmtree(first.out_dir / "checkpoints" / "step-00000006")
    shutil.rmtree(first.out_dir / "model")
    second = train(cfg, progress=False)
    assert second.resumed_from == 4
    a = load_file(str(full.out_dir / "model" / "model.safetensors"))
    b = load_file(str(second.out_dir / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _losses(second.out_dir) == _losses(full.out_dir)


def test_changed_rank_refuses_the_checkpoint(tiny_cfg):
    from forgetkit.train.loop import CheckpointMismatch

    train(tiny_cfg(training={"lora": LORA, "max_steps": 2}), progress=False)
    with pytest.raises(CheckpointMismatch, match="training.lora.r"):
        train(tiny_cfg(training={"lora": {**LORA, "r": 8}, "max_steps": 2}), progress=False)


@pytest.mark.parametrize(("targets", "match"), [
    (["q_proj", "qproj"], "'qproj' matches no module.*did you mean 'q_proj'"),
    (["attention"], "'attention' matches no module"),
    (["mlp"], "'mlp' matches model.layers.0.mlp \\(LlamaMLP\\), which LoRA cannot adapt"),
])
def test_bad_target_module_is_a_config_error(tiny_cfg, targets, match):
    cfg = tiny_cfg(training={"lora": {**LORA, "target_modules": targets}})
    with pytest.raises(ConfigError, match=match):
        train(cfg, progress=False)
    assert not (cfg.output_dir() / "config.yaml").exists()  # nothing of the run written
    from forgetkit.train.lora import check_lora_targets

    with pytest.raises(ConfigError, match=match):  # the preflight check, on the meta device
        check_lora_targets(cfg)


@pytest.mark.parametrize(("section", "match"), [
    ({"distributed": {"strategy": "fsdp"}}, "distributed.strategy 'fsdp' is not supported"),
    ({"distributed": {"strategy": "deepspeed"}}, "'deepspeed' is not supported"),
    ({"training": {"lora": LORA, "freeze": {"bottom_layers": 1}}}, "training.freeze"),
    ({"training": {"lora": {**LORA, "target_modules": ["all-linear", "q_proj"]}}},
     "give it alone"),
])
def test_refused_combinations(tiny_cfg, section, match):
    from forgetkit.train.lora import check_lora_config

    section = {"training": {"lora": LORA}, **section}
    cfg = tiny_cfg(**section)
    with pytest.raises(ConfigError, match=match):
        check_lora_config(cfg)


def test_all_linear_and_l2_and_layer_lr_decay(tiny_cfg):
    """all-linear targets every linear but the head; L2-SP and layer_lr_decay run on the peft
    names (L2-SP's anchors are the adapter's init, B0 = 0)."""
    from forgetkit.regularizers.l2 import L2SP

    reg = L2SP(lam=0.1)
    cfg = tiny_cfg(training={"lora": {**LORA, "target_modules": ["all-linear"]}, "max_steps": 3,
                             "layer_lr_decay": 0.5})
    res = train(cfg, [reg], progress=False)
    assert len(reg.names) == 2 * 7 * 2 and all("lora_" in n for n in reg.names)
    b0 = [a for n, a in zip(reg.names, reg.anchor, strict=True) if "lora_B" in n]
    assert b0 and all(float(a.abs().max()) == 0.0 for a in b0)
    recs = [json.loads(x) for x in (res.out_dir / "train_log.jsonl").read_text().splitlines()]
    assert any(r.get("reg/l2", 0) > 0 for r in recs)
    info = json.loads((res.out_dir / "train_result.json").read_text())["lora"]
    assert info["adapted_modules"] == 14
    # layer_lr_decay finds the layer index in peft's names: layer 1 (top) 0.5, layer 0 0.25.
    from forgetkit.models import load_model
    from forgetkit.train.lora import apply_lora
    from forgetkit.train.optim import param_groups

    peft_model, _ = apply_lora(load_model(cfg.model)[0], cfg.training.lora)
    groups = param_groups(list(peft_model.named_parameters()), cfg.training)
    scale = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert len(scale) == 28 and all("lora_" in n for n in scale)
    assert {scale[n] for n in scale if ".layers.1." in n} == {0.5}
    assert {scale[n] for n in scale if ".layers.0." in n} == {0.25}


def test_rank_sweep_grid_plans(tmp_path):
    from conftest import tiny_config_dict

    from forgetkit.runner import plan_runs

    raw = tiny_config_dict(tmp_path, training={"lora": LORA})
    raw["evaluation"] = {"task": [{"kind": "answer_nll", "data": raw["data"]["train"]}]}
    raw["experiment"] = {"arms": [{"name": "lora", "grid": {"training.lora.r": [8, 64]}}],
                         "results_dir": str(tmp_path / "results")}
    _, runs = plan_runs(raw, "test")
    assert [r.arm for r in runs] == ["lora@r=8", "lora@r=64"]
    assert [r.cfg.training.lora.r for r in runs] == [8, 64]
    assert runs[0].cfg.training.lora.target_modules == LORA["target_modules"]


@pytest.mark.distributed
@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    """2 gloo processes x micro 2 x accum 2 (DDP) train the same adapters as 1 x 2 x 4 (dropout
    0: a dropout mask would differ between the splits). Tolerances: tests/test_distributed.py's
    (the only difference is the order the micro-batch gradients are summed in)."""
    import yaml
    from dist_utils import max_abs_diff, reports, run_worker, step_logs, weights
    from test_distributed import ATOL, LOG_RTOL, RTOL, write_config

    outs = {}
    for nproc, accum in ((1, 4), (2, 2)):
        out = tmp_path / f"p{nproc}"
        cfg = write_config(tmp_path / f"p{nproc}.yaml", out, accum, strategy="ddp")
        raw = yaml.safe_load(cfg.read_text())
        raw["training"]["lora"] = LORA
        cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
        run_worker(cfg, nproc)
        outs[nproc] = out
    assert [r["wrapper"] for r in reports(outs[2])] == ["DistributedDataParallel"] * 2
    a, b = weights(outs[1]), weights(outs[2])
    assert a.keys() == b.keys()
    print(f"\nLoRA ddp: max |w_2proc - w_1proc| = {max_abs_diff(a, b):.3e}")
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=ATOL, rtol=RTOL)
    for x, y in zip(step_logs(outs[1]), step_logs(outs[2]), strict=True):
        assert x["loss"] == pytest.approx(y["loss"], rel=LOG_RTOL)
    info = json.loads((outs[2] / "train_result.json").read_text())
    assert info["world_size"] == 2 and info["lora"]["adapted_modules"] == 6
    assert (outs[2] / "adapter" / "adapter_config.json").is_file()
