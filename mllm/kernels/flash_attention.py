"""Packed-row attention through flash-attn's ``flash_attn_varlen_func``; ``model.attention_backend=flash``.

Importing this module (which choosing the backend does) fails with a one-line error when flash-attn is missing.
The cu_seqlens bookkeeping lives in ``mllm.kernels.varlen`` (shared with the TE backend, tested on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from mllm.kernels.deps import require
from mllm.kernels.varlen import VarlenFn, packed_varlen_attention
from mllm.model.attention import AttentionMask, register_attention_backend


def _flash_attn_varlen() -> VarlenFn:
    module = require(
        "flash_attn",
        "flash-attn",
        "model.attention_backend='flash'",
        hint="flash-attn builds from source: pip install flash-attn --no-build-isolation",
    )
    return module.flash_attn_varlen_func


def flash_attention_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
) -> torch.Tensor:
    """flash-attn for packed rows on CUDA; unmasked rows (the ViT) use SDPA's fused kernels."""
    if not q.is_cuda:
        raise RuntimeError(
            "model.attention_backend='flash' runs on CUDA only; use 'auto' (or 'sdpa'/'flex') on this device"
        )
    if mask.segment_ids is None:
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        gqa = k.shape[2] != q.shape[2]
        return F.scaled_dot_product_attention(
            qt, kt, vt, is_causal=mask.causal, scale=scale, enable_gqa=gqa
        ).transpose(1, 2)
    return packed_varlen_attention(q, k, v, mask, scale, _FLASH_VARLEN)


# Fail at import (i.e. when the backend is chosen) with a one-line error if flash-attn is missing.
_FLASH_VARLEN = _flash_attn_varlen()
register_attention_backend("flash", flash_attention_kernel)
