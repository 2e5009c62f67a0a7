"""Model FLOPs of an InternVL training step (ViT + projector + LLM), for throughput and MFU.

The counting follows Megatron-LM's ``num_floating_point_operations`` (megatron/training/training.py), which is
the formula of Narayanan et al., "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM" (SC'21, appendix), generalised to grouped-query attention and gated MLPs:

    F = 12 * B * s * L * h^2 * [ (1 + g/n + s/h) * (q_width/h) + gate * f/h + V / (2 * L * h) ]

i.e. per token and layer, forward: 2*h*(q + 2*kv) for QKV, 2*q*h for the output projection, 2*2*s*q for the
QK^T and AV products over the whole sequence, 2*h*f per MLP matrix (3 matrices when gated, ``gate`` = 1.5 in
Megatron's normalisation) and 2*h*V for the logits; the backward pass doubles it (data and weight gradients),
hence the factor 3. Like Megatron, attention scores are counted over the full s x s square (no causal halving)
by default; ``causal_triangle=True`` counts only the s(s+1)/2 query-key pairs a causal kernel has to compute
(what ``bench/gpu_bench.py`` reports, so that MFU does not credit the skipped upper triangle). Embedding lookups, norms and activations are not counted. These are *model* FLOPs: activation
recomputation is not counted and padding tokens are not counted.

Differences from the plain Megatron formula, all because this model is not a plain decoder:
- Packed rows: the attention term uses each packed sample's own length (attention never crosses samples), so
  ``s`` in ``s/h`` is per sample, not the row length.
- InternViT per tile: 1 + (image/patch)^2 tokens, full (non-causal) attention, a 2-matrix GELU MLP, qkv of the
  full width, plus the patch-embedding convolution; pixel shuffle is free, the projector is two GEMMs over
  ``num_image_token`` tokens per tile.
- Frozen parts do no weight-gradient GEMMs: a part costs 3x its forward when trained, 2x (forward + data
  gradient) when frozen but a trained part sits before it in the graph (the gradient must flow through it), and
  1x when nothing before it is trained (forward only, no backward at all). Attention-score products have no
  weights, so they cost 3x whenever a gradient flows.

Reference values (see tests/train/test_flops.py): a 448 px tile through InternViT-6B-448px-V1-5 costs about
35.8 TFLOP trained and 11.9 TFLOP frozen; InternLM2-20B about 145 GFLOP per trained token of an 8k sample.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mllm.model.config import ModelConfig, TextConfig, VisionConfig


@dataclass(frozen=True)
class TrainedParts:
    """Which parts receive weight gradients. The graph order is vision -> projector -> LLM."""

    vision: bool = True
    projector: bool = True
    llm: bool = True
    # LoRA (``model.lora``): the part's base weights are frozen, its adapters need the data gradient through it.
    vision_adapters: bool = False
    llm_adapters: bool = False


@dataclass(frozen=True)
class PartMultipliers:
    """Forward-pass multiples charged to one part: for weight GEMMs and for (weightless) attention products."""

    gemm: int
    attention: int


def part_multipliers(trained: bool, grad_flows_in: bool) -> PartMultipliers:
    """3x when trained; 2x GEMMs / 3x attention when only a data gradient passes through; 1x forward only."""
    if trained:
        return PartMultipliers(3, 3)
    if grad_flows_in:
        return PartMultipliers(2, 3)
    return PartMultipliers(1, 1)


def multipliers_for(parts: TrainedParts) -> dict[str, PartMultipliers]:
    """Per-part multipliers. A frozen part still runs a backward pass when a part *before* it in the graph is
    trained, because that part's gradient has to flow through it; a part with LoRA adapters counts as frozen
    with the gradient flowing through it (the adapters' own rank-r GEMMs are not counted)."""
    vision = parts.vision and not parts.vision_adapters
    llm = parts.llm and not parts.llm_adapters
    vision_needs_grad = vision or parts.vision_adapters
    return {
        "vision": part_multipliers(vision, parts.vision_adapters),
        "projector": part_multipliers(parts.projector, vision_needs_grad),
        "llm": part_multipliers(llm, vision_needs_grad or parts.projector or parts.llm_adapters),
    }


# -- forward FLOPs of each part --------------------------------------------------------------------------------
def vision_forward_flops_per_tile(cfg: VisionConfig) -> tuple[float, float]:
    """(GEMM FLOPs, attention-product FLOPs) of one tile through the ViT, forward only."""
    tokens = cfg.num_patches + 1
    h, f = cfg.hidden_size, cfg.intermediate_size
    per_token_layer = 2 * h * 3 * h + 2 * h * h + 2 * 2 * h * f  # qkv, proj, fc1 + fc2
    patch_embed = 2 * cfg.num_patches * (cfg.num_channels * cfg.patch_size**2) * h
    gemm = per_token_layer * tokens * cfg.num_layers + patch_embed
    attention = 2 * 2 * tokens * tokens * h * cfg.num_layers  # QK^T and AV over all tokens of the tile
    return float(gemm), float(attention)


def projector_forward_flops_per_tile(cfg: ModelConfig) -> float:
    """Two GEMMs over the tile's image tokens: 4C_vit -> D, D -> D."""
    in_width = cfg.vision.hidden_size * int(1 / cfg.downsample_ratio) ** 2
    d = cfg.text.hidden_size
    return float(cfg.num_image_token * (2 * in_width * d + 2 * d * d))


def llm_forward_flops(
    cfg: TextConfig, sample_tokens: int, causal_triangle: bool = False
) -> tuple[float, float]:
    """(GEMM FLOPs incl. logits, attention-product FLOPs) of one packed sample through the LLM, forward.

    Attention products over s^2 query-key pairs (Megatron), or s(s+1)/2 with ``causal_triangle``."""
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    q_width = cfg.num_heads * cfg.resolved_head_dim
    kv_width = cfg.num_kv_heads * cfg.resolved_head_dim
    per_token_layer = 2 * h * (q_width + 2 * kv_width) + 2 * q_width * h + 3 * 2 * h * f
    gemm = sample_tokens * (per_token_layer * cfg.num_layers + 2 * h * v)
    pairs = sample_tokens * (sample_tokens + 1) // 2 if causal_triangle else sample_tokens * sample_tokens
    attention = 2 * 2 * pairs * q_width * cfg.num_layers
    return float(gemm), float(attention)


# -- a whole step ----------------------------------------------------------------------------------------------
@dataclass
class StepFlops:
    """Model FLOPs of one optimizer step, by part."""

    vision: float = 0.0
    projector: float = 0.0
    llm: float = 0.0

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.llm

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(self.vision + other.vision, self.projector + other.projector, self.llm + other.llm)


def sample_flops(
    cfg: ModelConfig, n_tokens: int, n_tiles: int, parts: TrainedParts, causal_triangle: bool = False
) -> StepFlops:
    """Training FLOPs of one sample: ``n_tokens`` LLM tokens (image tokens included), ``n_tiles`` ViT tiles."""
    mult = multipliers_for(parts)
    vit_gemm, vit_attn = vision_forward_flops_per_tile(cfg.vision)
    llm_gemm, llm_attn = llm_forward_flops(cfg.text, n_tokens, causal_triangle)
    return StepFlops(
        vision=n_tiles * (mult["vision"].gemm * vit_gemm + mult["vision"].attention * vit_attn),
        projector=n_tiles * mult["projector"].gemm * projector_forward_flops_per_tile(cfg),
        llm=mult["llm"].gemm * llm_gemm + mult["llm"].attention * llm_attn,
    )


def step_flops(
    cfg: ModelConfig,
    samples: Iterable[tuple[int, int]],
    parts: TrainedParts | None = None,
    causal_triangle: bool = False,
) -> StepFlops:
    """FLOPs of a step over ``samples`` = [(n_tokens, n_tiles), ...] (all ranks' samples for the global step).

    Padding is not counted (it is not model work); dummy tiles of text-only samples are counted by passing them
    in ``n_tiles`` (they do run through the ViT). ``causal_triangle``: see ``llm_forward_flops``.
    """
    parts = parts or TrainedParts()
    total = StepFlops()
    for n_tokens, n_tiles in samples:
        total = total + sample_flops(cfg, int(n_tokens), int(n_tiles), parts, causal_triangle)
    return total


def mfu(flops: float, seconds: float, n_devices: int, peak_tflops: float) -> float:
    """Model FLOPs utilisation: achieved FLOP/s per device over the device's peak (0 when unknown)."""
    if seconds <= 0 or n_devices <= 0 or peak_tflops <= 0:
        return 0.0
    return flops / seconds / n_devices / (peak_tflops * 1e12)


def tflops_per_device(flops: float, seconds: float, n_devices: int) -> float:
    """Achieved model TFLOP/s per device."""
    if seconds <= 0 or n_devices <= 0:
        return 0.0
    return flops / seconds / n_devices / 1e12


# Dense bf16 peak TFLOP/s (no sparsity) by device name substring, from the vendors' data sheets.
PEAK_BF16_TFLOPS: dict[str, float] = {
    "H200": 989.0,
    "H100 PCIe": 756.0,  # matched before "H100" (first match wins)
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "A10": 125.0,
}


def peak_tflops_for(device_name: str, override: float = 0.0) -> float:
    """The configured peak, else a data-sheet value matched on the device name, else 0 (MFU reported as 0)."""
    if override > 0:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return value
    return 0.0


def samples_from_lengths(lengths: Sequence[int], tiles: Sequence[int]) -> list[tuple[int, int]]:
    """Pair per-sample token counts with per-sample tile counts (helper for loaders that keep them apart)."""
    if len(lengths) != len(tiles):
        raise ValueError(f"{len(lengths)} sample lengths but {len(tiles)} tile counts")
    return list(zip(lengths, tiles))
