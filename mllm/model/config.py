"""Typed model configuration: InternViT + pixel-shuffle projector + Llama-family LLM.

Plain dataclasses so they can be registered with Hydra's ConfigStore (see ``mllm.config``) and built without
Hydra in tests. Presets for the released models live in ``recipes/model/*.yaml`` and in ``PRESETS`` below.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mllm.model.lora import LoraConfig


@dataclass
class VisionConfig:
    """InternViT. Defaults are InternViT-6B-448px-V1-5 (45 of 48 layers kept)."""

    hidden_size: int = 3200
    num_layers: int = 45
    num_heads: int = 25
    intermediate_size: int = 12800
    image_size: int = 448
    patch_size: int = 14
    num_channels: int = 3
    norm_type: str = "rms_norm"  # "rms_norm" (6B) or "layer_norm" (300M)
    norm_eps: float = 1e-6
    qkv_bias: bool = False
    qk_norm: bool = True  # RMSNorm over the whole q (and k) width, all heads jointly
    layer_scale_init: float = 0.1
    drop_path_rate: float = 0.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class TextConfig:
    """A Llama-family decoder as InternLM2, Llama, Qwen2 and Qwen3 use it. Defaults are InternLM2-20B-chat."""

    arch: str = "internlm2"  # "internlm2" | "llama" | "qwen2" | "qwen3": only changes the checkpoint layout
    vocab_size: int = 92553
    hidden_size: int = 6144
    num_layers: int = 48
    num_heads: int = 48
    num_kv_heads: int = 8
    head_dim: int | None = None  # None: hidden_size // num_heads
    intermediate_size: int = 16384
    rms_norm_eps: float = 1e-5
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None  # {"type": "dynamic"|"linear", "factor": f}; copied verbatim
    max_position_embeddings: int = 32768
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over each head's q and k (weight [head_dim], shared by heads)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads


@dataclass
class ModelConfig:
    """The whole InternVL-Chat model."""

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    downsample_ratio: float = 0.5
    ps_version: str = "v2"  # "v1" skips the final transpose of the pixel shuffle (older checkpoints)
    select_layer: int = -1  # -1: last ViT layer; k >= 0: hidden_states[k] with 0 = embeddings
    projector_norm_eps: float = 1e-5
    image_token_id: int = 92546  # <IMG_CONTEXT>
    template: str = "internlm2-chat"
    attention_backend: str = "sdpa"  # "sdpa" | "flex" | "flash" | "auto" (see mllm.model.attention)
    init_std: float = 0.02
    init_from: str | None = None  # an HF directory (either format) to load weights from
    # LoRA adapters (InternVL's use_backbone_lora / use_llm_lora); a run sets them with the top-level ``lora``.
    lora: LoraConfig = field(default_factory=LoraConfig)
    # Hugging Face config.json fields with no ModelConfig counterpart, per HF format ("internvl_chat" or
    # "transformers"), kept so that an import -> train -> export round trip loses nothing (mllm.convert).
    hf_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_image_token(self) -> int:
        """LLM tokens per tile: (patches per side * downsample)^2, 256 for 448 px tiles."""
        side = self.vision.image_size // self.vision.patch_size
        return int(side * self.downsample_ratio) ** 2

    def validate(self) -> None:
        """Raise a one-line error for an inconsistent configuration."""
        v, t = self.vision, self.text
        if v.hidden_size % v.num_heads:
            raise ValueError(
                f"model.vision.hidden_size {v.hidden_size} must be divisible by num_heads {v.num_heads}"
            )
        if v.image_size % v.patch_size:
            raise ValueError(
                f"model.vision.image_size {v.image_size} must be a multiple of patch_size {v.patch_size}"
            )
        side = v.image_size // v.patch_size
        if side * self.downsample_ratio != int(side * self.downsample_ratio):
            raise ValueError(
                f"model.downsample_ratio {self.downsample_ratio} does not divide {side} patches per side"
            )
        if t.num_heads % t.num_kv_heads:
            raise ValueError(
                f"model.text.num_heads {t.num_heads} must be a multiple of num_kv_heads {t.num_kv_heads}"
            )
        if self.ps_version not in ("v1", "v2"):
            raise ValueError(f"model.ps_version must be 'v1' or 'v2', got {self.ps_version!r}")
        if v.norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(
                f"model.vision.norm_type must be 'rms_norm' or 'layer_norm', got {v.norm_type!r}"
            )
        self.lora.validate()
        if not -(v.num_layers + 1) <= self.select_layer <= v.num_layers:
            raise ValueError(
                f"model.select_layer {self.select_layer} out of range for {v.num_layers} ViT layers"
            )


def internvl_chat_v1_5() -> ModelConfig:
    """InternVL-Chat-V1-5: InternViT-6B-448px-V1-5 + InternLM2-20B-chat (25.5B)."""
    return ModelConfig(
        text=TextConfig(rope_scaling={"type": "dynamic", "factor": 2.0}),
        attention_backend="auto",  # flash-attn / FlexAttention on GPUs, SDPA on CPU
    )


def mini_internvl_chat_2b_v1_5() -> ModelConfig:
    """Mini-InternVL-Chat-2B-V1-5: InternViT-300M-448px + InternLM2-chat-1.8B."""
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=1024,
            num_layers=24,
            num_heads=16,
            intermediate_size=4096,
            norm_type="layer_norm",
            qkv_bias=True,
            qk_norm=False,
        ),
        text=TextConfig(
            vocab_size=92553,
            hidden_size=2048,
            num_layers=24,
            num_heads=16,
            num_kv_heads=8,
            intermediate_size=8192,
            rope_theta=1_000_000.0,
            rope_scaling={"type": "dynamic", "factor": 2.0},
        ),
        attention_backend="auto",
    )


def tiny(vocab_size: int = 1024, image_token_id: int = 1000, image_size: int = 56) -> ModelConfig:
    """A few-kB model for CPU tests: 6B-style vision (RMSNorm + QK-norm, odd head count), GQA text."""
    return ModelConfig(
        vision=VisionConfig(
            hidden_size=48,
            num_layers=2,
            num_heads=3,
            intermediate_size=96,
            image_size=image_size,
            patch_size=14,
        ),
        text=TextConfig(
            arch="internlm2",
            vocab_size=vocab_size,
            hidden_size=64,
            num_layers=4,
            num_heads=4,
            num_kv_heads=2,
            intermediate_size=128,
            rope_theta=10000.0,
            max_position_embeddings=4096,
        ),
        image_token_id=image_token_id,
    )


# -- InternVL 2.5 / 3 / 3.5 (dense) ---------------------------------------------------------------------------
# Sources: each model's config.json on huggingface.co (OpenGVLab/InternVL2_5-8B, InternVL2_5-78B, InternVL3-8B,
# InternVL3-78B, InternVL3_5-8B) and the pairings in the headers of InternVL's training scripts
# (github.com/OpenGVLab/InternVL internvl_chat/shell/internvl2.5/stage2/*.sh). All five: 448 px tiles,
# downsample 0.5, pixel shuffle v2, last ViT layer, the internvl2_5 template, 256 tokens per tile.
def internvit_300m_448px_v2_5() -> VisionConfig:
    """InternViT-300M-448px-V2_5: 24 layers, 1024 wide, 16 heads, LayerNorm, qkv bias, no QK-norm."""
    return VisionConfig(
        hidden_size=1024,
        num_layers=24,
        num_heads=16,
        intermediate_size=4096,
        norm_type="layer_norm",
        qkv_bias=True,
        qk_norm=False,
    )


def internvit_6b_448px_v2_5() -> VisionConfig:
    """InternViT-6B-448px-V2_5: 45 layers (as V1-5), 3200 wide, 25 heads, RMSNorm, full-width QK-norm."""
    return VisionConfig(
        hidden_size=3200,
        num_layers=45,
        num_heads=25,
        intermediate_size=12800,
        norm_type="rms_norm",
        qk_norm=True,
    )


def _family(vision: VisionConfig, text: TextConfig, image_token_id: int) -> ModelConfig:
    return ModelConfig(
        vision=vision,
        text=text,
        image_token_id=image_token_id,
        template="internvl2_5",
        attention_backend="auto",
    )


_DYNAMIC_2 = {"type": "dynamic", "factor": 2.0}


def _qwen2_5_72b(rope_scaling: dict[str, Any] | None) -> TextConfig:
    """Qwen2.5-72B as InternVL's 78B models carry it (vocabulary resized to 151674 for InternVL's tokens)."""
    return TextConfig(
        arch="qwen2",
        vocab_size=151674,
        hidden_size=8192,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        intermediate_size=29568,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_scaling=rope_scaling,
        max_position_embeddings=32768,
        qkv_bias=True,
    )


def internvl2_5_8b() -> ModelConfig:
    """InternVL2_5-8B: InternViT-300M-448px-V2_5 + internlm2_5-7b-chat."""
    text = TextConfig(
        arch="internlm2",
        vocab_size=92553,
        hidden_size=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=14336,
        rope_scaling=dict(_DYNAMIC_2),
    )
    return _family(internvit_300m_448px_v2_5(), text, 92546)


def internvl3_8b() -> ModelConfig:
    """InternVL3-8B: InternViT-300M-448px-V2_5 + Qwen2.5-7B."""
    text = TextConfig(
        arch="qwen2",
        vocab_size=151674,
        hidden_size=3584,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        intermediate_size=18944,
        rms_norm_eps=1e-6,
        rope_scaling=dict(_DYNAMIC_2),
        qkv_bias=True,
    )
    return _family(internvit_300m_448px_v2_5(), text, 151667)


def internvl3_5_8b() -> ModelConfig:
    """InternVL3_5-8B (dense): InternViT-300M-448px-V2_5 + Qwen3-8B (per-head q/k norms, head_dim 128)."""
    text = TextConfig(
        arch="qwen3",
        vocab_size=151936,
        hidden_size=4096,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        intermediate_size=12288,
        rms_norm_eps=1e-6,
        max_position_embeddings=40960,
        qk_norm=True,
    )
    return _family(internvit_300m_448px_v2_5(), text, 151671)  # Qwen3 owns 151665..151668 already


def internvl2_5_78b() -> ModelConfig:
    """InternVL2_5-78B: InternViT-6B-448px-V2_5 + Qwen2.5-72B-Instruct (rope as Qwen2.5-72B: no scaling)."""
    return _family(internvit_6b_448px_v2_5(), _qwen2_5_72b(None), 151667)


def internvl3_78b() -> ModelConfig:
    """InternVL3-78B: InternViT-6B-448px-V2_5 + Qwen2.5-72B (dynamic NTK rope, factor 2)."""
    return _family(internvit_6b_448px_v2_5(), _qwen2_5_72b(dict(_DYNAMIC_2)), 151667)


def tiny_twin(preset: str) -> ModelConfig:
    """A few-kB model with the structure of ``preset`` (ViT norm/bias/QK-norm, text architecture, Qwen3's
    norms, a head_dim apart from the width where the preset has one, template, pixel shuffle): for CPU tests."""
    big = PRESETS[preset]()
    cfg = tiny()
    v, t = cfg.vision, cfg.text
    v.norm_type, v.qkv_bias, v.qk_norm = big.vision.norm_type, big.vision.qkv_bias, big.vision.qk_norm
    v.num_heads = 3 if big.vision.num_heads % 2 else 4  # 25 heads: uneven over tp 2 too
    t.arch, t.qkv_bias, t.o_bias, t.qk_norm = (
        big.text.arch,
        big.text.qkv_bias,
        big.text.o_bias,
        big.text.qk_norm,
    )
    t.head_dim = 24 if big.text.head_dim else None  # 4 x 24 != 64 like 32 x 128 != 4096
    t.rope_scaling = dict(big.text.rope_scaling) if big.text.rope_scaling else None
    cfg.template, cfg.ps_version = big.template, big.ps_version
    return cfg


PRESETS = {
    "internvl_chat_v1_5": internvl_chat_v1_5,
    "mini_internvl_chat_2b_v1_5": mini_internvl_chat_2b_v1_5,
    "internvl2_5_8b": internvl2_5_8b,
    "internvl3_8b": internvl3_8b,
    "internvl3_5_8b": internvl3_5_8b,
    "internvl2_5_78b": internvl2_5_78b,
    "internvl3_78b": internvl3_78b,
    "tiny": tiny,
}
VISION_PRESETS = {
    "internvit_300m_448px_v2_5": internvit_300m_448px_v2_5,
    "internvit_6b_448px_v2_5": internvit_6b_448px_v2_5,
}
