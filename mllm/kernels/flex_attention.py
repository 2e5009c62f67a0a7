"""Packed-row attention through FlexAttention, registered as ``model.attention_backend=flex``.

Packed rows become a document/causal ``BlockMask`` built once per forward from the segment ids (cached on the
``AttentionMask`` and shared by all layers), so fully masked 128x128 blocks are skipped instead of computed as
with SDPA's dense mask. Rows without segment ids (the ViT: one tile per row, no mask) go to SDPA, whose fused
flash/cuDNN kernels are the fastest choice when no mask is needed.

On CUDA the kernel is ``torch.compile``-d (FlexAttention is a Triton template and needs Triton); on CPU the
eager implementation runs the forward with the same mask semantics densely, which is what the CPU tests use to
check exactness against the SDPA reference; FlexAttention has no backward on CPU, so training needs CUDA.
"""

from __future__ import annotations

import functools
import inspect
import warnings

import torch
import torch.nn.functional as F

from mllm.kernels.deps import MissingDependencyError, is_available
from mllm.model.attention import AttentionMask, register_attention_backend

try:
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
except ImportError:  # torch < 2.5
    raise MissingDependencyError(
        f"model.attention_backend='flex' needs torch >= 2.5 with FlexAttention (found torch {torch.__version__})"
    ) from None


_CREATE_TAKES_COMPILE = "_compile" in inspect.signature(create_block_mask).parameters


def document_mask_mod(segment_ids: torch.Tensor, causal: bool):
    """mask_mod(b, h, q, kv): same segment (padding id 0 only sees padding, as the SDPA reference) and causal."""

    def same_document(b, h, q_idx, kv_idx):
        return segment_ids[b, q_idx] == segment_ids[b, kv_idx]

    def causal_document(b, h, q_idx, kv_idx):
        return (segment_ids[b, q_idx] == segment_ids[b, kv_idx]) & (q_idx >= kv_idx)

    return causal_document if causal else same_document


def build_block_mask(segment_ids: torch.Tensor, causal: bool, block_size: int = 128) -> BlockMask:
    """The BlockMask for packed rows ``segment_ids`` [B, S] on their device (heads broadcast)."""
    b, s = segment_ids.shape
    mask_mod = document_mask_mod(segment_ids, causal)
    # On CUDA the mask is built by a compiled kernel (the eager build evaluates all S x S pairs in Python-level
    # vmap chunks: tens of ms at 8k tokens, once per forward).
    extra = {"_compile": True} if segment_ids.is_cuda and _CREATE_TAKES_COMPILE else {}
    return create_block_mask(
        mask_mod, b, None, s, s, device=segment_ids.device, BLOCK_SIZE=block_size, **extra
    )


def block_mask_for(mask: AttentionMask, device: torch.device) -> BlockMask:
    """The (cached) BlockMask of ``mask``; built once per forward and shared by all layers."""
    key = ("flex_block_mask", str(device))
    if key not in mask._cache:
        mask._cache[key] = build_block_mask(mask.segment_ids.to(device), mask.causal)
    return mask._cache[key]


@functools.cache
def _compiled_flex_attention():
    if not is_available("triton"):
        raise MissingDependencyError(
            "model.attention_backend='flex' on CUDA needs the 'triton' package (shipped with torch's CUDA "
            "wheels), which is not installed: pip install triton"
        )
    return torch.compile(flex_attention, dynamic=False)


def _eager_flex_attention(*args, **kwargs) -> torch.Tensor:
    # The eager path is the dense reference implementation; torch warns that it is slow, which on CPU is known.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return flex_attention(*args, **kwargs)


def flex_attention_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
) -> torch.Tensor:
    """bshd in, bshd out; GQA handled by the kernel (no repeated kv heads)."""
    gqa = k.shape[2] != q.shape[2]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if mask.segment_ids is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, scale=scale, enable_gqa=gqa)
        return out.transpose(1, 2)
    if not q.is_cuda and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        raise RuntimeError(
            "model.attention_backend='flex' has no backward pass on CPU (FlexAttention trains on CUDA): "
            "use 'auto' or 'sdpa' to train on this device"
        )
    block_mask = block_mask_for(mask, q.device)
    if torch.compiler.is_compiling():
        kernel = flex_attention  # inside a compiled block (compile_blocks): part of that graph
    else:
        kernel = _compiled_flex_attention() if q.is_cuda else _eager_flex_attention
    out = kernel(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2)


register_attention_backend("flex", flex_attention_kernel)
