"""A Llama-family decoder (InternLM2, Llama, Qwen2, Qwen3 share it): RMSNorm, RoPE, GQA, SwiGLU; Qwen3 adds a
per-head RMSNorm on q and k before RoPE (``TextConfig.qk_norm``) and may set ``head_dim`` apart from the width.

Module names follow transformers' Llama so checkpoints map one to one; InternLM2's fused ``wqkv`` is split on
import (``mllm.convert``). Attention infers local head counts from tensor widths so tensor-parallel shards run
the same code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllm.model.attention import AttentionMask, CoreAttention
from mllm.model.config import TextConfig
from mllm.model.norms import RMSNorm
from mllm.model.rope import apply_rotary


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.head_dim = cfg.resolved_head_dim
        q_width, kv_width = cfg.num_heads * self.head_dim, cfg.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_width, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_width, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_width, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q_width, cfg.hidden_size, bias=cfg.o_bias)
        add_head_norms(self, cfg)
        self.core_attention = CoreAttention(attention_backend)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask
    ) -> torch.Tensor:
        b, s, _ = x.shape
        return self.o_proj(attend(self, self.q_proj(x), x, rope, mask).reshape(b, s, -1))


def add_head_norms(attn: nn.Module, cfg: TextConfig) -> None:
    """Qwen3's per-head q/k RMSNorm (``q_norm``, ``k_norm``), or ``None`` for the other architectures."""
    attn.q_norm = RMSNorm(attn.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
    attn.k_norm = RMSNorm(attn.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None


def attend(
    attn: nn.Module,
    q: torch.Tensor,
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask: AttentionMask,
) -> torch.Tensor:
    """Heads of ``attn`` (any count: tensor-parallel shards run this too) from the projected ``q`` [B, S, H*D]
    and the layer input ``x``: optional head norms, RoPE, the attention kernel. Returns [B, S, H, D]."""
    b, s = q.shape[:2]
    cos, sin = rope
    q = q.view(b, s, -1, attn.head_dim)
    k = attn.k_proj(x).view(b, s, -1, attn.head_dim)
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    v = attn.v_proj(x).view(b, s, -1, attn.head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    return attn.core_attention(q, k, v, mask, attn.head_dim**-0.5)


class SwiGLU(nn.Module):
    def __init__(self, cfg: TextConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, attention_backend)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask: AttentionMask
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, mask)
        return x + self.mlp(self.post_attention_layernorm(x))
