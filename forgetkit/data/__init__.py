"""Data: sources -> templates (tokenise + mask) -> batch planning (+ replay mixing) -> collate."""

from forgetkit.data.batching import collate, epoch_stream, plan_batches, split_step
from forgetkit.data.sources import build_examples, load_records, split_records
from forgetkit.data.templates import IGNORE_INDEX, Example, tokenize_record

__all__ = [
    "IGNORE_INDEX",
    "Example",
    "build_examples",
    "collate",
    "epoch_stream",
    "load_records",
    "plan_batches",
    "split_records",
    "split_step",
    "tokenize_record",
]
