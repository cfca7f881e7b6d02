"""Per-example Fisher under a memory budget: the vmap plan (chunk >= 1, parameter groups that fit),
grouped vmap equal to the one-example loop, the "auto" choice, and the progress bar."""

from __future__ import annotations

import sys

import pytest
import torch
from numerics import diff_report
from test_fisher import GENERAL, TINY

from forgetkit.config import ModelConfig
from forgetkit.data.batching import make_batches
from forgetkit.data.sets import load_examples
from forgetkit.models import load_model
from forgetkit.regularizers import fisher as fisher_mod
from forgetkit.regularizers.fisher import (
    estimate_fisher,
    param_groups_for_budget,
    vmap_plan,
)

EPS32 = torch.finfo(torch.float32).eps


@pytest.fixture(scope="module")
def tiny():
    model, tok = load_model(ModelConfig(random_init=dict(TINY), tokenizer="byte"), seed=0)
    examples = load_examples(GENERAL, tok, max_length=64, seed=0, limit=6)
    batches = make_batches(examples, 3, tok.pad_token_id)
    assert sum(int((b["attention_mask"] == 0).sum()) for b in batches) > 0  # padding exercised
    return model, batches


def tolerance(model, batches) -> float:
    """Relative (to each tensor's max) bound for two fp32 evaluations of the same squared
    per-example gradients in different summation orders: every gradient entry is a sum over the
    sequence (T), the hidden contractions (d) and the vocabulary's softmax (V), so it carries a
    rounding error of at most ~(T + d + V) eps of its largest terms; squaring doubles the
    relative error; x4 for the mean over examples and the different padding of the two paths."""
    T = max(int(b["input_ids"].shape[1]) for b in batches)
    cfg = model.config
    return 4 * 2 * (T + cfg.hidden_size + cfg.vocab_size) * EPS32


def assert_close_rel_max(got, ref, tol):
    for n in ref:
        scale = float(ref[n].abs().max()) + 1e-30
        err = float((got[n] - ref[n]).abs().max())
        assert err <= tol * scale, f"{n}: {err:.3e} > {tol:.1e} * {scale:.3e}; " + \
            diff_report(got, ref)


# ----------------------------------------------------------------------------- the plan

def test_plan_whole_gradient_fits():
    sizes = [10, 20, 30]
    (g, chunk), = vmap_plan(sizes, 4, 4 * 60 * 3)  # three whole per-example gradients
    assert g == [0, 1, 2] and chunk == 3


@pytest.mark.parametrize("budget", [4 * 35, 4 * 30, 4 * 25, 4 * 7, 1])
def test_plan_groups_fit_the_budget_and_chunks_are_at_least_one(budget):
    sizes = [10, 20, 30, 5, 5]
    plan = vmap_plan(sizes, 4, budget)
    flat = [i for g, _ in plan for i in g]
    assert flat == list(range(len(sizes)))  # every parameter once, in order
    for g, chunk in plan:
        nbytes = 4 * sum(sizes[i] for i in g)
        assert chunk >= 1
        if len(g) > 1:  # a group of several tensors fits, for all its examples together
            assert chunk * nbytes <= budget
        else:  # a single tensor may be over the budget: then it is alone, one example a call
            assert nbytes <= budget or chunk == 1
    assert param_groups_for_budget(sizes, 4, 4 * 35) == [[0, 1], [2, 3], [4]]


def test_default_budget_135m_model_gets_groups_not_zero():
    # SmolLM2-135M: 134.5 M fp32 parameters, 538 MB per-example gradient > 256 MiB budget:
    # before, chunk = 256 MiB // 538 MB rounded to 0.
    sizes = [49152 * 576] + [576 * 576] * 2 * 30 + [576 * 192] * 2 * 30 + [576 * 1536] * 3 * 30
    plan = vmap_plan(sizes, 4, 1 << 28)
    assert len(plan) >= 2 and all(c >= 1 for _, c in plan)


# ----------------------------------------------------------------------------- equality

@pytest.mark.parametrize("estimator", ["empirical", "sampled"])
@pytest.mark.parametrize("budget_fraction", [0.5, 0.2, 0.01])
def test_grouped_vmap_equals_loop(tiny, estimator, budget_fraction):
    model, batches = tiny
    n = sum(p.numel() for p in model.parameters())
    budget = int(4 * n * budget_fraction)  # one per-example gradient does not fit
    sizes = [p.numel() for p in model.parameters()]
    assert len(vmap_plan(sizes, 4, budget)) >= 2
    kw = dict(samples=2, seed=3, progress=False)
    loop = estimate_fisher(model, batches, estimator, per_example="loop", **kw)
    grouped = estimate_fisher(model, batches, estimator, per_example="vmap",
                              vmap_budget_bytes=budget, **kw)
    assert all(p.grad is None for p in model.parameters())
    assert_close_rel_max(grouped, loop, tolerance(model, batches))
    assert any(float(t.abs().max()) > 0 for t in loop.values())


def test_auto_takes_vmap_only_when_two_whole_gradients_fit(tiny, monkeypatch):
    model, batches = tiny
    n = sum(p.numel() for p in model.parameters())
    calls = []
    real = fisher_mod._vmap_sq_grads

    def spy(*a, **k):
        calls.append(a[-1])
        return real(*a, **k)

    monkeypatch.setattr(fisher_mod, "_vmap_sq_grads", spy)
    ref = estimate_fisher(model, batches, per_example="auto", vmap_budget_bytes=4 * n // 2,
                          progress=False)
    assert calls == []  # over budget: the loop (faster than grouped vmap, benchmarks/README)
    got = estimate_fisher(model, batches, per_example="auto", vmap_budget_bytes=8 * n,
                          progress=False)
    assert calls and all(len(plan) == 1 and plan[0][1] == 2 for plan in calls)
    assert_close_rel_max(got, ref, tolerance(model, batches))


# ----------------------------------------------------------------------------- progress

class RecordingBar:
    made: list[RecordingBar] = []

    def __init__(self, total, **kw):
        self.total, self.n, self.closed = total, 0, False
        RecordingBar.made.append(self)

    def update(self, k):
        self.n += k

    def close(self):
        self.closed = True


@pytest.fixture()
def fake_tty(monkeypatch):
    import tqdm.auto

    RecordingBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    return RecordingBar


def test_progress_bar_counts_examples_on_rank0(tiny, fake_tty):
    model, batches = tiny
    n_ex = sum(int(b["input_ids"].shape[0]) for b in batches)
    estimate_fisher(model, batches, per_example="loop")
    (bar,) = fake_tty.made
    assert bar.total == n_ex and bar.n == n_ex and bar.closed
    fake_tty.made.clear()
    estimate_fisher(model, batches, per_example="loop", progress=False)
    assert fake_tty.made == []
    # rank 1 of 2 (the sums are not all-reduced here: a no-op all_reduce): no bar
    estimate_fisher(model, batches, per_example="loop", rank=1, world_size=2,
                    all_reduce=lambda t: None)
    assert fake_tty.made == []
    # rank 0 of 2 counts its own batches (0, 2, ...)
    estimate_fisher(model, batches, per_example="loop", rank=0, world_size=2,
                    all_reduce=lambda t: None)
    (bar,) = fake_tty.made
    assert bar.total == sum(int(b["input_ids"].shape[0]) for b in batches[::2]) == bar.n


def test_no_bar_without_a_terminal(tiny, monkeypatch):
    import tqdm.auto

    RecordingBar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", RecordingBar)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    model, batches = tiny
    estimate_fisher(model, batches[:1], per_example="loop")
    assert RecordingBar.made == []
