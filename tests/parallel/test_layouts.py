"""Every layout computes what one device computes: loss and all gradients (relative <= 1e-5 fp32, with an
absolute floor for near-zero tensors: ``cases.ABS_FLOOR``), and three AdamW steps with global-norm clipping
(<= 1e-4), on CPU with gloo over 2 and 4 ranks; also Qwen3 text, a 300M-style ViT and LoRA adapters.

All layouts of one world size run in one spawn (one process group, a fresh mesh per layout) to keep the
suite fast; each test then checks its own layout's result. The batch always packs an image sample with a
text-only sample in one row and has a text-only micro-batch with a dummy tile.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cases import run_cases  # noqa: E402
from launcher import run_on_ranks  # noqa: E402

GRAD_TOL, ADAMW_TOL = 1e-5, 1e-4
UNEVEN = {"vocab_size": 1021, "vision_heads": 3}  # 3 ViT heads at tp 2 -> one dummy head; padded vocabulary
EVEN = {"vision_heads": 4}
VIT_300M = {"vision_heads": 4, "vision_style": "300m"}  # LayerNorm, qkv bias (k_proj.bias grads are ~0)
QWEN3 = {"vision_heads": 4, "text_arch": "qwen3"}  # per-head q/k norms, head_dim apart from the width
LORA = {"lora": {"vision": 4, "llm": 4, "dropout": 0.0}}  # dropout off: exact comparison

CASES_2 = [
    ("tp2_uneven_heads", "grads", UNEVEN, {"tp": 2}),
    ("tp2_sequence_parallel", "grads", EVEN, {"tp": 2, "sequence_parallel": True}),
    ("pp2_1f1b_auto", "grads", {}, {"pp": 2}),
    ("pp2_gpipe", "grads", {}, {"pp": 2, "pp_schedule": "gpipe", "layers_per_stage": [1, 3]}),
    ("pp2_interleaved", "grads", {}, {"pp": 2, "pp_schedule": "interleaved_1f1b", "virtual_stages": 2}),
    ("dp2_square_loss", "grads", {}, {"loss_mode": "square"}),
    (
        "tp2_freeze_vit_below_1_and_projector",
        "grads",
        UNEVEN,
        {"tp": 2, "freeze_vit_layers_below": 1, "freeze_projector": True},
    ),
    ("pp2_freeze_llm", "grads", {}, {"pp": 2, "freeze_llm": True}),
    (
        "tp2_sp_checkpointing",
        "grads",
        EVEN,
        {
            "tp": 2,
            "sequence_parallel": True,
            "activation_checkpointing_vision": True,
            "activation_checkpointing_llm": True,
        },
    ),
    ("tp2_sp_vit300m", "grads", VIT_300M, {"tp": 2, "sequence_parallel": True}),
    ("tp2_sp_qwen3", "grads", QWEN3, {"tp": 2, "sequence_parallel": True}),
    ("lora_tp2_uneven", "grads", {**UNEVEN, **LORA}, {"tp": 2}),
    ("lora_tp2_sp_qwen3", "grads", {**QWEN3, **LORA}, {"tp": 2, "sequence_parallel": True}),
    ("lora_pp2", "grads", LORA, {"pp": 2}),
    ("lora_dp2", "grads", LORA, {}),
    ("adamw_lora_tp2", "adamw", {**UNEVEN, **LORA}, {"tp": 2}),
    ("adamw_tp2_uneven", "adamw", UNEVEN, {"tp": 2}),
    ("adamw_dp2_sharded", "adamw", {}, {"shard_optimizer": True}),
]
CASES_4 = [
    ("tp2xpp2_sp", "grads", EVEN, {"tp": 2, "pp": 2, "sequence_parallel": True}),
    ("tp2xdp2_uneven", "grads", UNEVEN, {"tp": 2}),
    ("pp2xdp2_sample_loss", "grads", {}, {"pp": 2, "loss_mode": "sample", "layers_per_stage": [2, 2]}),
    ("adamw_tp2xdp2_sharded", "adamw", UNEVEN, {"tp": 2, "shard_optimizer": True}),
    ("adamw_tp2xpp2", "adamw", {}, {"tp": 2, "pp": 2}),
]


@pytest.fixture(scope="module")
def results_2() -> dict:
    return _all_ranks_agree(run_on_ranks(run_cases, 2, CASES_2, timeout=500))


@pytest.fixture(scope="module")
def results_4() -> dict:
    return _all_ranks_agree(run_on_ranks(run_cases, 4, CASES_4, timeout=500))


def _all_ranks_agree(per_rank: list[dict]) -> dict:
    """Every rank gathered the full gradients and compared them itself; all must pass."""
    merged: dict = {}
    for name in per_rank[0]:
        bad = [r[name] for r in per_rank if isinstance(r[name], str)]
        if bad:
            merged[name] = bad[0]
            continue
        worst = dict(per_rank[0][name])
        for key in ("loss_err", "grad_err", "update_rel_err", "param_max_abs_err", "norm_err", "dummy_max"):
            if key in worst:
                worst[key] = max(r[name][key] for r in per_rank)
        merged[name] = worst
    return merged


def _check_grads(result, tp_seq_shard: int | None = None) -> None:
    assert not isinstance(result, str), result
    assert result["missing"] == [] and result["extra"] == [], result
    assert result["num_tokens"] == result["ref_tokens"]
    assert result["loss_err"] <= GRAD_TOL, result
    assert result["grad_err"] <= GRAD_TOL, result
    assert result["frozen_with_grad"] == [], result
    if tp_seq_shard is not None:
        assert result["llm_seq_per_rank"] == tp_seq_shard, result


def _check_adamw(result) -> None:
    assert not isinstance(result, str), result
    assert result["missing"] == [], result
    # Parameters after 3 steps (lr 1e-3, so each moved ~3e-3) agree within 1e-4 elementwise, and each
    # tensor's total update agrees within 1e-3 relative (Adam amplifies noise in ~eps-sized gradients).
    assert result["param_max_abs_err"] <= ADAMW_TOL, result
    assert result["update_rel_err"] <= 1e-3, result
    assert result["norm_err"] <= GRAD_TOL, result
    assert result["dummy_max"] == 0.0, result


@pytest.mark.parametrize("name", [c[0] for c in CASES_2 if c[1] == "grads"])
def test_two_ranks_match_single_device(results_2, name) -> None:
    sp = dict((c[0], c[3]) for c in CASES_2)[name].get("sequence_parallel")
    _check_grads(results_2[name], tp_seq_shard=8 if sp else 16)


def test_frozen_parts_have_no_gradients(results_2) -> None:
    frozen = results_2["pp2_freeze_llm"]
    assert not isinstance(frozen, str), frozen
    # 79 tensors in tiny(): ViT 4 embedding + 2 x 15 per layer, projector 6, LLM 39. Only ViT + projector train.
    assert frozen["num_grads"] == 4 + 2 * 15 + 6, frozen
    partial = results_2["tp2_freeze_vit_below_1_and_projector"]
    assert not isinstance(partial, str), partial
    assert partial["num_grads"] == 79 - 4 - 15 - 6, partial


@pytest.mark.parametrize("name", [c[0] for c in CASES_2 if c[1] == "adamw"])
def test_two_ranks_adamw_matches_single_device(results_2, name) -> None:
    _check_adamw(results_2[name])


def test_lora_trains_only_adapters(results_2) -> None:
    """With lora.vision and lora.llm every base weight of ViT and LLM is frozen (only the projector and the
    adapters get gradients), and after three AdamW steps exactly the adapters and the projector moved."""
    grads = results_2["lora_dp2"]
    assert not isinstance(grads, str), grads
    # 6 ViT + 7 LLM linears per layer, 2 ViT and 4 LLM layers, A and B each; projector 6 tensors.
    adapters = 2 * (6 * 2 + 7 * 4)
    assert grads["num_grads"] == adapters + 6, grads
    steps = results_2["adamw_lora_tp2"]
    assert not isinstance(steps, str), steps
    assert steps["num_adapters"] == adapters
    assert all(".lora_" in n or n.startswith("projector.") for n in steps["changed"]), steps["changed"]
    assert len(steps["changed"]) == adapters + 6, steps["changed"]


def test_sharded_optimizer_is_zero(results_2) -> None:
    assert results_2["adamw_dp2_sharded"]["sharded"] == "ZeroRedundancyOptimizer"


@pytest.mark.parametrize("name", [c[0] for c in CASES_4 if c[1] == "grads"])
def test_four_ranks_match_single_device(results_4, name) -> None:
    sp = dict((c[0], c[3]) for c in CASES_4)[name].get("sequence_parallel")
    _check_grads(results_4[name], tp_seq_shard=8 if sp else 16)


@pytest.mark.parametrize("name", [c[0] for c in CASES_4 if c[1] == "adamw"])
def test_four_ranks_adamw_matches_single_device(results_4, name) -> None:
    _check_adamw(results_4[name])
