"""Varlen (cu_seqlens) form of packed rows, as flash-attn and Transformer Engine's THD format take it.

A packed row [B, S] with segment ids becomes one varlen batch: every maximal run of equal segment ids (padding
runs included, so padding attends only to padding as in the SDPA reference) is one sequence, described by
``cu_seqlens`` over the flattened B*S tokens. The packer emits each sample as one contiguous run; a segment id
repeated in two separate runs of a row would be treated as two samples. ``cu_seqlens`` and the (host-synced)
max length are computed once per forward and cached on the ``AttentionMask``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mllm.model.attention import AttentionMask

VarlenFn = Callable[..., torch.Tensor]


def cu_seqlens_from_segments(segment_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """segment_ids [B, S] -> (cu_seqlens int32 [n + 1], max_seqlen) over the flattened B*S tokens."""
    b, s = segment_ids.shape
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]  # each row starts a new run as well
    start_index = starts.flatten().nonzero().flatten()
    total = torch.tensor([b * s], device=segment_ids.device, dtype=start_index.dtype)
    cu = torch.cat([start_index, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def varlen_inputs(mask: AttentionMask, device: torch.device) -> tuple[torch.Tensor, int]:
    """(cu_seqlens, max_seqlen) of ``mask``, cached so all layers of one forward share one host sync."""
    key = ("flash_varlen", str(device))
    if key not in mask._cache:
        mask._cache[key] = cu_seqlens_from_segments(mask.segment_ids.to(device))
    return mask._cache[key]


def packed_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: AttentionMask,
    scale: float,
    varlen_fn: VarlenFn,
) -> torch.Tensor:
    """bshd packed rows through a flash-attn-style ``varlen_fn`` ([total, H, D] with cu_seqlens)."""
    b, s, h, d = q.shape
    if mask.segment_ids is None:
        cu = torch.arange(0, (b + 1) * s, s, device=q.device, dtype=torch.int32)
        max_len = s
    else:
        cu, max_len = varlen_inputs(mask, q.device)
    out = varlen_fn(
        q.reshape(b * s, h, d),
        k.reshape(b * s, k.shape[2], d),
        v.reshape(b * s, v.shape[2], d),
        cu_seqlens_q=cu,
        cu_seqlens_k=cu,
        max_seqlen_q=max_len,
        max_seqlen_k=max_len,
        softmax_scale=scale,
        causal=mask.causal,
    )
    return out.reshape(b, s, h, d)


def reference_varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: float,
    causal: bool,
) -> torch.Tensor:
    """flash_attn_varlen_func's contract in plain torch (one SDPA per sequence): for tests and for checking a
    real varlen kernel on a machine that has one. [total, H, D] in and out; GQA by kv-head groups."""
    del max_seqlen_q, max_seqlen_k  # part of the contract, not needed here
    out = torch.empty_like(q)
    bounds = cu_seqlens_q.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        gqa = ks.shape[0] != qs.shape[0]
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=causal, scale=softmax_scale, enable_gqa=gqa
        )
        out[start:end] = o.transpose(0, 1)
    return out
