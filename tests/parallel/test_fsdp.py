"""FSDP2 over dp (``parallel.dp_shard``), alone and composed with tp, pp and replicas (HSDP), computes what one
device computes: loss and every gradient (relative <= 1e-5, fp32) and three AdamW steps with global-norm
clipping, with the ViT trained and frozen; gloo on CPU, the single-device model of ``cases.py`` as reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import run_cases  # noqa: E402
from launcher import run_on_ranks  # noqa: E402
from test_layouts import UNEVEN, _all_ranks_agree, _check_adamw, _check_grads  # noqa: E402

FROZEN_VIT = {"freeze_vision": True}
CASES_2 = [
    ("dp_shard2", "grads", UNEVEN, {"dp_shard": 2}),
    ("dp_shard2_every_micro_batch", "grads", {}, {"dp_shard": 2, "reduce_grads_every_micro_batch": True}),
    ("dp_shard2_frozen_vit", "grads", {}, {"dp_shard": 2, **FROZEN_VIT}),
    ("adamw_dp_shard2", "adamw", UNEVEN, {"dp_shard": 2}),
    ("adamw_dp_shard2_frozen_vit", "adamw", {}, {"dp_shard": 2, **FROZEN_VIT}),
]
CASES_4 = [
    ("tp2xdp_shard2", "grads", UNEVEN, {"tp": 2, "dp_shard": 2}),
    (
        "tp2xdp_shard2_frozen_vit_sp_ckpt",
        "grads",
        {"vision_heads": 4},
        {
            "tp": 2,
            "dp_shard": 2,
            "sequence_parallel": True,
            "activation_checkpointing_llm": True,
            **FROZEN_VIT,
        },
    ),
    ("pp2xdp_shard2", "grads", {}, {"pp": 2, "dp_shard": 2}),
    ("pp2xdp_shard2_frozen_vit", "grads", {}, {"pp": 2, "dp_shard": 2, **FROZEN_VIT}),
    # The ViT spanning both stages (stage_split=joint's placement): each stage shards its own ViT blocks.
    (
        "pp2xdp_shard2_vit_2_stages",
        "grads",
        {},
        {"pp": 2, "dp_shard": 2, "vision_layers_per_stage": [1, 1], "layers_per_stage": [0, 4]},
    ),  # fmt: skip
    ("hsdp_2x2", "grads", UNEVEN, {"dp_shard": 2}),
    ("adamw_tp2xdp_shard2", "adamw", UNEVEN, {"tp": 2, "dp_shard": 2}),
    ("adamw_pp2xdp_shard2", "adamw", {}, {"pp": 2, "dp_shard": 2}),
    ("adamw_hsdp_2x2_frozen_vit", "adamw", {}, {"dp_shard": 2, **FROZEN_VIT}),
]


@pytest.fixture(scope="module")
def fsdp_2() -> dict:
    return _all_ranks_agree(run_on_ranks(run_cases, 2, CASES_2, timeout=500))


@pytest.fixture(scope="module")
def fsdp_4() -> dict:
    return _all_ranks_agree(run_on_ranks(run_cases, 4, CASES_4, timeout=500))


def _check(result, kind: str, pcfg: dict) -> None:
    if kind == "adamw":
        _check_adamw(result)
        return
    # A ViT-only stage 0 runs no decoder layer: no LLM sequence length is recorded there.
    seq = None if pcfg.get("vision_layers_per_stage") else 8 if pcfg.get("sequence_parallel") else 16
    _check_grads(result, tp_seq_shard=seq)
    assert result["fsdp_params"] > 0, result  # the parameters really are FSDP2 DTensors
    if pcfg.get("freeze_vision"):  # 79 tensors in tiny(); the ViT's 4 + 2 x 15 have no gradient
        assert result["num_grads"] == 79 - 4 - 2 * 15, result


@pytest.mark.parametrize("name", [c[0] for c in CASES_2])
def test_dp_shard_matches_single_device(fsdp_2, name) -> None:
    kind, pcfg = {c[0]: (c[1], c[3]) for c in CASES_2}[name]
    _check(fsdp_2[name], kind, pcfg)


@pytest.mark.parametrize("name", [c[0] for c in CASES_4])
def test_dp_shard_with_tp_pp_hsdp_matches_single_device(fsdp_4, name) -> None:
    kind, pcfg = {c[0]: (c[1], c[3]) for c in CASES_4}[name]
    _check(fsdp_4[name], kind, pcfg)
