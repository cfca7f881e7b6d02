"""Score a saved checkpoint: lm-eval tasks plus forgetkit's own metrics, in one process.

``evaluate_checkpoint(model_dir, specs)`` loads the standard HF checkpoint the training stage
wrote (never the accelerate-wrapped training model), then runs every ``MetricSpec``:

``lm_eval``     an lm-eval task through its Python API (``simple_evaluate`` on an HFLM that
                wraps the already loaded model: ``forgetkit.eval.fastlm.SharedContextHFLM``,
                lm-eval's HFLM scoring each multiple-choice context once from a KV cache, with
                lm-eval's tokenisation and scores; it falls back to HFLM where it cannot).
                Task YAMLs are looked up in forgetkit's shipped
                task directory, the prepared offline benchmark directory of ``forgetkit.assets``
                (when present) and the spec's ``include_path``; lm-eval's headline metric and its
                stderr are kept.
``perplexity``  raw text (``format: text`` records): NLL per token over every token of every
                document (EOS included), reported as ``value`` = NLL in nats/token and ``ppl`` =
                exp(NLL). Documents longer than ``max_length`` tokens are truncated (not strided).
``answer_nll``  instruction/chat records: NLL per token of the *response* given the prompt (the
                same masking as training). What it measures depends on the records: forgetkit's
                medical alias scores the answer text given the question alone, i.e. knowledge,
                not the answer format.
``generation``  greedy decoding of ``max_new_tokens`` from the prompt, scored against the record's
                response by exact match, token F1 and ROUGE-L (``value`` = token F1).

Standard errors: token-weighted NLLs use the delta-method ratio estimator with documents as the
sampling unit (``forgetkit.eval.metrics.ratio_stderr``); per-item means use the sample standard
error. Every result record has ``kind, metric, value, stderr, higher_is_better, n``.

Item selection does not depend on the run: a spec's ``limit`` takes a seeded sample with the
evaluation seed (0 by default), so before- and after-scores of every arm and seed see the same
items.

Per-item scores. Every record also has ``items`` -- the score of each item, so that before and
after can be compared item by item (``forgetkit.results.stats``)::

    {"stat": "mean", "id": [...], "score": [...]}                 lm_eval (the headline metric
        per document, from lm-eval's per-sample log), generation (token F1 per item)
    {"stat": "ratio", "id": [...], "score": [...], "count": [...]}  perplexity / answer_nll:
        summed NLL (nats) and number of scored tokens per document; value = sum / sum

``id`` is ``"<position>:<digest>"``: the item's position in the evaluated selection and the
first 10 hex digits of a sha1 of its content (lm-eval's ``doc_hash`` for lm-eval tasks), so a
pairing of two score sets is checked, never assumed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from forgetkit.config import ConfigError, MetricSpec
from forgetkit.data.templates import IGNORE_INDEX, Example, render_instruction, tokenize_record
from forgetkit.eval.metrics import exact_match, mean_stderr, ratio_stderr, rouge_l, token_f1

log = logging.getLogger("forgetkit")

__all__ = ["evaluate_checkpoint", "load_for_eval", "nll_sums", "task_include_dirs"]


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def load_for_eval(model_dir: str | Path, device: torch.device) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) from a standard HF checkpoint directory.

    CPU: fp32 (this kind of CPU has no fast bf16). GPU: the checkpoint's own dtype.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype: Any = torch.float32 if device.type == "cpu" else "auto"
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    model.to(device).eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def task_include_dirs(specs: Sequence[MetricSpec]) -> list[Path]:
    """Task directories lm-eval should search: shipped, prepared offline benchmarks, the specs'."""
    from forgetkit.eval.lmeval import shipped_task_dir

    dirs: list[Path] = [shipped_task_dir()]
    try:
        from forgetkit import assets
    except ImportError:  # pragma: no cover - assets is part of the package
        assets = None  # type: ignore[assignment]
    wanted = {s.task for s in specs if s.kind == "lm_eval"}
    if assets is not None and hasattr(assets, "task_dir") and any(
            t and t.startswith("fk_") for t in wanted):
        dirs.append(Path(assets.task_dir()))
    for s in specs:
        if s.kind == "lm_eval" and s.include_path:
            p = Path(s.include_path)
            if not p.is_dir():
                raise ConfigError(f"evaluation metric {s.name!r}: include_path {s.include_path!r} "
                                  "is not a directory")
            if p not in dirs:
                dirs.append(p)
    return dirs


# ----------------------------------------------------------------------------- local metrics

def _records(spec: MetricSpec, seed: int) -> list[dict[str, Any]]:
    from forgetkit.data.sources import load_records, select

    if spec.data is None:
        raise ConfigError(f"evaluation metric {spec.name!r} ({spec.kind}) needs 'data:'")
    d = spec.data
    if spec.limit is not None and d.limit is None:
        d = type(d)(**{**d.__dict__, "limit": spec.limit})
    return select(load_records(d), d, seed)


def item_id(position: int, content: Any) -> str:
    """``"<position>:<sha1 of the content's canonical JSON, 10 hex digits>"``."""
    blob = json.dumps(content, sort_keys=True, ensure_ascii=False, default=str)
    return f"{position}:{hashlib.sha1(blob.encode()).hexdigest()[:10]}"


def _examples(spec: MetricSpec, records: list[dict[str, Any]], tok: Any
              ) -> tuple[list[Example], list[str]]:
    """(tokenised examples, their item ids); records without a target token are dropped."""
    assert spec.data is not None
    fmt = spec.data.format
    if spec.kind == "perplexity" and fmt != "text":
        raise ConfigError(f"evaluation metric {spec.name!r}: perplexity needs format: text data")
    if spec.kind == "answer_nll" and fmt == "text":
        raise ConfigError(f"evaluation metric {spec.name!r}: answer_nll needs instruction or "
                          "chat data (a prompt and a response)")
    out, ids = [], []
    for i, r in enumerate(records):
        ex = tokenize_record(r, fmt, spec.data.fields, tok, spec.max_length)
        if ex is not None:
            out.append(ex)
            ids.append(item_id(i, r))
    if not out:
        raise ConfigError(f"evaluation metric {spec.name!r}: no record has a target token")
    return out, ids


@torch.no_grad()
def nll_sums(model: Any, examples: Sequence[Example], pad_id: int, batch_size: int,
             device: torch.device, desc: str = "", progress: bool = True
             ) -> tuple[list[float], list[int]]:
    """Per example: (summed NLL in nats over its label tokens, number of label tokens).

    Batches are length-sorted to waste little padding; fp32 log-softmax; results in input order.
    """
    from tqdm.auto import tqdm

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    sums = [0.0] * len(examples)
    counts = [0] * len(examples)
    bar = tqdm(total=len(examples), desc=desc, disable=not progress, leave=False)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        width = max(len(examples[i].input_ids) for i in idx)
        ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
        labels = torch.full((len(idx), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ex = examples[i]
            n = len(ex.input_ids)
            ids[row, :n] = torch.tensor(ex.input_ids)
            labels[row, :n] = torch.tensor(ex.labels)
            mask[row, :n] = 1
        ids, labels, mask = ids.to(device), labels.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        nll = torch.nn.functional.cross_entropy(
            logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
        per_ex = nll.sum(dim=1).double().cpu().tolist()
        per_n = (labels != IGNORE_INDEX).sum(dim=1).cpu().tolist()
        for row, i in enumerate(idx):
            sums[i], counts[i] = per_ex[row], int(per_n[row])
        bar.update(len(idx))
    bar.close()
    return sums, counts


def _nll_metric(spec: MetricSpec, model: Any, tok: Any, batch_size: int, device: torch.device,
                seed: int, progress: bool) -> dict[str, Any]:
    examples, ids = _examples(spec, _records(spec, seed), tok)
    sums, counts = nll_sums(model, examples, tok.pad_token_id, batch_size, device,
                            desc=spec.name, progress=progress)
    value, stderr = ratio_stderr(sums, counts)
    out = {"kind": spec.kind, "metric": "nll", "value": value, "stderr": stderr,
           "higher_is_better": False, "n": len(examples), "tokens": int(sum(counts)),
           "unit": "nats/token"}
    if spec.kind == "perplexity":
        out["ppl"] = math.exp(value)
    out["items"] = {"stat": "ratio", "id": ids, "score": sums, "count": counts}
    return out


@torch.no_grad()
def _generation_metric(spec: MetricSpec, model: Any, tok: Any, batch_size: int,
                       device: torch.device, seed: int, progress: bool) -> dict[str, Any]:
    from tqdm.auto import tqdm

    assert spec.data is not None
    from forgetkit.data.templates import DEFAULT_FIELDS

    fields = {**DEFAULT_FIELDS[spec.data.format], **spec.data.fields}
    prompts, refs, ids = [], [], []
    for i, r in enumerate(_records(spec, seed)):
        ids.append(item_id(i, r))
        if spec.data.format == "instruction":
            prompt, ref = render_instruction(r, fields)
        elif spec.data.format == "chat":
            from forgetkit.data.templates import _messages

            msgs = _messages(r, fields)
            prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
            ref = msgs[-1]["content"]
        else:
            raise ConfigError(f"evaluation metric {spec.name!r}: generation needs instruction or "
                              "chat data")
        prompts.append(prompt)
        refs.append(ref)
    tok.padding_side = "left"  # decoder-only generation continues from the right edge
    preds: list[str] = []
    bar = tqdm(total=len(prompts), desc=spec.name, disable=not progress, leave=False)
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        enc = tok(chunk, return_tensors="pt", padding=True, truncation=True,
                  max_length=spec.max_length, add_special_tokens=spec.data.format != "chat")
        enc = {k: v.to(device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=spec.max_new_tokens, do_sample=False,
                             pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        preds += [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]
        bar.update(len(chunk))
    bar.close()
    tok.padding_side = "right"
    em = [exact_match(p, r) for p, r in zip(preds, refs, strict=True)]
    f1 = [token_f1(p, r) for p, r in zip(preds, refs, strict=True)]
    rl = [rouge_l(p, r) for p, r in zip(preds, refs, strict=True)]
    (m_em, s_em), (m_f1, s_f1), (m_rl, s_rl) = mean_stderr(em), mean_stderr(f1), mean_stderr(rl)
    return {"kind": "generation", "metric": "token_f1", "value": m_f1, "stderr": s_f1,
            "higher_is_better": True, "n": len(preds),
            "all": {"exact_match": m_em, "exact_match_stderr": s_em, "token_f1": m_f1,
                    "token_f1_stderr": s_f1, "rouge_l": m_rl, "rouge_l_stderr": s_rl},
            "examples": [{"prediction": p, "reference": r} for p, r in
                         zip(preds[:5], refs[:5], strict=False)],
            "items": {"stat": "mean", "id": ids, "score": f1}}


# ----------------------------------------------------------------------------- entry point

def evaluate_checkpoint(model_dir: str | Path, specs: Sequence[MetricSpec], *,
                        batch_size: int = 8, device: str = "auto", seed: int = 0,
                        progress: bool = True) -> dict[str, dict[str, Any]]:
    """Score ``model_dir`` on every spec; ``{spec.name: result record}``."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ConfigError(f"evaluation metric names must be unique, got {names}")
    dev = resolve_device(device)
    t0 = time.perf_counter()
    model, tok = load_for_eval(model_dir, dev)
    log.info("evaluating %s on %s (%d metrics)", model_dir, dev, len(specs))
    results: dict[str, dict[str, Any]] = {}
    lm = None
    tm_cache: dict[Any, Any] = {}
    with tempfile.TemporaryDirectory(prefix="forgetkit-tasks-") as tmp:
        include_dirs: list[Path] | None = None
        for i, spec in enumerate(specs, 1):
            t = time.perf_counter()
            log.info("  [%d/%d] %s (%s)", i, len(specs), spec.name, spec.kind)
            if spec.kind == "lm_eval":
                if lm is None:
                    from forgetkit.eval.fastlm import SharedContextHFLM
                    from forgetkit.eval.lmeval import materialize_task_dirs

                    include_dirs = materialize_task_dirs(task_include_dirs(specs), tmp)
                    lm = SharedContextHFLM(pretrained=model, tokenizer=tok,
                                           batch_size=batch_size, device=str(dev))
                from forgetkit.eval.lmeval import run_lm_eval

                assert include_dirs is not None
                res = run_lm_eval(lm, spec, include_dirs, seed=seed, tm_cache=tm_cache)
            elif spec.kind in ("perplexity", "answer_nll"):
                res = _nll_metric(spec, model, tok, batch_size, dev, seed, progress)
            elif spec.kind == "generation":
                res = _generation_metric(spec, model, tok, batch_size, dev, seed, progress)
            else:  # pragma: no cover - the config schema rejects other kinds
                raise ConfigError(f"unknown evaluation kind {spec.kind!r}")
            res["seconds"] = time.perf_counter() - t
            log.info("  [%d/%d] %s: %s = %.4f%s (%.1fs)", i, len(specs), spec.name,
                     res["metric"], res["value"],
                     f" ± {res['stderr']:.4f}" if res.get("stderr") is not None else "",
                     res["seconds"])
            results[spec.name] = res
    log.info("evaluation done in %.1fs", time.perf_counter() - t0)
    del model, lm
    return results
