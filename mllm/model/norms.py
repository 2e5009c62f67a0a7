"""Normalization layers, computed in fp32 like InternVL and transformers do."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """y = w * x / sqrt(mean(x^2) + eps), statistics in fp32, weight applied in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def build_norm(norm_type: str, dim: int, eps: float) -> nn.Module:
    """The ViT's pre-norm: RMSNorm (InternViT-6B) or LayerNorm with bias (InternViT-300M)."""
    if norm_type == "rms_norm":
        return RMSNorm(dim, eps)
    if norm_type == "layer_norm":
        return nn.LayerNorm(dim, eps=eps)
    raise ValueError(f"unknown norm_type {norm_type!r}: expected 'rms_norm' or 'layer_norm'")
