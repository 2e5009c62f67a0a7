"""FLOP counter against hand-computed values and Megatron's closed-form formula."""

from __future__ import annotations

import pytest

from mllm.model.config import PRESETS
from mllm.train.flops import TrainedParts, mfu, peak_tflops_for, step_flops

CFG_26B = PRESETS["internvl_chat_v1_5"]()


def megatron_llm_flops(
    batch: int, seq: int, layers: int, h: int, heads: int, groups: int, ffn: int, vocab: int
):
    """Megatron-LM ``num_floating_point_operations`` for a SwiGLU GQA decoder (3x forward, full s^2 attention)."""
    return (
        12
        * batch
        * seq
        * layers
        * h
        * h
        * ((1 + groups / heads + seq / h) + 1.5 * ffn / h + vocab / (2 * layers * h))
    )


def test_vit_tile_matches_hand_count_and_reference():
    # Hand count for one 448 px tile through InternViT-6B (45 layers, 1025 tokens, width 3200, MLP 12800):
    # per token and layer 8*3200^2 (qkv + proj) + 4*3200*12800 (fc1 + fc2) GEMM FLOPs, 4*1025*3200 attention;
    # plus the 14x14 patch convolution 2*1024*588*3200.
    per_token_layer = 8 * 3200**2 + 4 * 3200 * 12800 + 4 * 1025 * 3200
    forward = per_token_layer * 1025 * 45 + 2 * 1024 * 588 * 3200
    assert forward == 11_944_693_516_800
    frozen = step_flops(CFG_26B, [(0, 1)], TrainedParts(vision=False, projector=True, llm=True))
    trained = step_flops(CFG_26B, [(0, 1)], TrainedParts(vision=True, projector=True, llm=False))
    assert frozen.vision == forward  # nothing before the ViT: forward only
    assert trained.vision == 3 * forward
    # The InternVL facts sheet: ~35.8 TFLOP trained, ~11.9 frozen.
    assert trained.vision / 1e12 == pytest.approx(35.8, rel=0.005)
    assert frozen.vision / 1e12 == pytest.approx(11.9, rel=0.005)


def test_llm_matches_megatron_formula():
    t = CFG_26B.text
    got = step_flops(CFG_26B, [(8192, 0)]).llm
    want = megatron_llm_flops(
        1, 8192, t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.intermediate_size, t.vocab_size
    )
    assert got == pytest.approx(want, rel=1e-12)
    assert got / 8192 / 1e9 == pytest.approx(145, rel=0.01)  # facts sheet: ~145 GFLOP per token at 8k


def test_packed_samples_count_attention_per_sample():
    t = CFG_26B.text
    one = step_flops(CFG_26B, [(3000, 0)]).llm
    two = step_flops(CFG_26B, [(1000, 0), (2000, 0)]).llm
    # Only the attention products differ: 3x fwd * 4 * q_width * L * (3000^2 - 1000^2 - 2000^2).
    q_width = t.num_heads * t.resolved_head_dim
    assert one - two == pytest.approx(
        3 * 4 * q_width * t.num_layers * (3000**2 - 1000**2 - 2000**2), rel=1e-9
    )


def test_frozen_llm_has_no_weight_gradient_gemms():
    t = CFG_26B.text
    trained = step_flops(CFG_26B, [(4096, 0)]).llm
    frozen = step_flops(CFG_26B, [(4096, 0)], TrainedParts(vision=True, projector=True, llm=False)).llm
    attention = 4 * 4096 * 4096 * t.num_heads * t.resolved_head_dim * t.num_layers  # forward products
    gemm = (trained - 3 * attention) / 3
    assert frozen == pytest.approx(2 * gemm + 3 * attention, rel=1e-12)


def test_projector_and_mfu():
    # 26B projector per tile: 256 tokens x (2*12800*6144 + 2*6144*6144), trained -> 3x.
    got = step_flops(CFG_26B, [(256, 1)]).projector
    assert got == 3 * 256 * (2 * 12800 * 6144 + 2 * 6144 * 6144)
    assert mfu(989e12 * 8 * 0.5, 1.0, 8, 989.0) == pytest.approx(0.5)
    assert mfu(1.0, 0.0, 8, 989.0) == 0.0


def test_causal_triangle_counts_only_the_computed_pairs():
    t = CFG_26B.text
    square = step_flops(CFG_26B, [(2048, 0)]).llm
    triangle = step_flops(CFG_26B, [(2048, 0)], causal_triangle=True).llm
    # Hand count: 3x fwd * 4 * q_width * L * (s^2 - s(s+1)/2) attention FLOPs fewer; ViT attention unchanged.
    q_width = t.num_heads * t.resolved_head_dim
    assert square - triangle == 3 * 4 * q_width * t.num_layers * (2048**2 - 2048 * 2049 // 2)
    with_tile = step_flops(CFG_26B, [(2048, 1)], causal_triangle=True)
    assert with_tile.vision == step_flops(CFG_26B, [(2048, 1)]).vision


def test_peak_of_the_pcie_h100_is_not_the_sxm_one():
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756.0
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989.0
    assert peak_tflops_for("NVIDIA H200") == 989.0


def test_lora_parts_count_as_frozen_with_the_gradient_flowing_through():
    """lora.llm on a frozen model (InternVL's use_llm_lora): the LLM runs forward + data backward (2x GEMMs,
    3x attention, as a frozen LLM behind a trained projector), the frozen ViT and projector forward only."""
    sample = [(1024, 2)]
    lora = step_flops(CFG_26B, sample, TrainedParts(False, False, True, llm_adapters=True))
    behind = step_flops(CFG_26B, sample, TrainedParts(False, True, False))
    frozen = step_flops(CFG_26B, sample, TrainedParts(False, False, False))
    assert lora.llm == behind.llm and lora.vision == frozen.vision and lora.projector == frozen.projector
    assert frozen.llm < lora.llm < step_flops(CFG_26B, sample, TrainedParts()).llm
    vit = step_flops(CFG_26B, sample, TrainedParts(True, False, False, vision_adapters=True))
    assert vit.projector == behind.projector * 2 / 3 and vit.llm == behind.llm  # gradient flows on to the ViT
