"""lm-eval loglikelihood scoring that runs each shared context once.

A multiple-choice item asks lm-eval for ``log p(choice | context)`` of every choice: N
``(context, continuation)`` requests with the same context. lm-eval's HF backend
(``HFLM._loglikelihood_tokens``) runs every request as its own sequence ``context +
continuation`` and keeps the log-softmax of every position, so the context is computed N times
and its ``V``-wide logits are computed and thrown away N times. :class:`SharedContextHFLM` is an
``HFLM`` that gives lm-eval the same ``(sum logprob, is_greedy)`` per request, computed as:

1. requests are tokenised by lm-eval itself (``loglikelihood`` -> ``_encode_pair``, unchanged),
   then grouped by their context token ids;
2. per group, the *prefix* ``context_enc[:-1]`` runs once with ``use_cache=True`` (logits of
   its last position only, ``logits_to_keep=1``), up to ``batch_size`` groups per forward,
   right-padded as lm-eval pads (no attention mask needed: padding comes after the tokens);
3. every continuation of the group is scored in one batch from that cache: input ``[last
   context token] + continuation[:-1]`` (lm-eval feeds ``(context + continuation)[:-1]`` and
   scores the last ``len(continuation)`` logits, the first of which is the last context
   token's), position ids starting at the prefix length, the cache rows expanded over the batch
   (``index_select`` of the ``DynamicCache`` tensors), a 2-D attention mask that hides the
   right-padding of shorter prefixes inside the cache, up to ``batch_size`` rows per forward;
4. log-softmax (``softmax_dtype``), argmax and gather exactly as lm-eval does; results in the
   original request order, ``cache_hook`` fed as lm-eval feeds it.

This is mathematically lm-eval's computation, so the numbers equal its HF backend's up to the
rounding of differently shaped calls (tests/test_fastlm.py: float64 logprobs within 4 eps *
positions * (1 + |logprob|), ~1e-15 observed; float32 ~1e-7 relative; is_greedy and the
acc/acc_norm of whole tasks identical). An empty context string is lm-eval's business too: its
``loglikelihood`` turns it into ``[prefix_token_id]`` before this class sees the tokens.

Handed to the parent (``HFLM``) unchanged: requests whose context is not shared (a one-request
group, e.g. ``loglikelihood_rolling`` windows), requests lm-eval left-truncates (``len(context)
+ len(continuation) > max_length + 1``: the window then differs per continuation), empty
context or continuation token lists (lm-eval's own assertions then fire). The whole call goes to the
parent, with one log line saying why, for a seq2seq model, ``batch_size="auto"`` (without
lm-eval's ``override_bs``), a forward without ``position_ids``/``attention_mask``/cache
arguments, a cache that is not a plain ``DynamicCache`` of ``DynamicLayer``s (sliding-window,
linear-attention, quantised or static caches), or a failed self-check: on first use, a few
synthetic requests (a long prefix, a short one inside a padded cache, a one-token context) are
scored both ways and must agree to ``max(64 eps, 1e-4) * (1 + |logprob|)`` (eps of the compute
dtype) and in ``is_greedy``.
``logits_cache`` needs nothing: lm-eval's one-token-continuation reuse returns the same values,
and a shared context is computed once here anyway.

Use::

    lm = SharedContextHFLM(pretrained=model, tokenizer=tok, batch_size=8, device="cpu")
    lm_eval.simple_evaluate(model=lm, tasks=[...])

``lm.stats`` counts requests per path and the token positions run through the model.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.models.huggingface import HFLM

log = logging.getLogger("forgetkit")

__all__ = ["SharedContextHFLM", "group_by_context", "reference_positions"]

# (request strings or None, context token ids, continuation token ids): lm-eval's own format
Request = tuple[Any, list[int], list[int]]


def group_by_context(requests: Sequence[Request], max_length: int,
                     one_token_to_parent: bool = False) -> tuple[list[list[int]], list[int]]:
    """(groups, rest): indices of requests sharing a context, and those the parent must score.

    A group has >= 2 requests with identical context token ids, none empty or truncated by
    lm-eval (``len(context) + len(continuation) <= max_length + 1``). With
    ``one_token_to_parent`` (lm-eval's ``logits_cache`` on), a group whose continuations are all
    one token goes to the parent: lm-eval already runs such a context once (lettered answers:
    " A", " B", ...), and copying a KV cache would only add work. Groups are ordered by
    descending prefix length (then by context ids, for a deterministic order), members in
    request order; ``rest`` is in request order.
    """
    by_ctx: dict[tuple[int, ...], list[int]] = {}
    rest: list[int] = []
    for i, (_, ctx, cont) in enumerate(requests):
        if not ctx or not cont or len(ctx) + len(cont) > max_length + 1:
            rest.append(i)
        else:
            by_ctx.setdefault(tuple(ctx), []).append(i)
    groups: list[list[int]] = []
    for members in by_ctx.values():
        one_token = all(len(requests[i][2]) == 1 for i in members)
        if len(members) >= 2 and not (one_token_to_parent and one_token):
            groups.append(members)
        else:
            rest.extend(members)
    groups.sort(key=lambda g: (-len(requests[g[0]][1]), tuple(requests[g[0]][1])))
    return groups, sorted(rest)


def reference_positions(requests: Sequence[Request], logits_cache: bool = True) -> int:
    """Token positions lm-eval's HF backend runs for ``requests``.

    One sequence ``(context + continuation)[:-1]`` per request; with ``logits_cache`` (lm-eval's
    default) requests with the same such sequence (one-token continuations of one context) run
    once.
    """
    seqs = [tuple(ctx + cont[:-1]) for _, ctx, cont in requests]
    return sum(len(s) for s in (set(seqs) if logits_cache else seqs))


def _chunks(items: Sequence[Any], n: int) -> list[Sequence[Any]]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _output_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return getattr(out, "past_key_values", None) if cache is None else cache


def _cache_tensors(cache: Any) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """Per layer (keys, values) of a plain DynamicCache; None for any other cache."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    if type(cache) is not DynamicCache or not getattr(cache, "layers", None):
        return None
    out = []
    for layer in cache.layers:
        if type(layer) is not DynamicLayer or not getattr(layer, "is_initialized", False):
            return None
        out.append((layer.keys, layer.values))
    return out


class SharedContextHFLM(HFLM):
    """``HFLM`` that scores the requests sharing a context from one cached context prefix.

    Same constructor as ``lm_eval.models.huggingface.HFLM``; see the module docstring.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._fast_reason: str | None = None  # why the fast path is off (None: not decided)
        self._fast_checked = False
        self._logged: set[str] = set()
        self.stats: dict[str, int] = {"shared_requests": 0, "parent_requests": 0,
                                      "groups": 0, "positions": 0, "reference_positions": 0}

    # ------------------------------------------------------------------ lm-eval entry point

    def _loglikelihood_tokens(self, requests: list[Request], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        reason = self._static_reason(override_bs)
        groups = (group_by_context(requests, self.max_length, bool(self.logits_cache))[0]
                  if reason is None else [])
        if reason is None and groups:
            reason = self._check_fast_path()
        if reason is not None or not groups:
            if reason is not None:
                self._log_once(f"shared-context scoring off ({reason}); lm-eval's HFLM scores "
                               "these requests")
            self.stats["parent_requests"] += len(requests)
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm,
                                                 override_bs=override_bs)
        batch_size = int(override_bs if self.batch_size == "auto" else self.batch_size)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        from tqdm.auto import tqdm

        n_shared = sum(len(g) for g in groups)
        bar = tqdm(total=n_shared, disable=disable_tqdm or self.rank != 0,
                   desc="Running loglikelihood requests (shared contexts)")
        for i, r in self._score_groups(requests, groups, batch_size, bar):
            results[i] = r
            req_str = requests[i][0]
            if req_str is not None:
                self.cache_hook.add_partial("loglikelihood", req_str, r)
        bar.close()
        done = [g for g in groups if results[g[0]] is not None]
        self.stats["shared_requests"] += sum(len(g) for g in done)
        self.stats["groups"] += len(done)
        self.stats["reference_positions"] += reference_positions(
            [requests[i] for g in done for i in g], bool(self.logits_cache))
        rest = [i for i, r in enumerate(results) if r is None]  # + any the fast path gave up on
        if self._fast_reason is not None:
            self._log_once(f"shared-context scoring stopped ({self._fast_reason}); lm-eval's "
                           "HFLM scores the remaining requests")
        if rest:
            sub = super()._loglikelihood_tokens([requests[i] for i in rest],
                                                disable_tqdm=disable_tqdm,
                                                override_bs=override_bs)
            for i, r in zip(rest, sub, strict=True):
                results[i] = r
            self.stats["parent_requests"] += len(rest)
        return results  # type: ignore[return-value]

    # ------------------------------------------------------------------ support checks

    def _log_once(self, msg: str) -> None:
        if msg not in self._logged:
            self._logged.add(msg)
            log.info(msg)

    def _forward_params(self) -> dict[str, inspect.Parameter]:
        try:
            return dict(inspect.signature(self.model.forward).parameters)
        except (TypeError, ValueError):
            return {}

    def _cache_kwarg(self) -> str | None:
        """The forward's name for the cache argument, or None when it cannot take one."""
        params = self._forward_params()
        if not {"position_ids", "attention_mask"} <= params.keys() and not any(
                p.kind is p.VAR_KEYWORD for p in params.values()):
            return None
        for name in ("cache", "past_key_values"):
            if name in params:
                return name
        if any(p.kind is p.VAR_KEYWORD for p in params.values()):  # a wrapper (PEFT): guess,
            import transformers  # the self-check decides

            return "cache" if int(transformers.__version__.split(".")[0]) >= 5 else (
                "past_key_values")
        return None

    def _static_reason(self, override_bs: int | None) -> str | None:
        if self.backend != "causal":
            return f"backend {self.backend!r}, not causal"
        if self.batch_size == "auto" and not override_bs:
            return "batch_size='auto'"
        if self._fast_reason is None and self._cache_kwarg() is None:
            self._fast_reason = "the model's forward takes no cache/position_ids/attention_mask"
            self._fast_checked = True
        return self._fast_reason

    def _check_fast_path(self) -> str | None:
        """Once: score synthetic requests both ways; the fast path is used only if they agree."""
        if self._fast_checked:
            return self._fast_reason
        self._fast_checked = True
        vocab = int(getattr(self.model.config, "vocab_size", 0) or self.vocab_size)
        ids = [(7 * i + 3) % vocab for i in range(24)]
        ctx_long, ctx_short, ctx_one = ids[:9], ids[9:11], ids[11:12]
        reqs: list[Request] = [
            (None, ctx_long, ids[12:13]), (None, ctx_long, ids[13:16]),
            (None, ctx_short, ids[16:18]), (None, ctx_short, ids[18:19]),
            (None, ctx_one, ids[19:20]), (None, ctx_one, ids[20:23]),
        ]
        if max(len(c) + len(x) for _, c, x in reqs) > self.max_length + 1:
            self._fast_reason = "max_length is too short for the self-check"
            return self._fast_reason
        saved = dict(self.stats)
        try:
            fast = dict(self._score_groups(reqs, group_by_context(reqs, self.max_length)[0], 4,
                                           None))
        except Exception as e:  # noqa: BLE001 - any failure means: not supported, use the parent
            self._fast_reason = f"cached scoring failed: {type(e).__name__}: {e}"
            return self._fast_reason
        finally:
            self.stats = saved
        if self._fast_reason is not None:  # set by _score_groups (unsupported cache)
            return self._fast_reason
        ref = HFLM._loglikelihood_tokens(self, reqs, disable_tqdm=True)
        # catches structural errors (positions, mask or cache ignored: O(1) differences), not
        # rounding: 64 eps of the compute dtype, at least 1e-4, relative to 1 + |logprob|
        tol = max(64 * self._compute_eps(), 1e-4)
        for i, (lp, greedy) in enumerate(ref):
            got_lp, got_greedy = fast[i]
            if abs(got_lp - lp) > tol * (1 + abs(lp)) or got_greedy != greedy:
                self._fast_reason = (f"self-check disagrees with HFLM: logprob {got_lp!r} vs "
                                     f"{lp!r}, greedy {got_greedy} vs {greedy}")
                return self._fast_reason
        log.info("shared-context scoring on (self-check: equal to HFLM within %.1e x "
                 "(1 + |logprob|))", tol)
        return None

    def _compute_eps(self) -> float:
        """Machine epsilon of the model's compute dtype (autocast's if set)."""
        dtype = self.mixed_precision_dtype
        if dtype is None:
            dtype = next(self.model.parameters()).dtype
        return float(torch.finfo(dtype if dtype.is_floating_point else torch.float16).eps)

    # ------------------------------------------------------------------ the fast path

    def _autocast(self) -> Any:
        return torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                              enabled=self.mixed_precision_dtype is not None)

    @torch.no_grad()
    def _score_groups(self, requests: Sequence[Request], groups: Sequence[list[int]],
                      batch_size: int, bar: Any):  # noqa: ANN201 - a generator of (index, result)
        """Yield ``(request index, (sum logprob, is_greedy))`` for every request of ``groups``.

        Up to ``batch_size`` groups share one prefix forward; their continuation rows (longest
        first) run ``batch_size`` at a time. Sets ``_fast_reason`` and stops on a cache it
        cannot expand.
        """
        kw = self._cache_kwarg()
        assert kw is not None
        keep = {"logits_to_keep": 1} if "logits_to_keep" in self._forward_params() else {}
        dev = self.device
        for chunk in _chunks(groups, batch_size):
            prefixes = [requests[g[0]][1][:-1] for g in chunk]
            width = max(len(p) for p in prefixes)
            layers = None
            if width:
                ids = torch.zeros((len(chunk), width), dtype=torch.long)
                for row, p in enumerate(prefixes):
                    ids[row, :len(p)] = torch.tensor(p, dtype=torch.long)
                with self._autocast():
                    out = self.model(input_ids=ids.to(dev), use_cache=True, **keep)
                layers = _cache_tensors(_output_cache(out))
                del out
                if layers is None:
                    self._fast_reason = "the model's cache is not a plain DynamicCache"
                    return
                self.stats["positions"] += sum(len(p) for p in prefixes)
            rows = [(gi, i) for gi, g in enumerate(chunk) for i in g]
            rows.sort(key=lambda r: -len(requests[r[1]][2]))  # stable: groups stay together
            for sub in _chunks(rows, batch_size):
                yield from self._score_rows(requests, sub, prefixes, width, layers, kw, dev)
                if bar is not None:
                    bar.update(len(sub))

    def _score_rows(self, requests: Sequence[Request], sub: Sequence[tuple[int, int]],
                    prefixes: list[list[int]], width: int,
                    layers: list[tuple[torch.Tensor, torch.Tensor]] | None, kw: str,
                    dev: torch.device):  # noqa: ANN201 - a generator of (index, result)
        """One forward over the continuation rows ``sub`` ((group in chunk, request index))."""
        from transformers.cache_utils import DynamicCache

        conts = [requests[i][2] for _, i in sub]
        t = max(len(c) for c in conts)
        inp = torch.zeros((len(sub), t), dtype=torch.long)
        for row, ((_, i), cont) in enumerate(zip(sub, conts, strict=True)):
            inp[row, :len(cont)] = torch.tensor([requests[i][1][-1], *cont[:-1]])
        args: dict[str, Any] = {"input_ids": inp.to(dev), "use_cache": False}
        if layers is not None:
            # positions continue each row's own prefix (right-padding repeats the last one: its
            # outputs are discarded); the mask hides the cache's padding of shorter prefixes
            pos = torch.zeros((len(sub), t), dtype=torch.long)
            mask = torch.ones((len(sub), width + t), dtype=torch.long)
            for row, (gi, _) in enumerate(sub):
                n_pre, n = len(prefixes[gi]), len(conts[row])
                pos[row, :n] = torch.arange(n_pre, n_pre + n)
                pos[row, n:] = n_pre + n - 1
                mask[row, n_pre:width] = 0
            sel = torch.tensor([gi for gi, _ in sub], dtype=torch.long, device=dev)
            args.update({
                "position_ids": pos.to(dev), "attention_mask": mask.to(dev), "use_cache": True,
                kw: DynamicCache(ddp_cache_data=[(k.index_select(0, sel), v.index_select(0, sel))
                                                 for k, v in layers])})
        # else (all contexts one token long): exactly lm-eval's own right-padded call
        with self._autocast():
            logits = self.model(**args).logits
        self.stats["positions"] += sum(len(c) for c in conts)
        logprobs = F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
        del logits
        for row, ((_, i), cont) in enumerate(zip(sub, conts, strict=True)):
            lp = logprobs[row, :len(cont)].unsqueeze(0)  # [1, seq, vocab], as lm-eval slices
            cont_t = torch.tensor(cont, dtype=torch.long, device=lp.device).unsqueeze(0)
            greedy = bool((lp.argmax(dim=-1) == cont_t).all())
            yield i, (float(torch.gather(lp, 2, cont_t.unsqueeze(-1)).squeeze(-1).sum()), greedy)
