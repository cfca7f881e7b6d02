"""benchmarks/throughput.py's arithmetic and arguments (the timed runs themselves are benchmarks,
not tests): FLOP and padding accounting against hand computations, the default window (one HF
length-grouping mega-batch), argument checks, and the GPU check's memory estimate."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tp():
    spec = importlib.util.spec_from_file_location("fk_bench_throughput",
                                                  ROOT / "benchmarks" / "throughput.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


DIMS = {"matmul_params": 1000, "head_params": 300, "params": 1100, "layers": 2, "attn_dim": 8}


def test_flops_padded_flat_and_per_example_attention(tp):
    N, L, d = 1000, 2, 8
    lens = [5, 3]
    # padded: two rows of T = 8, every score of every row computed
    acc = tp.account(DIMS, [(8, lens)], flat=False)
    assert acc["exec_tokens"] == 16 and acc["useful_tokens"] == 8
    assert acc["exec_flops"] == 2 * (6 * N * 8 + 12 * L * d * 64)
    assert acc["useful_flops"] == (6 * N * 5 + 12 * L * d * 25) + (6 * N * 3 + 12 * L * d * 9)
    # one flat row of 8 with a block mask: the whole row's scores
    acc = tp.account(DIMS, [(8, lens)], flat=True)
    assert acc["exec_tokens"] == 8 and acc["exec_flops"] == 6 * N * 8 + 12 * L * d * 64
    # one SDPA per example: each example's scores only (= the useful FLOPs: nothing wasted)
    acc = tp.account(DIMS, [(8, lens)], flat=True, per_example_attention=True)
    assert acc["exec_flops"] == acc["useful_flops"]


def test_pad_fraction(tp):
    assert tp.pad_fraction([(8, [5, 3]), (4, [4, 4])], flat=False) == pytest.approx(
        1 - 16 / 24)
    assert tp.pad_fraction([(8, [5, 3])], flat=True) == 0.0
    assert tp.padded_len([5, 3]) == 8 and tp.padded_len([9]) == 16


def test_default_window_is_one_hf_mega_batch(tp):
    a = tp.parse_args(["--tokenizer", "byte"])
    assert a.warmup + a.steps == tp.HF_MEGA_BATCHES and a.model == "mid"
    a = tp.parse_args(["--tokenizer", "byte", "--model", "smol135m", "--warmup", "4"])
    assert a.warmup + a.steps == tp.HF_MEGA_BATCHES
    assert tp.parse_args(["--quick", "--tokenizer", "byte"]).steps == 14
    assert tp.parse_args(["--tokenizer", "byte", "--steps", "5"]).steps == 5


def test_argument_checks(tp, tmp_path, capsys):
    with pytest.raises(SystemExit):
        tp.parse_args(["--tokenizer", str(tmp_path / "missing")])
    assert "not auto, smollm2, byte or a directory" in capsys.readouterr().err
    a = tp.parse_args(["--tokenizer", str(tmp_path)])  # a directory: a saved tokenizer
    assert tp.tokenizer_name(a) == str(tmp_path)
    assert tp.tokenizer_name(tp.parse_args(["--tokenizer", "byte"])) == "byte"
    with pytest.raises(SystemExit):
        tp.parse_args(["--tokenizer", "byte", "--medmcqa", str(tmp_path / "none.jsonl")])
    assert "--medmcqa" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            tp.parse_args(["--tokenizer", "byte", "--device", "cuda"])
        assert "sees no CUDA device" in capsys.readouterr().err


def test_page_fault_accounting(tp):
    """_window_usage is per step; --malloc keep reaches every worker's environment (both
    sides), system leaves it alone."""
    assert tp._window_usage((100, 1.0), (700, 1.5), 3) == {"faults_per_step": 200.0,
                                                           "kernel_s": 0.5}
    keep = tp.worker_env(tp.parse_args(["--tokenizer", "byte", "--malloc", "keep",
                                        "--threads", "1"]))
    assert keep["MALLOC_MMAP_MAX_"] == "0" and int(keep["MALLOC_TRIM_THRESHOLD_"]) == 4 << 30
    assert keep["OMP_NUM_THREADS"] == "1"
    system = tp.worker_env(tp.parse_args(["--tokenizer", "byte"]))
    assert system.get("MALLOC_MMAP_MAX_") == os.environ.get("MALLOC_MMAP_MAX_")


def test_usage_counts_faults_of_fresh_pages(tp):
    """_usage counts the minor faults of touching a fresh anonymous mapping (not a tensor: the
    allocator may hand back pages it already holds). Some sandboxes do not report per-touch
    faults in getrusage (CI's machine counted none for a fresh tensor on 2026-12-04): the test
    says so and skips."""
    import mmap

    size = 64 << 20
    with mmap.mmap(-1, size) as m:
        f0 = tp._usage()
        for off in range(0, size, mmap.PAGESIZE):  # touch every page once
            m[off] = 1
        f1 = tp._usage()
    assert f1[1] >= f0[1] and f1[0] >= f0[0]
    if f1[0] == f0[0]:
        pytest.skip("this kernel reports no minor faults for fresh pages (getrusage)")
    assert f1[0] - f0[0] >= size // (2 << 20)  # at least one fault per 2 MiB huge page


def test_gpu_settings_reach_both_sides(tp, tmp_path):
    """--device/--precision: forgetkit's config trains on the GPU in bf16 autocast."""
    a = tp.parse_args(["--tokenizer", "byte", "--precision", "bf16"])
    cfg = tp.forgetkit_config(a, tmp_path, "padding_free", 0)
    assert cfg.training.mixed_precision == "bf16" and cfg.distributed.cpu is True
    a.device = "cuda"  # (the flag itself is refused without a GPU: see above)
    cfg = tp.forgetkit_config(a, tmp_path, "padding_free", 0)
    assert cfg.distributed.cpu is False
    assert "--device" in tp._worker_argv(a, "fk-flat", tmp_path, 0)
    spec = tp.model_spec(tp.parse_args(["--tokenizer", "byte", "--model", "llama1b"]))
    assert (spec["hidden_size"], spec["num_hidden_layers"]) == (2048, 16)


def test_largest_micro_estimate_counts_tokens(tp, tmp_path):
    """The GPU check's estimate: the largest micro-batch; a padding-free row of R tokens is
    estimated as the padded micro-batch of the same tokens."""
    from forgetkit.models import load_model

    a = tp.parse_args(["--tokenizer", "byte", "--quick"])
    cfg = tp.forgetkit_config(a, tmp_path, "length_grouped", 0, "all")
    model, _ = load_model(cfg.model)
    b = cfg.training.micro_batch_size
    padded = [(64, [64] * b), (32, [30] * b)]
    flat = [(64 * b, [64] * b), (30 * b, [30] * b)]
    e_pad = tp.largest_micro_estimate(cfg, model, padded, False, None)
    e_flat = tp.largest_micro_estimate(cfg, model, flat, True, None)
    assert e_pad.total_bytes == e_flat.total_bytes
    assert e_pad.details["seq_len"] == 64
    smaller = tp.largest_micro_estimate(cfg, model, padded[1:], False, None)
    assert smaller.activations_bytes < e_pad.activations_bytes
    assert smaller.weights_bytes == e_pad.weights_bytes
    if not torch.cuda.is_available():  # measured only where CUDA ran
        assert tp.cuda_memory(cfg, model, padded, False, None) == {}


def test_saved_medmcqa_split_gives_the_same_records(tp, tmp_path):
    """--medmcqa FILE (what --save-tokenizer writes for the GPU machine, which has no offline
    assets) gives the records the asset gives."""
    path = tmp_path / "medmcqa_train.jsonl"
    tp.write_jsonl(path, tp.medmcqa_train())
    assert tp.medmcqa_records(40, 3, path) == tp.medmcqa_records(40, 3)
    assert len(tp.medmcqa_train(path)) == len(tp.medmcqa_train()) > 3000
