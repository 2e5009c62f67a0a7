"""A FAKE ``transformer_engine.pytorch`` for NAMING AND SHAPE tests only.

It mimics the documented parameter names, local shapes and call signatures of TE's ``Linear``,
``LayerNormMLP`` and ``DotProductAttention`` (with plain torch math at tp=1) so that CPU tests can check that the
TE backend keeps the torch backend's state-dict keys and local shards, and that our glue (THD reshapes,
cu_seqlens, fc1 = [gate; up]) feeds the right tensors to the right place. It proves nothing about TE itself:
the real check is ``bench/te_parity.py`` on a machine with Transformer Engine.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from mllm.kernels.varlen import reference_varlen_attention


class _ExtraState(nn.Module):
    # TE modules store FP8 metadata through get_extra_state -> "<prefix>_extra_state" in state dicts.
    def get_extra_state(self):
        return torch.zeros(1)

    def set_extra_state(self, state) -> None:
        pass


class FP8GlobalStateManager:
    """TE's FP8 state (``transformer_engine.pytorch.fp8``); tests flip ``FP8_ENABLED`` to mimic ``autocast``."""

    FP8_ENABLED = False

    @classmethod
    def is_fp8_enabled(cls) -> bool:
        return cls.FP8_ENABLED


class Linear(_ExtraState):
    def __init__(self, in_features, out_features, bias=True, parallel_mode=None, tp_group=None, tp_size=1,
                 sequence_parallel=False, device="cuda", **kwargs):  # fmt: skip
        super().__init__()
        self.tp_size, self.sequence_parallel = tp_size, sequence_parallel
        if parallel_mode == "column":
            out_features //= tp_size
        elif parallel_mode == "row":
            in_features //= tp_size
        self.parallel_mode = parallel_mode
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device))
        bias_size = out_features
        self.bias = nn.Parameter(torch.zeros(bias_size, device=device)) if bias else None

    def forward(self, x):
        if FP8GlobalStateManager.FP8_ENABLED and (x.numel() // x.shape[-1]) % 16:
            # TE's own check: FP8 GEMMs need the flattened row count divisible by 8/16.
            raise AssertionError(
                f"FP8 execution requires rows divisible by 16, got {x.numel() // x.shape[-1]}"
            )
        y = F.linear(x, self.weight, self.bias)
        # Sequence parallelism in one process, standing for tp ranks with identical inputs (no bias in row mode):
        # column = all-gather of the rows along dim 0, row = reduce-scatter (rank 0's chunk of the sum).
        if self.sequence_parallel and self.parallel_mode == "column":
            y = torch.cat([y] * self.tp_size)
        elif self.sequence_parallel and self.parallel_mode == "row":
            y = self.tp_size * y.reshape(self.tp_size, -1, *y.shape[1:])[0]
        return y


class LayerNormMLP(_ExtraState):
    def __init__(self, hidden_size, ffn_hidden_size, eps=1e-5, bias=True, normalization="LayerNorm",
                 activation="gelu", set_parallel_mode=False, tp_group=None, tp_size=1, sequence_parallel=False,
                 device="cuda", **kwargs):  # fmt: skip
        super().__init__()
        assert normalization == "RMSNorm" and activation == "swiglu" and not bias
        self.eps = eps
        local = ffn_hidden_size // tp_size if set_parallel_mode else ffn_hidden_size
        self.layer_norm_weight = nn.Parameter(torch.ones(hidden_size, device=device))
        self.fc1_weight = nn.Parameter(torch.empty(2 * local, hidden_size, device=device))
        self.fc2_weight = nn.Parameter(torch.empty(hidden_size, local, device=device))

    def forward(self, x):
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        gate, up = F.linear(self.layer_norm_weight * normed, self.fc1_weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.fc2_weight)  # TE's swiglu: silu(first half) * second half


class DotProductAttention(_ExtraState):
    def __init__(self, num_attention_heads, kv_channels, num_gqa_groups=None, attention_dropout=0.0,
                 qkv_format="sbhd", attn_mask_type="causal", softmax_scale=None, **kwargs):  # fmt: skip
        super().__init__()
        self.qkv_format, self.attn_mask_type, self.scale = qkv_format, attn_mask_type, softmax_scale

    def forward(self, q, k, v, cu_seqlens_q=None, cu_seqlens_kv=None, max_seqlen_q=None, max_seqlen_kv=None):
        causal = "causal" in self.attn_mask_type
        if self.qkv_format == "thd":
            out = reference_varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_kv, max_seqlen_q, max_seqlen_kv,
                                             self.scale, causal)  # fmt: skip
            return out.flatten(-2)
        assert self.qkv_format == "bshd"
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=self.scale, enable_gqa=True)
        return out.transpose(1, 2).flatten(-2)


def install(monkeypatch) -> types.ModuleType:
    """Put the fake under ``transformer_engine.pytorch`` in sys.modules for one test."""
    root = types.ModuleType("transformer_engine")
    pytorch = types.ModuleType("transformer_engine.pytorch")
    pytorch.Linear, pytorch.LayerNormMLP, pytorch.DotProductAttention = (
        Linear,
        LayerNormMLP,
        DotProductAttention,
    )
    pytorch.fp8 = types.SimpleNamespace(FP8GlobalStateManager=FP8GlobalStateManager)
    root.pytorch = pytorch
    monkeypatch.setitem(__import__("sys").modules, "transformer_engine", root)
    monkeypatch.setitem(__import__("sys").modules, "transformer_engine.pytorch", pytorch)
    return pytorch
