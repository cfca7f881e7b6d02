"""Variable-length attention for padding-free rows without a flash kernel: one SDPA per example.

A padding-free row concatenates a micro-batch's examples (``collate_flat``). With sdpa or eager
attention, transformers keeps the examples apart with a block-diagonal causal mask built from
the position resets: correct, but the kernel then computes attention over the whole N x N row
(the mask only zeroes the blocks between examples), so the attention FLOPs of a row of n
examples of length L are n times those of the examples alone. On a CPU, where no varlen flash
kernel exists, that is most of what padding-free rows lose against padded length-grouped
batches (measured: ``benchmarks/throughput.py``).

:data:`SEGMENT_ATTN` is an attention implementation registered with transformers'
``AttentionInterface`` that, given the example boundaries of the row (``fk_segments``: the
cumulative lengths as a tuple of ints, a keyword argument of the model's forward that
transformers passes down to every attention call), runs transformers' own
``sdpa_attention_forward`` once per example with ``is_causal=True`` and no mask, and
concatenates the outputs: the same attention as the block-diagonal mask (each example attends to
its own earlier positions only), at the FLOPs of the examples alone. Without ``fk_segments``
(padded batches: evaluation, validation, anything else) it is exactly transformers' sdpa with
sdpa's mask (the mask function registered for the name is ``sdpa_mask``). Layers with a
sliding window (sdpa enforces it through the mask) raise ``ValueError`` with segments, so the
training loop's probe falls back to the block-diagonal mask for such models.

The training loop switches a model whose implementation is ``sdpa`` to it for padding-free runs
only after a probe proves the boundaries are kept (``forgetkit.train.loop.padding_free_setup``).
"""

from __future__ import annotations

from typing import Any

import torch

SEGMENT_ATTN = "forgetkit_sdpa_segments"
_registered = False


def segment_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                           value: torch.Tensor, attention_mask: torch.Tensor | None,
                           dropout: float = 0.0, scaling: float | None = None,
                           fk_segments: tuple[int, ...] | None = None,
                           **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature: ``query`` (1, H, N, D), ``key``/``value``
    (1, H_kv, N, D); returns (1, N, H, D). ``fk_segments`` = (0, n_1, n_1 + n_2, ..., N)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if fk_segments is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      dropout=dropout, scaling=scaling, **kwargs)
    if kwargs.get("sliding_window") is not None:  # sdpa enforces windows through its mask
        raise ValueError("fk_segments: this layer has a sliding window; segments keep only the "
                         "causal mask")
    if query.shape[0] != 1 or fk_segments[-1] != query.shape[2] or fk_segments[0] != 0:
        raise ValueError(f"fk_segments {fk_segments[:3]}...{fk_segments[-1]} do not describe "
                         f"one flat row of {query.shape[2]} positions (batch {query.shape[0]})")
    kwargs.pop("is_causal", None)
    outs = [sdpa_attention_forward(module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b],
                                   None, dropout=dropout, scaling=scaling, is_causal=True,
                                   **kwargs)[0]
            for a, b in zip(fk_segments[:-1], fk_segments[1:], strict=True) if b > a]
    return (outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)), None


def register() -> str:
    """Register :data:`SEGMENT_ATTN` with transformers (attention and mask functions); once."""
    global _registered
    if not _registered:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(SEGMENT_ATTN, segment_sdpa_attention)
        AttentionMaskInterface.register(SEGMENT_ATTN, sdpa_mask)
        _registered = True
    return SEGMENT_ATTN
