"""Pixel shuffle (downsample 0.5) and the MLP projector from ViT width to LLM width."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def pixel_shuffle(x: torch.Tensor, scale: float = 0.5, version: str = "v2") -> torch.Tensor:
    """[N, H, W, C] -> [N, H*scale, W*scale, C/scale^2], InternVL's layout.

    v1 omits the final permute and so returns the grid transposed; checkpoints trained with it need it.
    """
    n, w, h, c = x.shape
    x = x.reshape(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.reshape(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version == "v2":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


class Projector(nn.Module):
    """LayerNorm(4C) -> Linear(4C, D) -> GELU -> Linear(D, D); InternVL's ``mlp1.{0,1,3}``."""

    def __init__(
        self, vit_width: int, llm_width: int, downsample_ratio: float = 0.5, eps: float = 1e-5
    ) -> None:
        super().__init__()
        in_width = vit_width * int(1 / downsample_ratio) ** 2
        self.norm = nn.LayerNorm(in_width, eps=eps)
        self.fc1 = nn.Linear(in_width, llm_width)
        self.fc2 = nn.Linear(llm_width, llm_width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(self.norm(x))))


def vit_features_to_tokens(
    features: torch.Tensor, projector: Projector, scale: float = 0.5, version: str = "v2"
) -> torch.Tensor:
    """ViT output [N, 1 + P, C] -> LLM-width image tokens [N, P * scale^2, D] (CLS dropped)."""
    patches = features[:, 1:]
    n, p, c = patches.shape
    side = int(p**0.5)
    grid = pixel_shuffle(patches.reshape(n, side, side, c), scale, version)
    return projector(grid.reshape(n, -1, grid.shape[-1]))
