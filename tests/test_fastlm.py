"""SharedContextHFLM (forgetkit/eval/fastlm.py) gives lm-eval the numbers of its HF backend.

Reference: lm-eval's own ``HFLM`` on the same model object. Tolerances: in float64 both paths
are the same arithmetic up to the order of a few reductions, so a logprob may differ by
``TOL_FACTOR * eps * n_positions * (1 + |logprob|)`` -- one rounding per position of the
sequence at most, per unit of the result's size, times a small constant; observed here:
~1e-15 (float64), ~1e-6 (float32). acc/acc_norm compare logprobs of choices: identical unless
two choices lie within that tolerance of each other (checked, never assumed).
"""

from __future__ import annotations

import json
import logging
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA

ROOT = Path(__file__).resolve().parents[1]
TINY_TASK_DIR = ROOT / "tests" / "assets" / "lmeval_tiny"
TOL_FACTOR = 4


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # the verdicts do not depend on it; the machine is shared
    yield
    torch.set_num_threads(n)


def tiny_model(vocab: int, dtype: torch.dtype, seed: int = 0, **arch) -> torch.nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = {**TINY_LLAMA, **arch}
    cfg = AutoConfig.for_model(spec.pop("model_type"), vocab_size=vocab, **spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def both(model, tok, batch_size=4, **kw):
    from lm_eval.models.huggingface import HFLM

    from forgetkit.eval.fastlm import SharedContextHFLM

    ref = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu", **kw)
    fast = SharedContextHFLM(pretrained=model, tokenizer=tok, batch_size=batch_size,
                             device="cpu", **kw)
    return ref, fast


def tol(lp: float, n_positions: int, dtype: torch.dtype) -> float:
    return TOL_FACTOR * torch.finfo(dtype).eps * n_positions * (1 + abs(lp))


def greedy_tokens(model, ctx: list[int], n: int) -> list[int]:
    ids = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx):]


def random_requests(model, rng: random.Random, n_ctx: int, vocab: int = 256):
    """Shared contexts of lengths 1..60, 1-5 continuations each (some greedy), shuffled."""
    reqs = []
    for _ in range(n_ctx):
        ctx = [rng.randrange(vocab) for _ in range(rng.choice([1, 2, 3, 9, 30, 60]))]
        for j in range(rng.choice([1, 2, 4, 5])):
            n = rng.choice([1, 2, 3, 7])
            cont = greedy_tokens(model, ctx, n) if j == 0 else [rng.randrange(vocab)
                                                                for _ in range(n)]
            reqs.append((None, ctx, cont))
    rng.shuffle(reqs)
    return reqs


def assert_equal_results(ref_res, fast_res, reqs, dtype):
    assert len(ref_res) == len(fast_res) == len(reqs)
    for (lp0, g0), (lp1, g1), (_, ctx, cont) in zip(ref_res, fast_res, reqs, strict=True):
        assert g1 == g0
        assert abs(lp1 - lp0) <= tol(lp0, len(ctx) + len(cont), dtype), (lp0, lp1)


# ----------------------------------------------------------------------------- grouping

def test_group_by_context_routes_each_request_once():
    from forgetkit.eval.fastlm import group_by_context

    a, b, c = [1, 2, 3], [4], [5, 6]
    reqs = [(None, a, [7]), (None, b, [8]), (None, a, [9, 9]), (None, c, [1]),
            (None, b, [2]), (None, [1] * 9, [3] * 3), (None, [1] * 9, [4]), (None, [], [1]),
            (None, a, [])]
    groups, rest = group_by_context(reqs, max_length=10)
    # a and b are shared; c is alone; [1]*9 + 3 tokens = 12 > max_length + 1 is truncated by
    # lm-eval (so its window differs from its sibling's): both go to the parent; empty ones too
    assert groups == [[0, 2], [1, 4]]
    assert rest == [3, 5, 6, 7, 8]
    # with lm-eval's logits cache, a context whose continuations are all one token ([4]: [8],
    # [2]) is left to the parent, which already runs it once
    groups, rest = group_by_context(reqs, max_length=10, one_token_to_parent=True)
    assert groups == [[0, 2]]
    assert rest == [1, 3, 4, 5, 6, 7, 8]


def test_reference_positions_count_lm_evals_forwards():
    from forgetkit.eval.fastlm import reference_positions

    reqs = [(None, [1, 2], [3]), (None, [1, 2], [4]), (None, [1, 2], [5, 6])]
    # one sequence (context + continuation)[:-1] per request: 2 + 2 + 3 positions; lm-eval's
    # logits_cache runs the two one-token continuations of [1, 2] once: 2 + 3
    assert reference_positions(reqs, logits_cache=False) == 7
    assert reference_positions(reqs, logits_cache=True) == 5


# ----------------------------------------------------------------------------- token level

@pytest.mark.parametrize("batch_size", [1, 3, 8])
def test_logprobs_and_greedy_equal_hflm_float64(batch_size):
    from forgetkit.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    model = tiny_model(len(tok), torch.float64)
    reqs = random_requests(model, random.Random(batch_size), n_ctx=9)
    # max_length 64: the 60-token contexts with 7-token continuations are left-truncated by
    # lm-eval and must be scored by the parent
    ref, fast = both(model, tok, batch_size=batch_size, max_length=64)
    ref_res = ref._loglikelihood_tokens(reqs, disable_tqdm=True)
    fast_res = fast._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert_equal_results(ref_res, fast_res, reqs, torch.float64)
    assert any(g for _, g in ref_res)  # the greedy flag is exercised both ways
    assert not all(g for _, g in ref_res)
    st = fast.stats
    assert st["shared_requests"] > 0 and st["parent_requests"] > 0
    assert st["shared_requests"] + st["parent_requests"] == len(reqs)
    assert st["positions"] < st["reference_positions"]  # shared contexts ran once


def test_logprobs_float32_within_derived_tolerance():
    from forgetkit.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    model = tiny_model(len(tok), torch.float32, seed=1)
    reqs = random_requests(model, random.Random(7), n_ctx=8)
    ref, fast = both(model, tok, batch_size=4)
    assert_equal_results(ref._loglikelihood_tokens(reqs, disable_tqdm=True),
                         fast._loglikelihood_tokens(reqs, disable_tqdm=True), reqs,
                         torch.float32)


def test_cache_hook_gets_every_request():
    from lm_eval.api.model import CacheHook

    from forgetkit.models import build_byte_tokenizer

    class Hook(CacheHook):
        def __init__(self):
            self.seen = {}

        def add_partial(self, attr, req, res):
            self.seen[req] = res

    tok = build_byte_tokenizer()
    model = tiny_model(len(tok), torch.float64)
    reqs = [(("ctx", f"c{i}"), [1, 2, 3, 4], [5 + i] * (1 + i % 2)) for i in range(3)]
    reqs.append((("solo", "x"), [9, 9], [3]))
    _, fast = both(model, tok)
    fast.cache_hook = Hook()
    res = fast._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert fast.cache_hook.seen == {r[0]: x for r, x in zip(reqs, res, strict=True)}


# ----------------------------------------------------------------------------- tokenisation

def merging_tokenizer():
    """Byte-level BPE with one merge, 'a'+'b' -> 'ab', applied across any boundary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet(), key=ord)
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    vocab["ab"] = len(vocab)
    t = Tokenizer(models.BPE(vocab=vocab, merges=[("a", "b")]))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<|endoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|pad|>")


def test_tokenisation_merging_across_the_boundary_is_lm_evals():
    from lm_eval.api.instance import Instance

    tok = merging_tokenizer()
    model = tiny_model(len(tok), torch.float64)
    ref, fast = both(model, tok, batch_size=2)
    ctx = "Which one? xa"
    conts = ["bc", "abab", "zz", "bb"]
    # lm-eval's pair: the context's own tokens, and what follows them in the whole string
    ctx_enc, cont_enc = fast._encode_pair(ctx, "bc")
    whole = fast.tok_encode(ctx + "bc")
    assert ctx_enc + cont_enc != whole  # 'a' | 'b' merged into 'ab' in the whole string
    assert whole[len(ctx_enc) - 1] == tok.convert_tokens_to_ids("ab")
    insts = [Instance("loglikelihood", {}, (ctx, c), i) for i, c in enumerate(conts)]
    insts.append(Instance("loglikelihood", {}, ("", "abc"), 9))  # empty context: prefix token
    insts.append(Instance("loglikelihood", {}, ("", "xyz"), 10))
    ref_res = ref.loglikelihood(insts, disable_tqdm=True)
    fast_res = fast.loglikelihood(insts, disable_tqdm=True)
    pairs = [fast._encode_pair(ctx, c) for c in conts] + [([fast.prefix_token_id],
                                                          fast.tok_encode(c, False))
                                                         for c in ("abc", "xyz")]
    assert_equal_results(ref_res, fast_res, [(None, a, b) for a, b in pairs], torch.float64)
    assert fast.stats["shared_requests"] == len(insts)  # all six went through the fast path


# ----------------------------------------------------------------------------- whole tasks

def write_mc_task(d: Path, n: int = 16, seed: int = 0) -> str:
    """A 4-choice task: one shared question per item, choices of different lengths."""
    rng = random.Random(seed)
    letters = "abcdefghij"
    with (d / "mc.jsonl").open("w") as f:
        for i in range(n):
            q = "".join(rng.choice(letters) for _ in range(rng.randint(5, 40)))
            choices = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 9)))
                       for _ in range(4)]
            f.write(json.dumps({"id": i, "q": q, "choices": choices, "label": i % 4}) + "\n")
    (d / "mc.yaml").write_text(
        "task: fk_test_mc4\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'mc.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{q}}\\nAnswer:"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: label\n"
        'target_delimiter: " "\n'
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n")
    return "fk_test_mc4"


def run_task(lm, task: str, include: list[Path]) -> tuple[dict, list[dict]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(model=lm, tasks=[task], log_samples=True,
                                  task_manager=TaskManager(include_path=[str(p) for p in include],
                                                           include_defaults=False))
    return res["results"][task], sorted(res["samples"][task], key=lambda s: s["doc_id"])


def near_tie(lps: list[float], lengths: list[int], bound: float) -> bool:
    """Whether the best choice (raw or length-normalised) is within ``bound`` of another."""
    for score in (lps, [lp / n for lp, n in zip(lps, lengths, strict=True)]):
        top = sorted(score, reverse=True)
        if top[0] - top[1] <= bound:
            return True
    return False


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_whole_mc_tasks_score_identically(tmp_path, dtype):
    from forgetkit.eval.lmeval import materialize_task_dirs
    from forgetkit.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    model = tiny_model(len(tok), dtype, seed=3)
    mc = tmp_path / "mc"
    mc.mkdir()
    tasks = [write_mc_task(mc), "forgetkit_tiny_reverse"]
    include = [mc, *materialize_task_dirs([TINY_TASK_DIR], tmp_path / "resolved")]
    ref, fast = both(model, tok, batch_size=4)
    for task in tasks:
        r_agg, r_samples = run_task(ref, task, include)
        f_agg, f_samples = run_task(fast, task, include)
        ties, worst = 0, 0.0
        for rs, fs in zip(r_samples, f_samples, strict=True):
            r_lps = [float(x[0]) for x in rs["filtered_resps"]]
            f_lps = [float(x[0]) for x in fs["filtered_resps"]]
            n = [len(c) for c in rs["doc"]["choices"]]  # acc_norm's unit: characters
            positions = max(len(fast.tok_encode(c + x)) for c, x in rs["arguments"])
            bound = max(tol(lp, positions, dtype) for lp in r_lps)
            diffs = [abs(a - b) for a, b in zip(r_lps, f_lps, strict=True)]
            worst = max(worst, max(diffs))
            assert max(diffs) <= bound, (diffs, bound)
            if near_tie(r_lps, n, 2 * bound):
                ties += 1
                continue
            assert (fs["acc"], fs["acc_norm"]) == (rs["acc"], rs["acc_norm"]), rs["doc_id"]
        if ties == 0:  # no near-tie anywhere (the case for these seeds): aggregates identical
            assert (f_agg["acc,none"], f_agg["acc_norm,none"]) == (r_agg["acc,none"],
                                                                  r_agg["acc_norm,none"])
        print(f"{task} {dtype}: max |logprob diff| {worst:.2e}, near-ties {ties}")
        assert ties <= 1, f"{task}: {ties} near-ties in {dtype}: pick another seed"
        assert fast.stats["shared_requests"] > 0


# ----------------------------------------------------------------------------- fallbacks

def test_sliding_window_cache_falls_back_to_hflm(caplog):
    from forgetkit.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    model = tiny_model(len(tok), torch.float64, model_type="mistral", sliding_window=4)
    reqs = random_requests(model, random.Random(0), n_ctx=4)
    ref, fast = both(model, tok)
    with caplog.at_level(logging.INFO, logger="forgetkit"):
        fast_res = fast._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert fast_res == ref._loglikelihood_tokens(reqs, disable_tqdm=True)  # the parent's own
    assert "shared-context scoring off" in caplog.text and "DynamicCache" in caplog.text
    assert fast.stats["shared_requests"] == 0


def test_model_without_cache_arguments_falls_back(caplog):
    from forgetkit.models import build_byte_tokenizer

    class NoCache(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids)

    tok = build_byte_tokenizer()
    model = tiny_model(len(tok), torch.float64)
    reqs = random_requests(model, random.Random(1), n_ctx=3)
    ref, fast = both(model, tok)
    fast._model = NoCache(model)
    with caplog.at_level(logging.INFO, logger="forgetkit"):
        fast_res = fast._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert fast_res == ref._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert "takes no cache" in caplog.text


def test_auto_batch_size_without_override_falls_back():
    from forgetkit.models import build_byte_tokenizer

    tok = build_byte_tokenizer()
    _, fast = both(tiny_model(len(tok), torch.float64), tok)
    fast.batch_size_per_gpu = "auto"
    assert fast._static_reason(None) == "batch_size='auto'"
    assert fast._static_reason(4) is None  # lm-eval's override_bs is a fixed batch size


# ----------------------------------------------------------------------------- benchmark

@pytest.mark.slow
def test_eval_speed_benchmark_tiny(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "eval_speed.py"), "--tiny", "--threads", "1",
         "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["summary"]["acc_identical"] is True
    for v in ("cli", "fk-hflm", "fk-shared"):
        assert res["summary"]["items_per_s"][v] > 0
