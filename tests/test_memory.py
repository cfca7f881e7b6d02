"""The memory estimator: textbook figures, sharding arithmetic, config path, CLI."""

from __future__ import annotations

import json

import pytest

from forgetkit.memory import (
    ModelShape,
    activation_k,
    estimate,
    estimate_for_config,
    main,
    measured_peak_bytes,
    shape_from_hf_config,
)

# Mistral-7B-v0.1: 7,241,732,096 parameters, d 4096, 32 layers, GQA 32/8, MLP 14336, V 32000.
MISTRAL = ModelShape(7_241_732_096, 4096, 32, 32000, 14336, 32, 8)
# LLaMA-7B: d 4096, 32 layers, MLP 11008, MHA, V 32000.
LLAMA7 = ModelShape(6_738_415_616, 4096, 32, 32000, 11008, 32, 32)


def state(e):
    return e.weights_bytes + e.gradients_bytes + e.optimizer_bytes


def test_mistral_bf16_weights_14_5_gb():
    e = estimate(MISTRAL, seq_len=1, precision="bf16-mixed")
    assert e.weights_bytes / 1e9 == pytest.approx(14.48, abs=0.01)  # "14.5 GB"


def test_mixed_adamw_is_16_bytes_per_param():
    seven_b = ModelShape(7_000_000_000, 4096, 32, 32000)
    e = estimate(seven_b, seq_len=1, precision="bf16-mixed", optimizer="adamw")
    assert (e.weights_bytes, e.gradients_bytes, e.optimizer_bytes) == (14e9, 14e9, 84e9)
    assert state(e) == 112e9  # 2 + 2 + 12 (fp32 master, m, v)
    # autocast over fp32 parameters: 4 + 4 + 8, plus the cached 16-bit weight copies
    a = estimate(seven_b, seq_len=1, precision="bf16-mixed", autocast=True)
    assert (a.gradients_bytes, a.optimizer_bytes) == (28e9, 56e9)
    assert a.weights_bytes == 28e9 + 14e9


@pytest.mark.parametrize("precision,optimizer,per_param", [
    ("fp32", "adamw", 16), ("fp32", "sgd", 8), ("fp32", "sgd_momentum", 12),
    ("bf16", "adamw", 8), ("bf16-mixed", "adamw8bit", 10), ("fp16-mixed", "sgd", 8),
])
def test_bytes_per_param(precision, optimizer, per_param):
    n = 1_000_000_000
    e = estimate(ModelShape(n, 4096, 32, 32000), seq_len=1, precision=precision,
                 optimizer=optimizer)
    assert state(e) == per_param * n


def test_adafactor_state_is_tiny():
    e = estimate(LLAMA7, seq_len=1, precision="fp32", optimizer="adafactor")
    assert e.optimizer_bytes < 0.01 * e.weights_bytes


def test_llama7b_activations_textbook_k12():
    # s*b*d*L*k bytes: 2048 * 1 * 4096 * 32 * 12 = 3.22e9 bytes = 3.2 GB (decimal), 3.0 GiB.
    e = estimate(LLAMA7, seq_len=2048, micro_batch=1, k=12)
    layers = e.details["activations_layers_bytes"]
    assert layers == 2048 * 4096 * 32 * 12
    assert layers / 1e9 == pytest.approx(3.2, abs=0.05)
    assert layers / 2 ** 30 == pytest.approx(3.0, abs=0.01)
    assert e.activations_bytes > layers  # + logits/loss, embeddings


def test_activation_k_derived():
    # 8 + 2 dkv/d + 4 i/d elements: LLaMA-7B 20.75 -> fp32 83, autocast mixed 41.5 bytes
    k_elem = 8 + 2 + 4 * 11008 / 4096
    assert k_elem == pytest.approx(20.75)
    assert activation_k(LLAMA7, "fp32") == pytest.approx(4 * k_elem)
    assert activation_k(LLAMA7, "bf16-mixed") == pytest.approx(16 + 2 * (k_elem - 4))
    assert activation_k(LLAMA7, "bf16") == pytest.approx(2 * k_elem)
    assert activation_k(LLAMA7, "fp32", "eager", 2048) > activation_k(LLAMA7, "fp32")
    ck = estimate(LLAMA7, seq_len=2048, gradient_checkpointing=True, precision="bf16")
    full = estimate(LLAMA7, seq_len=2048, precision="bf16")
    assert ck.details["activations_layers_bytes"] == 2048 * 4096 * 32 * 2 + 2048 * 4096 * \
        activation_k(LLAMA7, "bf16")
    assert ck.activations_bytes < full.activations_bytes / 5


@pytest.mark.parametrize("sharding,divided", [
    ("zero1", {"optimizer"}), ("zero2", {"optimizer", "gradients"}),
    ("zero3", {"optimizer", "gradients", "weights"}), ("fsdp", {"optimizer", "gradients",
                                                               "weights"}),
])
def test_zero_divides_by_world_size(sharding, divided):
    one = estimate(MISTRAL, seq_len=512, regularizers=["ewc"])
    eight = estimate(MISTRAL, seq_len=512, sharding=sharding, world_size=8, regularizers=["ewc"])
    for key in ("weights", "gradients", "optimizer"):
        a, b = getattr(one, key + "_bytes"), getattr(eight, key + "_bytes")
        if key in divided:
            gather = 0  # weights: + 2 unsharded layers in flight under zero3/fsdp
            if key == "weights":
                gather = 2 * MISTRAL.layer_params * 2
            assert b - gather == pytest.approx(a / 8, rel=1e-6), key
        else:
            assert b == a, key
    assert eight.activations_bytes == one.activations_bytes
    if sharding in ("zero3", "fsdp"):  # anchors follow the parameter shards
        assert eight.regularizer_bytes == pytest.approx(one.regularizer_bytes / 8, rel=1e-6)
        total = estimate(MISTRAL, seq_len=1, sharding=sharding, world_size=8)
        ref = estimate(MISTRAL, seq_len=1)
        assert state(total) < state(ref) / 7


def test_offload_and_regularizers():
    e = estimate(MISTRAL, seq_len=1, sharding="zero3", world_size=4, offload_optimizer=True,
                 offload_params=True)
    assert e.optimizer_bytes == 0 and e.cpu_bytes > 0
    n = MISTRAL.params
    assert estimate(MISTRAL, seq_len=1, regularizers=["l2"]).regularizer_bytes == 4 * n
    assert estimate(MISTRAL, seq_len=1, regularizers=["l2"],
                    anchor_dtype="bfloat16").regularizer_bytes == 2 * n
    assert estimate(MISTRAL, seq_len=1, regularizers=["ewc"]).regularizer_bytes == 8 * n
    assert estimate(MISTRAL, seq_len=1, regularizers=["kl"]).regularizer_bytes == 2 * n
    with pytest.raises(ValueError):
        estimate(MISTRAL, seq_len=1, offload_params=True)
    with pytest.raises(ValueError):
        estimate(MISTRAL, seq_len=1, regularizers=["wise"])


def test_peak_sum_with_accumulation():
    a = estimate(LLAMA7, seq_len=2048, grad_accumulation=1)
    b = estimate(LLAMA7, seq_len=2048, grad_accumulation=4)
    assert b.total_bytes == b.weights_bytes + b.gradients_bytes + b.optimizer_bytes + \
        b.regularizer_bytes + b.activations_bytes
    assert a.total_bytes < b.total_bytes


def test_param_count_from_config_matches_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = AutoConfig.for_model("llama", hidden_size=64, intermediate_size=128,
                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                              vocab_size=259, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(hf)
    n = sum(p.numel() for p in model.parameters())
    assert shape_from_hf_config(hf).params == n


def test_estimate_for_config(tiny_cfg):
    from forgetkit.models import load_model

    cfg = tiny_cfg(regularizers=[{"type": "ewc", "lambda": 1.0,
                                  "fisher_data": {"path": "x.jsonl"}}])
    model, _ = load_model(cfg.model)
    n = sum(p.numel() for p in model.parameters())
    e = estimate_for_config(cfg, model=model)
    assert e.details["params"] == n
    assert e.weights_bytes == 4 * n and e.optimizer_bytes == 8 * n
    assert e.regularizer_bytes == 8 * n
    e2 = estimate_for_config(cfg)  # from the random_init dict, no weights
    assert e2.details["params"] == n
    four = estimate_for_config(tiny_cfg(distributed={"strategy": "fsdp"}), world_size=4)
    assert four.optimizer_bytes == 2 * n


def test_cli_json(capsys):
    assert main(["--params", "7.24B", "--hidden", "4096", "--layers", "32", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "regularizer_bytes",
                "activations_bytes", "total_bytes"):
        assert isinstance(d[key], int)
    assert d["weights_bytes"] == 2 * 7_240_000_000
    assert main(["--params", "1B", "--hidden", "2048", "--layers", "16", "--zero", "3",
                 "--world-size", "8", "--reg", "ewc", "--gradient-checkpointing"]) == 0
    out = capsys.readouterr().out
    assert "peak total" in out and "GB" in out and "fits" in out


def test_measured_peak_bytes():
    m = measured_peak_bytes()
    assert m["device"] in ("cpu", "cuda") and m["peak_bytes"] > 10_000_000


def test_cli_params_alone_is_the_16n_arithmetic(capsys):
    assert main(["--params", "7B", "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    n = 7_000_000_000
    # bf16-mixed AdamW: 2 (weights) + 2 (grads) + 4 (fp32 master) + 8 (moments) = 16 N
    assert d["weights_bytes"] + d["gradients_bytes"] + d["optimizer_bytes"] == 16 * n
    assert d["shape_assumed"] is True
    assert (d["model"]["hidden"], d["model"]["layers"]) == (4096, 32)  # LLaMA-7B's proportions
    assert d["activations_bytes"] > 0
    assert main(["--params", "7B"]) == 0
    out = capsys.readouterr().out
    assert "typical Llama-like shape" in out and "16 bytes/param" in out and "112.00 GB" in out
    assert "activations from the assumed shape" in out
    with pytest.raises(SystemExit):  # --hidden without --layers is neither form
        main(["--params", "7B", "--hidden", "4096"])


def test_typical_shape_count_is_close():
    from forgetkit.memory import typical_shape

    for n in (135e6, 1.2e9, 7e9, 70e9):
        sh = typical_shape(int(n))
        approx = 12 * sh.layers * sh.hidden ** 2 + 2 * sh.vocab * sh.hidden
        assert sh.params == int(n) and sh.hidden % 128 == 0 and sh.layers == sh.hidden // 128
        assert abs(approx - n) / n < 0.35


@pytest.mark.parametrize("precision,c", [("fp32", 4), ("bf16-mixed", 2), ("bf16", 2)])
def test_logits_term_real_vocabulary(precision, c):
    # SmolLM2's 49152 vocabulary: logits (compute dtype, kept through backward by the loop) +
    # fp32 log-softmax + its two fp32 gradients in the log-softmax backward (measured on CPU in
    # benchmarks/memory.py, v49k rows); the transient fp32 copy of 16-bit logits is not counted
    shape = ModelShape(134_515_008, 576, 30, 49152, 1536, 9, 3, tied_embeddings=True)
    e = estimate(shape, seq_len=512, micro_batch=4, precision=precision)
    assert e.details["logits_bytes"] == 512 * 4 * 49152 * (c + 12)


def test_memory_line_says_what_it_compares():
    from forgetkit.memory import current_rss_bytes, loaded_weights_bytes, memory_line

    shape = ModelShape(134_515_008, 576, 30, 49152, 1536, 9, 3, tied_embeddings=True)
    e = estimate(shape, seq_len=512, micro_batch=4, precision="bf16-mixed", autocast=True)
    n = shape.params
    assert loaded_weights_bytes(e) == 4 * n  # fp32 parameters; the bf16 cast cache comes later
    g = 2 ** 30
    beyond = e.total_bytes - 4 * n
    base = current_rss_bytes()
    assert base > 10_000_000
    m = measured_peak_bytes(baseline_rss=base)
    assert m["baseline_rss_bytes"] == base
    # the growth is the peak RSS over the baseline, or 0 (and masked) when the peak came first
    rss = m["host_peak_rss_bytes"]
    assert m["host_growth_bytes"] == max(0, rss - base)
    assert m["growth_masked"] == (rss <= base)
    cpu = {"device": "cpu", "peak_bytes": 9 * g, "host_peak_rss_bytes": 9 * g,
           "baseline_rss_bytes": 2 * g, "host_growth_bytes": 3 * g, "growth_masked": False}
    line = memory_line(e, cpu)
    assert f"estimated training peak {e.total_bytes / g:.2f} GiB" in line
    assert f"{beyond / g:.2f} GiB of it beyond the loaded weights" in line
    assert "RSS growth over the post-load baseline 3.00 GiB" in line
    assert "whole-process peak RSS 9.00 GiB" in line and "not an estimate check" in line
    assert "below the process's own overheads" not in line
    no_base = memory_line(e, {"device": "cpu", "peak_bytes": 9 * g})
    assert "growth" not in no_base and "whole-process peak RSS" in no_base
    gpu = memory_line(e, {"device": "cuda", "peak_bytes": e.total_bytes})
    assert "max_memory_allocated" in gpu and "ratio 1.00" in gpu
    tiny = estimate(ModelShape(500_000, 64, 2, 259), seq_len=64, precision="fp32")
    assert "below the process's own overheads" in memory_line(tiny, cpu)
    # sharded: the loaded weights are this rank's shard
    z3 = estimate(shape, seq_len=512, sharding="zero3", world_size=4)
    assert loaded_weights_bytes(z3) == 2 * n // 4
    # the experiment runner's line, from train_result.json's entries (JSON round trip): the same
    # words (it printed "estimated 3.41 GiB ..., measured peak 3.79 GiB (cpu)", the whole-process
    # RSS against the estimate, until 2026-12-04)
    from forgetkit.runner import run_memory_line

    saved = json.loads(json.dumps(e.to_dict()))
    assert run_memory_line(saved, cpu) == line
    assert run_memory_line(saved, {"device": "cuda", "peak_bytes": e.total_bytes}) == gpu
    assert "could not be read back" in run_memory_line({"total_bytes": g}, cpu)


def test_lora_and_freezing_shrink_gradients_and_optimizer_state_only():
    """training.lora / training.freeze: the estimate counts every weight but gradients, AdamW
    state and anchors only for the trainable parameters (counted on a meta-device model)."""
    from forgetkit.config import config_from_dict
    from forgetkit.memory import estimate_for_config

    base = {"model": {"random_init": {"model_type": "llama", "hidden_size": 64,
                                      "intermediate_size": 128, "num_hidden_layers": 4,
                                      "num_attention_heads": 4, "num_key_value_heads": 2,
                                      "vocab_size": 512}, "tokenizer": "byte"},
            "regularizers": [{"type": "l2", "lambda": 1.0}]}
    full = estimate_for_config(config_from_dict(base))
    for extra in ({"lora": {"r": 4}}, {"freeze": {"embeddings": True, "bottom_layers": 2}}):
        est = estimate_for_config(config_from_dict({**base, "training": extra}))
        assert est.weights_bytes == full.weights_bytes, extra
        ratio = est.optimizer_bytes / full.optimizer_bytes
        assert 0 < ratio < 0.7, (extra, ratio)
        assert est.gradients_bytes / full.gradients_bytes == pytest.approx(ratio, rel=1e-6)
        assert est.regularizer_bytes < full.regularizer_bytes, extra
        assert any("parameters train" in n for n in est.notes), est.notes
