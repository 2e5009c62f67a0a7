"""Sequence parallelism in InternViT: the flattened tile-token dimension split over tp between GEMMs.

Between the layers' GEMMs (norms, layer scales, residual adds) every tp rank holds a contiguous chunk of the
micro-batch's tile tokens, flattened to [1, tiles * tokens_per_tile, width] and zero-padded to a multiple of
tp (1025 tokens per 448 px tile is odd, so tp rarely divides them). The column-parallel q/k/v and fc1 all-gather
the chunks first, the row-parallel proj and fc2 reduce-scatter after (Megatron's sequence parallelism, here
over tiles). Attention, QK-norm and the zero dummy heads see the gathered tokens exactly as without it; padded
tokens never enter attention and their outputs are dropped, so they never reach a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllm.model.attention import AttentionMask
from mllm.model.vision import VisionAttention
from parallel.comm import gather_to_replicated, scatter_to_sequence_parallel
from parallel.layers import TPInfo
from parallel.shard import pad_to


class SequenceParallelVisionAttention(nn.Module):
    """InternViT attention on a token chunk: q/k/v gather the chunks, proj scatters them back. Holds the
    tensor-parallel submodules of ``attn`` under the same names (checkpoints keep single-device names)."""

    def __init__(self, attn: VisionAttention, tokens_per_tile: int) -> None:
        super().__init__()
        self.head_dim, self.tokens_per_tile = attn.head_dim, tokens_per_tile
        self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        self.q_norm, self.k_norm = attn.q_norm, attn.k_norm
        self.proj, self.core_attention = attn.proj, attn.core_attention

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.q_proj(x)  # [1, padded tokens, local width]: all-gathered inside
        padded = q.shape[1]
        tiles = padded // self.tokens_per_tile  # padding < tp <= tokens per tile
        real = tiles * self.tokens_per_tile

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t[0, :real].view(tiles, self.tokens_per_tile, -1, self.head_dim)

        q = heads(self.q_norm(q))
        k = heads(self.k_norm(self.k_proj(x)))
        v = heads(self.v_proj(x))
        out = self.core_attention(q, k, v, AttentionMask(causal=False), self.head_dim**-0.5)
        out = F.pad(out.reshape(1, real, -1), (0, 0, 0, padded - real))
        return self.proj(out)


def enter_vision_sequence_parallel(feats: torch.Tensor, tp: TPInfo) -> torch.Tensor:
    """[tiles, tokens, width] (replicated) -> this rank's chunk of the flattened, padded tokens."""
    tiles, tokens, width = feats.shape
    flat = feats.reshape(1, tiles * tokens, width)
    flat = F.pad(flat, (0, 0, 0, pad_to(tiles * tokens, tp.size) - tiles * tokens))
    return scatter_to_sequence_parallel(flat, tp.group, dim=1)


def leave_vision_sequence_parallel(chunk: torch.Tensor, tokens_per_tile: int, tp: TPInfo) -> torch.Tensor:
    """This rank's chunk -> [tiles, tokens, width], replicated (the projector runs replicated over tp)."""
    flat = gather_to_replicated(chunk, tp.group, dim=1)
    tiles = flat.shape[1] // tokens_per_tile
    return flat[0, : tiles * tokens_per_tile].view(tiles, tokens_per_tile, -1)


def apply_vision_sequence_parallel(
    vision: nn.Module, tokens_per_tile: int, prefix: str = "vision"
) -> set[str]:
    """Swap each (already tensor-parallel) block's attention for the chunked one; returns the parameters that
    live in the sequence-parallel region (norms, layer scales, row-parallel biases): their gradients are
    partial sums over tp."""
    sp_params: set[str] = set()
    for i, block in enumerate(vision.layers):
        block.attn = SequenceParallelVisionAttention(block.attn, tokens_per_tile)
        p = f"{prefix}.layers.{i}"
        for norm in ("norm1", "norm2"):
            sp_params |= {f"{p}.{norm}.{n}" for n, _ in getattr(block, norm).named_parameters()}
        sp_params |= {f"{p}.ls1", f"{p}.ls2", f"{p}.attn.proj.bias", f"{p}.mlp.fc2.bias"}
    return sp_params
