"""The ViT spread over pipeline stages, ViT sequence parallelism and the interleaved zero-bubble schedule compute
what one device computes: loss and all gradients, and three AdamW steps, on CPU with gloo over 4 ranks (one spawn). Tile activations travel between ViT stages padded to the
step's largest micro-batch; the batch mixes 1-, 2- and 3-tile micro-batches with a dummy-tile text-only one, so
padding and slicing are exercised on every hop.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import run_cases  # noqa: E402
from launcher import run_on_ranks  # noqa: E402
from test_layouts import EVEN, UNEVEN, _all_ranks_agree, _check_adamw, _check_grads  # noqa: E402

VIT_2_STAGES = {"vision_layers_per_stage": [1, 1], "layers_per_stage": [0, 4]}
CASES = [
    ("pp2xdp2_vit_over_2_stages", "grads", {}, {"pp": 2, **VIT_2_STAGES}),
    (
        "pp4_vit_over_2_stages",
        "grads_4mb",
        {},
        {"pp": 4, "vision_layers_per_stage": [1, 1, 0, 0], "layers_per_stage": [0, 1, 2, 1]},
    ),
    (
        "tp2xpp2_interleaved_vit_over_2_stages",
        "grads",
        EVEN,
        {
            "tp": 2,
            "pp": 2,
            "pp_schedule": "interleaved_1f1b",
            "virtual_stages": 2,
            "vision_layers_per_stage": [1, 1, 0, 0],
            "layers_per_stage": [0, 2, 1, 1],
        },
    ),
    ("adamw_pp2xdp2_vit_over_2_stages", "adamw", {}, {"pp": 2, **VIT_2_STAGES}),
    # torch.distributed.pipelining's interleaved zero-bubble schedule (backward split into input and weight
    # passes) with our tp autograd functions, sequence parallelism and the ViT over two stages.
    (
        "tp2xpp2_zero_bubble_sp_vit_over_2_stages",
        "grads",
        EVEN,
        {
            "tp": 2,
            "pp": 2,
            "sequence_parallel": True,
            "pp_schedule": "interleaved_zero_bubble",
            "virtual_stages": 2,
            "vision_layers_per_stage": [1, 1, 0, 0],
            "layers_per_stage": [0, 2, 1, 1],
        },
    ),
    # ViT sequence parallelism: 3 heads at tp 2 (a dummy head), 17 tokens per tile, so 3 tiles make 51 tokens
    # that tp 2 does not divide (padded), alone and with the ViT over two stages (tiles padded to the budget).
    ("tp2xdp2_vit_sequence_parallel", "grads", UNEVEN, {"tp": 2, "vision_sequence_parallel": True}),
    (
        "tp2xpp2_vit_sequence_parallel_over_2_stages",
        "grads",
        UNEVEN,
        {"tp": 2, "pp": 2, "vision_sequence_parallel": True, "sequence_parallel": True, **VIT_2_STAGES},
    ),
    ("adamw_tp2xdp2_vit_sequence_parallel", "adamw", UNEVEN, {"tp": 2, "vision_sequence_parallel": True}),
    (
        "adamw_tp2xpp2_zero_bubble",
        "adamw",
        EVEN,
        {"tp": 2, "pp": 2, "pp_schedule": "interleaved_zero_bubble", "virtual_stages": 2},
    ),
]


@pytest.fixture(scope="module")
def results() -> dict:
    return _all_ranks_agree(run_on_ranks(run_cases, 4, CASES, timeout=500))


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[1].startswith("grads")])
def test_vit_over_stages_matches_single_device(results, name) -> None:
    _check_grads(results[name])  # no sequence-length check: rank 0 runs no LLM layer


@pytest.mark.parametrize("name", [c[0] for c in CASES if c[1] == "adamw"])
def test_vit_over_stages_adamw_matches_single_device(results, name) -> None:
    _check_adamw(results[name])
