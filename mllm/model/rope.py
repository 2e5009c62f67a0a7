"""Rotary position embedding (rotate-half), with linear and dynamic-NTK scaling as InternLM2 and Llama use."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin for given position ids, computed in fp32 and cast to the activations' dtype (as transformers)."""

    def __init__(
        self,
        head_dim: int,
        theta: float,
        scaling: dict | None = None,
        max_position_embeddings: int = 32768,
    ) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta
        self.max_position_embeddings = max_position_embeddings
        scaling = dict(scaling or {})
        self.scaling_type = scaling.get("type", scaling.get("rope_type", "default"))
        self.factor = float(scaling.get("factor", 1.0))
        if self.scaling_type not in ("default", "linear", "dynamic"):
            raise ValueError(
                f"model.text.rope_scaling type {self.scaling_type!r} is not supported: use 'linear' or 'dynamic'"
            )

    def inv_freq(self, seq_len: int, device: torch.device) -> torch.Tensor:
        base = self.theta
        if self.scaling_type == "dynamic" and seq_len > self.max_position_embeddings:
            # Dynamic NTK: enlarge the base once the context exceeds the trained length.
            ratio = self.factor * seq_len / self.max_position_embeddings - (self.factor - 1)
            base = base * ratio ** (self.head_dim / (self.head_dim - 2))
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float() / self.head_dim
        return 1.0 / (base**exponent)

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """position_ids [B, S] -> (cos, sin) each [B, S, head_dim]."""
        seq_len = 0
        if self.scaling_type == "dynamic" and position_ids.numel():
            # Only dynamic NTK depends on the context length; reading it syncs with the device.
            seq_len = int(position_ids.max()) + 1
        inv_freq = self.inv_freq(seq_len, position_ids.device)
        pos = position_ids.float()
        if self.scaling_type == "linear":
            pos = pos / self.factor
        freqs = pos[..., None] * inv_freq
        emb = torch.cat([freqs, freqs], dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, D]; cos/sin [B, S, D]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return x * cos + rotate_half(x) * sin
