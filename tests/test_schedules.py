"""Learning-rate schedules: forgetkit's factors are transformers' schedule lambdas, and a real
``transformers.Trainer`` with ``trainer_schedule_args`` uses the same lr on every step."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import TINY_LLAMA

from forgetkit.config import TrainingConfig
from forgetkit.train.optim import (
    build_scheduler,
    lr_at,
    param_groups,
    set_lr,
    trainer_schedule_args,
    warmup_steps,
)

KINDS = ("cosine", "linear", "constant")


def _cfg(kind: str, warmup: int | None, ratio: float = 0.1, **kw) -> TrainingConfig:
    return TrainingConfig(lr=1e-3, scheduler=kind, warmup_steps=warmup, min_lr_ratio=ratio, **kw)


def _probe(lr: float = 1.0) -> torch.optim.Optimizer:
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def _reference(kind: str, opt: torch.optim.Optimizer, warmup: int, total: int, ratio: float):
    """The transformers function the issue names for each forgetkit scheduler, called here
    directly (not through forgetkit)."""
    import transformers

    if kind == "cosine":
        return transformers.get_cosine_with_min_lr_schedule_with_warmup(
            opt, num_warmup_steps=warmup, num_training_steps=total, min_lr_rate=ratio)
    if kind == "linear":
        return transformers.get_linear_schedule_with_warmup(opt, warmup, total)
    return transformers.get_constant_schedule_with_warmup(opt, warmup)


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("warmup", [0, 3])
@pytest.mark.parametrize("kind", KINDS)
def test_factors_equal_transformers_lambda(kind, warmup, ratio):
    total = 20
    cfg = _cfg(kind, warmup, ratio)
    ref = _reference(kind, _probe(), warmup, total, ratio).lr_lambdas[0]
    expected = [float(ref(s)) for s in range(total + 1)]
    assert [lr_at(cfg, total, s) for s in range(total + 1)] == expected  # exact
    # The scheduler object, stepped as the Trainer steps it (optimizer.step, scheduler.step):
    # the lr in the group during step s is lr * factor(s), bit for bit.
    opt = _probe(cfg.lr)
    sched = build_scheduler(opt, cfg, total)
    assert isinstance(sched, torch.optim.lr_scheduler.LambdaLR)
    for s in range(total):
        assert opt.param_groups[0]["lr"] == cfg.lr * expected[s], s
        opt.step()
        sched.step()


def test_schedule_values():
    """The transformers semantics, written out: warmup s/W from 0, cosine towards the floor
    (reached at s = N), linear to 0 at s = N, constant 1."""
    n, w, r = 7, 2, 0.1
    cos = [lr_at(_cfg("cosine", w, r), n, s) for s in range(n + 1)]
    assert cos[:3] == [0.0, 0.5, 1.0]
    for s in range(w, n + 1):
        p = (s - w) / (n - w)
        assert cos[s] == pytest.approx(r + (1 - r) * 0.5 * (1 + math.cos(math.pi * p)), rel=1e-12)
    assert cos[n] == pytest.approx(r, rel=1e-12)
    lin = [lr_at(_cfg("linear", w, r), n, s) for s in range(n + 1)]
    assert lin == pytest.approx([0.0, 0.5, 1.0, 0.8, 0.6, 0.4, 0.2, 0.0], rel=1e-12)
    const = [lr_at(_cfg("constant", w, r), n, s) for s in range(n + 1)]
    assert const == [0.0, 0.5] + [1.0] * (n - 1)
    assert [lr_at(_cfg("constant", 0, r), n, s) for s in range(n)] == [1.0] * n
    assert lr_at(_cfg("linear", 0, r), n, 0) == 1.0  # no warmup: step 0 uses the peak


@pytest.mark.parametrize("warmup", [1, 2, 5])
@pytest.mark.parametrize("kind", ["cosine", "linear"])
def test_peak_used_on_exactly_one_step(kind, warmup):
    total = 12
    f = [lr_at(_cfg(kind, warmup, 0.1), total, s) for s in range(total)]
    assert [s for s, v in enumerate(f) if v == 1.0] == [warmup]
    assert max(f) == 1.0 and f[0] == 0.0
    assert all(a < b for a, b in zip(f[:warmup], f[1:warmup + 1], strict=True))  # rising
    assert all(a > b for a, b in zip(f[warmup:], f[warmup + 1:], strict=False))  # falling


def test_warmup_ratio_and_trainer_arguments():
    from transformers import TrainingArguments

    cfg = _cfg("cosine", None, 0.1, warmup_ratio=0.07)
    # ceil of the same float product in both: 0.07 * 100 = 7.000000000000001 -> 8
    assert warmup_steps(cfg, 100) == 8
    assert TrainingArguments(warmup_steps=0.07, use_cpu=True, report_to="none"
                             ).get_warmup_steps(100) == 8
    assert warmup_steps(cfg, 30) == 3 == TrainingArguments(
        warmup_steps=0.07, use_cpu=True, report_to="none").get_warmup_steps(30)
    # ratio 1.0: transformers reads warmup_steps=1.0 as one step; forgetkit passes the integer
    full = _cfg("linear", None, 0.1, warmup_ratio=1.0)
    assert warmup_steps(full, 30) == 30
    assert TrainingArguments(warmup_steps=1.0, use_cpu=True, report_to="none"
                             ).get_warmup_steps(30) == 1
    args = trainer_schedule_args(full, 30)
    assert args["warmup_steps"] == 30 and isinstance(args["warmup_steps"], int)
    assert trainer_schedule_args(cfg, 100) == {
        "learning_rate": 1e-3, "lr_scheduler_type": "cosine_with_min_lr",
        "lr_scheduler_kwargs": {"min_lr_rate": 0.1}, "warmup_steps": 8, "max_steps": 100}
    assert trainer_schedule_args(_cfg("constant", 2), 9)["lr_scheduler_type"] == \
        "constant_with_warmup"
    assert trainer_schedule_args(_cfg("linear", 2), 9)["lr_scheduler_kwargs"] == {}


def _named_params() -> list[tuple[str, torch.nn.Parameter]]:
    def p(*shape):
        return torch.nn.Parameter(torch.zeros(*shape))

    return [("model.embed_tokens.weight", p(8, 4)), ("model.layers.0.mlp.weight", p(4, 4)),
            ("model.layers.0.norm.weight", p(4)), ("model.layers.1.mlp.weight", p(4, 4)),
            ("model.norm.weight", p(4)), ("lm_head.weight", p(8, 4))]


@pytest.mark.parametrize("kind", KINDS)
def test_set_lr_matches_scheduler_per_group(kind):
    """layer_lr_decay groups have different base lrs (``lr = cfg.lr * lr_scale``): the
    stateless set_lr(lr_at) path gives every group exactly the scheduler object's lr."""
    total = 9
    cfg = _cfg(kind, 2, 0.1, layer_lr_decay=0.5, weight_decay=0.1)
    named = _named_params()
    a = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr)
    b = torch.optim.AdamW(param_groups(named, cfg), lr=cfg.lr)
    assert len({g["lr_scale"] for g in a.param_groups}) == 4  # depths 0..3
    sched = build_scheduler(b, cfg, total)
    for s in range(total):
        lr = set_lr(a, cfg.lr, lr_at(cfg, total, s))
        assert lr == cfg.lr * lr_at(cfg, total, s)
        assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups], s
        for g in a.param_groups:
            assert g["lr"] == pytest.approx(lr * g["lr_scale"], rel=1e-15, abs=0)
        b.step()
        sched.step()


@pytest.fixture
def fresh_accelerate_state():
    """The Trainer configures accelerate's process-wide shared state; clear it afterwards so
    later tests build their own (as a new process would)."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.mark.parametrize("kind", KINDS)
def test_trainer_uses_forgetkit_lr_every_step(kind, tmp_path, fresh_accelerate_state):
    import datasets
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    total, warm = 7, 2
    cfg = _cfg(kind, warm, 0.1)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        **{k: v for k, v in TINY_LLAMA.items() if k != "model_type"}, vocab_size=64))
    rows = [[(5 * i + 3 * j) % 64 for j in range(8)] for i in range(4)]
    data = datasets.Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * 8] * 4,
                                       "labels": rows})
    watched = model.model.layers[0].self_attn.q_proj.weight

    class Record(TrainerCallback):
        """The lr of every group while optimizer.step() runs, and whether it moved a weight.
        on_pre_optimizer_step / on_optimizer_step bracket optimizer.step(); the scheduler
        steps only after on_optimizer_step."""

        def __init__(self) -> None:
            self.lrs: list[list[float]] = []
            self.moved: list[bool] = []
            self.before: torch.Tensor | None = None

        def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kw):
            self.before = watched.detach().clone()
            self.pre_lr = [g["lr"] for g in optimizer.param_groups]

        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            lrs = [g["lr"] for g in optimizer.param_groups]
            assert lrs == self.pre_lr  # the lr during the step
            self.lrs.append(lrs)
            self.moved.append(not torch.equal(self.before, watched.detach()))

    rec = Record()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2,
                             report_to=[], use_cpu=True, save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, seed=0,
                             **trainer_schedule_args(cfg, total))
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[rec])
    trainer.train()
    assert trainer.state.global_step == total
    expected = [lr_at(cfg, total, s) * cfg.lr for s in range(total)]
    assert [lrs[0] for lrs in rec.lrs] == expected  # exact, every step
    assert all(len(set(lrs)) == 1 for lrs in rec.lrs)  # all groups share it
    # the recorded lr is the one that step used: step 0 (lr 0 in warmup) leaves the weight
    assert rec.moved == [e != 0.0 for e in expected] and not rec.moved[0]
