"""``--dry-run``'s activation estimate against numbers computed by hand from the documented formula.

tiny_sft: LLM h=64, 4 layers; ViT h=48, 2 layers, 56 px tiles of 14 px patches = 16 + 1 tokens; seq_len 256,
micro batch 1, 12 tiles per row, fp32 (4-byte values); world 4 = tp2 x pp2 x dp1, global batch 8 (accumulation
8). Per layer and micro-batch, in bytes: full set 34*s*h/tp*(4/2) with sequence parallelism, s*h*(10+24/tp)*(4/2)
without (the ViT: never sequence parallel); a checkpointed layer keeps its fp32 input 4*s*h (/tp with sequence
parallelism) plus one full layer.
"""

from __future__ import annotations

import pytest

from mllm.config import load_run_config
from mllm.train.dry_run import rank_memory

BASE = [
    "parallel.tp=2",
    "parallel.pp=2",
    "parallel.sequence_parallel=true",
    "parallel.activation_checkpointing_llm=true",
    "train.global_batch_size=8",
]
LLM_STAGE = 4 * 256 * 64 / 2 * 2 + 256 * 64 * 17 * 2  # 2 checkpointed inputs + one full layer = 622592
VIT = 2 * (204 * 48 * 22 * 2)  # 2 full layers of 12 * 17 tokens, 10 + 24/2 = 22 (no SP) = 861696


@pytest.mark.parametrize(
    "schedule, in_flight_rank0, in_flight_rank1",
    [
        (["parallel.pp_schedule=1f1b"], 2, 1),
        (["parallel.pp_schedule=interleaved_1f1b", "parallel.virtual_stages=2"], 2.5, 1.5),
        (["parallel.pp_schedule=gpipe"], 8, 8),
    ],
)
def test_activation_estimate_equals_the_hand_computed_value(schedule, in_flight_rank0, in_flight_rank1):
    run = load_run_config("tiny_sft", BASE + schedule)
    assert rank_memory(run, 4, 0)["activations"] == in_flight_rank0 * (LLM_STAGE + VIT)
    assert rank_memory(run, 4, 1)["activations"] == in_flight_rank1 * LLM_STAGE
    assert LLM_STAGE + VIT == 1484288


def test_bf16_halves_the_layer_values_but_not_the_fp32_residual_inputs():
    run = load_run_config(
        "tiny_sft", BASE + ["train.dtype=bf16", "parallel.activation_checkpointing_vision=true"]
    )
    llm = 4 * 256 * 64 / 2 * 2 + 256 * 64 * 17  # inputs stay 4 bytes, the full layer is bf16
    vit = 4 * 204 * 48 * 2 + 204 * 48 * 22  # ViT inputs not divided by tp
    assert rank_memory(run, 4, 0)["activations"] == 2 * (llm + vit)


def test_a_frozen_vit_keeps_only_one_layers_forward_activations():
    """No trainable ViT weight (and no ViT LoRA): autograd saves nothing in the ViT; one layer's working set
    (204 tokens x 48 x 22 fp32 values, not checkpointed) is live during its forward, once, not per micro-batch."""
    run = load_run_config("tiny_sft", BASE + ["parallel.pp_schedule=1f1b", "parallel.freeze_vision=true"])
    assert rank_memory(run, 4, 0)["activations"] == 2 * LLM_STAGE + 204 * 48 * 22 * 2
    lora = load_run_config("tiny_sft", BASE + ["parallel.freeze_vision=true", "lora.vision=4"])
    assert rank_memory(lora, 4, 0)["activations"] == 2 * (
        LLM_STAGE + VIT
    )  # ViT adapters need its activations
