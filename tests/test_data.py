"""Data layer: templates and masking, splits, batch planning, replay mixing, collation."""

from __future__ import annotations

import numpy as np
import pytest

from forgetkit.config import DatasetSpec
from forgetkit.data.batching import (
    collate,
    epoch_stream,
    plan_batches,
    replay_positions,
    split_step,
)
from forgetkit.data.sources import build_examples, split_records
from forgetkit.data.templates import IGNORE_INDEX, tokenize_record
from forgetkit.models import build_byte_tokenizer

TOK = build_byte_tokenizer()


def test_instruction_masks_prompt_and_shifts_labels():
    rec = {"instruction": "Reverse.", "input": "abc", "output": "cba"}
    ex = tokenize_record(rec, "instruction", None, TOK, 512)
    text = TOK.decode(ex.input_ids)
    assert text.endswith("### Response:\ncba<|endoftext|>")
    targets = [t for t in ex.labels if t != IGNORE_INDEX]
    # exactly the response bytes and EOS carry loss
    assert TOK.decode(targets) == "cba<|endoftext|>"
    # labels are pre-shifted: labels[t] == input_ids[t+1] wherever a target is set
    for t, lab in enumerate(ex.labels):
        if lab != IGNORE_INDEX:
            assert lab == ex.input_ids[t + 1]
    assert ex.labels[-1] == IGNORE_INDEX


def test_train_on_prompt_and_text_format():
    rec = {"instruction": "Reverse.", "output": "cba"}
    ex = tokenize_record(rec, "instruction", None, TOK, 512, train_on_prompt=True)
    assert ex.n_targets == len(ex.input_ids) - 1
    ex = tokenize_record({"body": "hello"}, "text", {"text": "body"}, TOK, 512)
    assert TOK.decode(ex.input_ids) == "hello<|endoftext|>" and ex.n_targets == 5


def test_chat_format_masks_all_but_last_assistant_turn():
    rec = {"messages": [{"role": "user", "content": "hi"},
                        {"role": "assistant", "content": "yo"}]}
    ex = tokenize_record(rec, "chat", None, TOK, 512)
    targets = TOK.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert targets.startswith("yo<|endoftext|>")


def test_truncation_drops_examples_without_targets():
    rec = {"instruction": "x" * 100, "output": "y"}
    assert tokenize_record(rec, "instruction", None, TOK, 32) is None
    exs = build_examples([rec, {"instruction": "a", "output": "b"}],
                         DatasetSpec(path="mem"), TOK, 400, False)
    assert len(exs) == 2
    assert len(build_examples([rec], DatasetSpec(path="mem"), TOK, 32, False)) == 0


def test_split_is_seeded_and_disjoint():
    recs = [{"i": i} for i in range(100)]
    a_tr, a_va = split_records(recs, 0.1, seed=3)
    b_tr, b_va = split_records(recs, 0.1, seed=3)
    c_tr, c_va = split_records(recs, 0.1, seed=4)
    assert a_va == b_va and len(a_va) == 10 and len(a_tr) == 90
    assert {r["i"] for r in a_va}.isdisjoint({r["i"] for r in a_tr})
    assert a_va != c_va


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5, 0.9])
@pytest.mark.parametrize("n_task", [7, 100, 333])
def test_replay_exact_count_and_even_spacing(ratio, n_task):
    mask = replay_positions(n_task, ratio)
    total = mask.size
    assert total - mask.sum() == n_task
    assert mask.sum() == round(ratio * total)
    # evenly spread: every window of w slots holds within 1 of its expected share
    for w in (10, 37, total):
        if w > total:
            continue
        csum = np.concatenate([[0], np.cumsum(mask)])
        counts = csum[w:] - csum[:-w]
        assert counts.max() - counts.min() <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_epoch_stream_uses_each_task_example_once(seed):
    s = epoch_stream(50, 20, 0.2, seed, epoch=0)
    task = s.task_idx[s.task_idx >= 0]
    assert sorted(task.tolist()) == list(range(50))
    rep = s.replay_idx[s.replay_idx >= 0]
    assert len(rep) == round(0.2 * len(s.task_idx)) and len(set(rep.tolist())) == len(rep)
    s2 = epoch_stream(50, 20, 0.2, seed, epoch=0)
    assert (s.task_idx == s2.task_idx).all() and (s.replay_idx == s2.replay_idx).all()
    s3 = epoch_stream(50, 20, 0.2, seed, epoch=1)
    assert not (s.task_idx == s3.task_idx).all()


def test_length_grouped_batches_reduce_padding():
    rng = np.random.default_rng(0)
    lengths = rng.lognormal(4, 0.8, size=512).astype(int) + 5
    gb = 8
    grouped = plan_batches(lengths, gb, "length_grouped", seed=0, epoch=0)
    random_ = plan_batches(lengths, gb, "random", seed=0, epoch=0)
    assert sorted(i for b in grouped for i in b) == list(range(512))

    def padding(batches):
        return sum(len(b) * max(lengths[b]) - lengths[b].sum() for b in batches)

    assert padding(grouped) < 0.3 * padding(random_)
    # the batch with the longest example goes first (fail fast on memory)
    assert lengths.max() in lengths[grouped[0]]
    assert plan_batches(lengths, gb, "length_grouped", 0, 0) == grouped


def test_split_step_partitions_global_batch():
    lengths = list(range(100, 116))
    batch = list(range(16))
    parts = [split_step(batch, lengths, world_size=2, rank=r, accum=2) for r in range(2)]
    flat = sorted(i for p in parts for mb in p for i in mb)
    assert flat == batch
    assert all(len(mb) == 4 for p in parts for mb in p)


def test_collate_pads_right_to_multiple():
    a = tokenize_record({"instruction": "a", "output": "b"}, "instruction", None, TOK, 512)
    b = tokenize_record({"instruction": "abcdefghij", "output": "b"}, "instruction", None, TOK,
                        512)
    batch = collate([a, b], TOK.pad_token_id, 8)
    B, T = batch["input_ids"].shape
    assert B == 2 and T % 8 == 0 and T >= len(b.input_ids)
    assert batch["attention_mask"][0].sum() == len(a.input_ids)
    assert (batch["labels"][0, len(a.input_ids):] == IGNORE_INDEX).all()
