"""Turn records into token sequences with loss masks.

Three formats:

* ``instruction`` -- the Alpaca template (``### Instruction`` / ``### Input`` / ``### Response``);
* ``chat`` -- the tokenizer's own chat template; the loss is on the last assistant turn;
* ``text`` -- raw text for continued pre-training; every token carries loss.

Prompt and response are tokenised separately and concatenated, so the boundary between masked
and trained tokens is exact (the same choice as torchtune). Labels are returned *already shifted*
(``labels[t]`` is the target for the logits at position ``t``, i.e. token ``t+1``), so the loss
needs no copy of the logits; ignored positions hold ``IGNORE_INDEX``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from forgetkit.config import FORMAT_FIELDS

IGNORE_INDEX = -100

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# template field -> default column; the field names per format live in the config schema, which
# rejects an unknown key in `fields:` (FORMAT_FIELDS), so the two cannot drift apart.
DEFAULT_FIELDS = {fmt: {k: k for k in keys} for fmt, keys in FORMAT_FIELDS.items()}


class FormatError(ValueError):
    """A record does not have the fields its format needs."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # shifted: labels[t] is the target of position t
    source: int = 0  # 0: the fine-tuning task; 1: replay data

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)


def _get(record: Mapping[str, Any], fields: Mapping[str, str], key: str, required: bool) -> str:
    col = fields.get(key, key)
    val = record.get(col)
    if val is None or (isinstance(val, float) and val != val):  # None or NaN (pandas)
        if required:
            raise FormatError(f"record has no field {col!r} (needed for {key!r}); "
                              f"its fields are {sorted(record)}")
        return ""
    return str(val)


def _text_problem(record: Mapping[str, Any], fields: Mapping[str, str], key: str,
                  required: bool) -> str | None:
    col = fields.get(key, key)
    val = record.get(col)
    if val is None or (isinstance(val, float) and val != val):
        if required:
            return (f"record has no field {col!r} (needed for {key!r}); its fields are "
                    f"{sorted(map(str, record))}")
        return None
    if isinstance(val, (dict, list)):
        return f"field {col!r} (for {key!r}) is a {type(val).__name__}, expected text"
    return None


def check_record(record: Any, fmt: str, fields: Mapping[str, str] | None = None) -> str | None:
    """What keeps a record from being used in format ``fmt`` (one phrase), or None.

    The same rules as :func:`tokenize_record`, without a tokenizer, so a data file can be
    checked in full before training starts (a bad record 3,000 lines in would otherwise stop a
    run after the model loaded).
    """
    if not isinstance(record, Mapping):
        return f"expected a record (an object), got {type(record).__name__}"
    f = {**DEFAULT_FIELDS[fmt], **(fields or {})}
    if fmt == "text":
        return _text_problem(record, f, "text", True)
    if fmt == "chat" and record.get(f["messages"]) is not None:
        msgs = record[f["messages"]]
        if isinstance(msgs, (str, bytes, Mapping)) or not hasattr(msgs, "__iter__"):
            return f"field {f['messages']!r} must be a list of messages"
        msgs = list(msgs)  # parquet list columns arrive as numpy arrays
        if not msgs:
            return f"field {f['messages']!r} must be a non-empty list of messages"
        for j, m in enumerate(msgs):
            if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not \
                    isinstance(m.get("content"), str):
                return (f"message {j} of {f['messages']!r} must be an object with string "
                        "'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            return "a chat record must end with an assistant message"
        return None
    for key, required in (("instruction", True), ("input", False), ("output", True)):
        problem = _text_problem(record, f, key, required)
        if problem:
            return problem
    return None


def render_instruction(record: Mapping[str, Any], fields: Mapping[str, str]) -> tuple[str, str]:
    """(prompt, response) text of an Alpaca-style record."""
    instruction = _get(record, fields, "instruction", True)
    inp = _get(record, fields, "input", False)
    output = _get(record, fields, "output", True)
    if inp.strip():
        prompt = ALPACA_PROMPT_WITH_INPUT.format(instruction=instruction, input=inp)
    else:
        prompt = ALPACA_PROMPT.format(instruction=instruction)
    return prompt, output


def _messages(record: Mapping[str, Any], fields: Mapping[str, str]) -> list[dict[str, str]]:
    col = fields.get("messages", "messages")
    if col in record and record[col] is not None:
        msgs = [dict(m) for m in record[col]]
    else:
        instruction = _get(record, fields, "instruction", True)
        inp = _get(record, fields, "input", False)
        user = instruction + ("\n\n" + inp if inp.strip() else "")
        msgs = [{"role": "user", "content": user},
                {"role": "assistant", "content": _get(record, fields, "output", True)}]
    if not msgs or msgs[-1].get("role") != "assistant":
        raise FormatError("a chat record must end with an assistant message")
    return msgs


def tokenize_record(record: Mapping[str, Any], fmt: str, fields: Mapping[str, str] | None,
                    tokenizer: Any, max_length: int, train_on_prompt: bool = False,
                    source: int = 0) -> Example | None:
    """Tokenise one record. Returns None when truncation leaves no target token."""
    f = {**DEFAULT_FIELDS[fmt], **(fields or {})}
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = _encode(tokenizer, _get(record, f, "text", True), add_special=True) + [eos]
        prompt_len = 0
    else:
        if fmt == "instruction":
            prompt, response = render_instruction(record, f)
            p_ids = _encode(tokenizer, prompt, add_special=True)
            r_ids = _encode(tokenizer, response, add_special=False) + [eos]
        else:
            msgs = _messages(record, f)
            prompt = tokenizer.apply_chat_template(msgs[:-1], tokenize=False,
                                                   add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs, tokenize=False)
            if not full.startswith(prompt):
                raise FormatError("the chat template does not render the prompt as a prefix of "
                                  "the full conversation; use format: instruction")
            p_ids = _encode(tokenizer, prompt, add_special=False)
            r_ids = _encode(tokenizer, full[len(prompt):], add_special=False)
            if not r_ids or r_ids[-1] != eos:
                r_ids = r_ids + [eos]
        ids = p_ids + r_ids
        prompt_len = 0 if train_on_prompt else len(p_ids)
    ids = ids[:max_length]
    # Target of position t is ids[t+1]; positions whose target lies in the prompt are ignored.
    labels = [ids[t + 1] if t + 1 >= prompt_len else IGNORE_INDEX for t in range(len(ids) - 1)]
    labels.append(IGNORE_INDEX)
    ex = Example(ids, labels, source)
    return ex if ex.n_targets > 0 else None


def _encode(tokenizer: Any, text: str, add_special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def pack_examples(examples: list[Example], max_length: int) -> list[Example]:
    """Concatenate text examples (each already ends with EOS) and cut them into full blocks.

    Used for raw-text continued pre-training: no padding at all. Attention crosses document
    boundaries inside a block (the usual pre-training convention); the loss on the first token
    of a document is predicted from the end of the previous one, exactly as in GPT-style packing.
    """
    stream: list[int] = []
    for ex in examples:
        stream.extend(ex.input_ids)
    out = []
    for start in range(0, len(stream) - max_length, max_length):
        block = stream[start:start + max_length + 1]
        out.append(Example(block[:-1], block[1:], examples[0].source if examples else 0))
    return out
