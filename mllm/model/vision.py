"""InternViT for one device: patch + class + position embeddings, pre-norm blocks with layer scale.

Linear layers are separate named modules (q_proj, k_proj, v_proj, proj, fc1, fc2) so tensor parallelism can be
applied from ``parallel/`` without touching this file. Attention infers the local head count from the width of
q, so the same code runs on tensor-parallel shards (including zero-padded dummy heads).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mllm.model.attention import AttentionMask, CoreAttention
from mllm.model.config import VisionConfig
from mllm.model.norms import RMSNorm, build_norm


class DropPath(nn.Module):
    """Stochastic depth per sample (per tile), as timm's DropPath."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patch_size = cfg.patch_size
        self.grid = cfg.image_size // cfg.patch_size
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.hidden_size))

    def _patch_positions(self, height: int, width: int) -> torch.Tensor:
        pos = self.position_embedding[:, 1:]
        if (height, width) == (self.grid, self.grid):
            return pos
        # Other image sizes: bicubic interpolation in fp32, as InternViT does.
        dim = pos.shape[-1]
        grid = pos.float().reshape(1, self.grid, self.grid, dim).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, height * width, dim).to(pos.dtype)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        patches = self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))
        height, width = patches.shape[-2:]
        # The residual stream is in the parameters' dtype (fp32 master weights under autocast, as in the LLM):
        # the conv's autocast output (bf16) is cast up here, so every block sees one dtype (the layer scales
        # would promote it after the first block otherwise) and each compiled block has one graph.
        patches = patches.flatten(2).transpose(1, 2).to(self.position_embedding.dtype)
        cls = self.class_embedding.expand(patches.shape[0], -1, -1).to(patches.dtype)
        pos = torch.cat([self.position_embedding[:, :1], self._patch_positions(height, width)], dim=1)
        return torch.cat([cls, patches], dim=1) + pos.to(patches.dtype)


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.head_dim = cfg.head_dim
        width = cfg.hidden_size
        self.q_proj = nn.Linear(width, width, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(width, width, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(width, width, bias=cfg.qkv_bias)
        # QK-norm spans the whole projection width (all heads jointly), not one head.
        self.q_norm = RMSNorm(width, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(width, cfg.norm_eps) if cfg.qk_norm else nn.Identity()
        self.proj = nn.Linear(width, width, bias=True)
        self.core_attention = CoreAttention(attention_backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x)).view(b, s, -1, self.head_dim)
        k = self.k_norm(self.k_proj(x)).view(b, s, -1, self.head_dim)
        v = self.v_proj(x).view(b, s, -1, self.head_dim)
        out = self.core_attention(q, k, v, AttentionMask(causal=False), self.head_dim**-0.5)
        return self.proj(out.reshape(b, s, -1))


class VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionBlock(nn.Module):
    """x = x + drop_path(ls1 * attn(norm1(x))); x = x + drop_path(ls2 * mlp(norm2(x)))."""

    def __init__(self, cfg: VisionConfig, drop_path: float, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.norm1 = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.attn = VisionAttention(cfg, attention_backend)
        self.ls1 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
        self.norm2 = build_norm(cfg.norm_type, cfg.hidden_size, cfg.norm_eps)
        self.mlp = VisionMLP(cfg)
        self.ls2 = nn.Parameter(torch.full((cfg.hidden_size,), cfg.layer_scale_init))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)) * self.ls1)
        return x + self.drop_path(self.mlp(self.norm2(x)) * self.ls2)


class InternViT(nn.Module):
    """Returns the hidden state selected by ``select_layer`` (no final norm), CLS token included."""

    def __init__(self, cfg: VisionConfig, select_layer: int = -1, attention_backend: str = "sdpa") -> None:
        super().__init__()
        self.cfg = cfg
        self.embeddings = VisionEmbeddings(cfg)
        # Drop path rises linearly from 0 at the first layer to drop_path_rate at the last.
        n = cfg.num_layers
        rates = [cfg.drop_path_rate * i / (n - 1) if n > 1 else 0.0 for i in range(n)]
        self.layers = nn.ModuleList(VisionBlock(cfg, rate, attention_backend) for rate in rates)
        # hidden_states[k] is the output of k layers (0 = embeddings); negative k counts from the end.
        self.num_layers_run = select_layer if select_layer >= 0 else cfg.num_layers + 1 + select_layer

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = self.embeddings(pixel_values)
        for layer in self.layers[: self.num_layers_run]:
            x = layer(x)
        return x
