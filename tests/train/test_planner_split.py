"""The planner follows the layout's stage split (meta device and numbers only): under
``parallel.stage_split=joint`` the 26B SFT's pipeline rank 0 holds only the ViT layers ``best_stage_split``
gives it (weights as the trainer's own rank skeleton, activations as a hand count), and the layout search
considers joint splits and picks one when it is better; ViT sequence parallelism splits the ViT's activations
over tp; the 78B recipes' auto layouts fit 80 GB GPUs at InternVL's GPU counts."""

from __future__ import annotations

import dataclasses

import pytest

from mllm.config import load_run_config
from mllm.train.dry_run import print_dry_run
from mllm.train.flops import TrainedParts
from mllm.train.plan_report import resolve_auto_layout
from mllm.train.planner import GIB, Hardware, plan
from mllm.train.planner_search import plan_layout
from parallel.build import build_rank_skeleton
from parallel.mesh import meta_mesh
from parallel.pipeline import resolve_split
from parallel.stage_split import best_stage_split

WORLD = 64  # tp 8 x pp 4 x dp 2


def _hand_rank0_activations(run, vit_layers: int, llm_layers: int) -> float:
    """Rank 0 under 1F1B at pp 4 holds 4 micro-batches; with checkpointing a layer keeps its fp32 input (the
    LLM's split over tp by sequence parallelism, the ViT's not) and one layer of each kind is recomputed in
    full (Korthikanti et al.: 34 s h / tp bf16 values with sequence parallelism, s h (10 + 24 / tp) without)."""
    d, m, tp = run.data, run.model, 8
    s, h = d.seq_len, m.text.hidden_size
    tiles_tokens, w = d.max_tiles_per_row * (m.vision.num_patches + 1), m.vision.hidden_size
    llm = (4 * s * h / tp * llm_layers + s * h * 34 / tp) if llm_layers else 0.0
    vit = (4 * tiles_tokens * w * vit_layers + tiles_tokens * w * (10 + 24 / tp)) if vit_layers else 0.0
    return 4 * (llm + vit)


def test_joint_split_lowers_rank0_memory_of_the_26b_sft_at_pp4():
    run = load_run_config("internvl1_5_26b_sft", [])
    p = run.parallel
    assert p.activation_checkpointing_vision and p.activation_checkpointing_llm and p.sequence_parallel
    plans = {}
    for mode in ("llm", "joint"):
        pcfg = dataclasses.replace(p, tp=8, pp=4, stage_split=mode)
        plans[mode] = plan(run, WORLD, pcfg=pcfg)
        tiles = p.balance_image_token_fraction * p.balance_seq_len / run.model.num_image_token
        split = best_stage_split(run.model, 4, 1, tiles, p.balance_seq_len, vision_across_stages=mode == "joint",
                                 parts=TrainedParts())  # fmt: skip
        rank0 = plans[mode].ranks[0]
        assert (rank0.vision_layers, rank0.llm_layers) == (split.vision_layers[0], split.llm_layers[0])
        assert rank0.bytes["activations"] == _hand_rank0_activations(
            run, split.vision_layers[0], split.llm_layers[0]
        )
        # Weights: the trainer's own rank-0 skeleton (pruned to the split) holds what the planner counts.
        skeleton = build_rank_skeleton(run.model, pcfg, meta_mesh(pcfg, WORLD, pp_rank=0))
        assert rank0.params == sum(x.numel() for x in skeleton.module.parameters())
        assert rank0.bytes["weights"] == 4 * rank0.params  # fp32 master weights, no FSDP
    llm0, joint0 = plans["llm"].ranks[0], plans["joint"].ranks[0]
    assert joint0.vision_layers < llm0.vision_layers  # the ViT spans the leading stages
    assert joint0.total_bytes < llm0.total_bytes
    assert joint0.bytes["activations"] < llm0.bytes["activations"]
    assert plans["joint"].max_rank_bytes < plans["llm"].max_rank_bytes
    # The busiest rank's share of the step shrinks with the joint balance.
    assert plans["joint"].time["compute"] < plans["llm"].time["compute"]


def test_search_picks_a_joint_split_when_it_is_faster(capsys):
    run = load_run_config("internvl1_5_26b_sft", [])
    best = plan_layout(run, 32, 80.0)
    assert best is not None and best.pcfg.pp > 1 and best.pcfg.stage_split == "joint"
    split = resolve_split(run.model, best.pcfg)
    assert sum(1 for n in split.vision_layers if n) > 1  # the ViT really spans stages
    as_llm = plan(run, 32, pcfg=dataclasses.replace(best.pcfg, stage_split="llm"))
    assert not as_llm.fits or as_llm.est_step_s > best.est_step_s
    # parallel.layout=auto takes it, and the dry run prints the split it runs.
    auto = dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, layout="auto"))
    chosen = resolve_auto_layout(auto, 32, 80.0)
    assert chosen is not None and auto.parallel.stage_split == "joint" and auto.parallel.pp > 1
    print_dry_run(auto, 32, 80.0)
    printed = resolve_split(run.model, auto.parallel).vision_layers
    assert f"ViT layers per stage {list(printed)}" in capsys.readouterr().out


@pytest.mark.parametrize(("recipe", "gpus"), [("internvl2_5_78b_sft", 512), ("internvl3_78b_sft", 32)])
def test_78b_recipes_auto_layout_fits_80gb_at_internvls_gpu_count(recipe, gpus):
    """InternVL's GPU counts (512 for the 2.5-78B stage-2 script, 32 for InternVL3-78B's fine-tune) with the
    scripts' rows (16384 packed tokens, 48 images' tiles, drop path 0.4): a layout peaks at <= 76 GiB (95%)."""
    run = load_run_config(recipe)
    d = run.data
    assert (d.seq_len, d.max_tiles_per_row, run.model.vision.drop_path_rate) == (16384, 48, 0.4)
    assert run.parallel.layout == "auto"
    chosen = resolve_auto_layout(run, gpus, 80.0)
    assert chosen is not None and chosen.max_rank_bytes <= 76 * GIB
    assert (
        plan(run, gpus, Hardware(gpu_memory_gib=80.0)).max_rank_bytes == chosen.max_rank_bytes
    )  # as applied


def test_vision_sequence_parallel_splits_the_vits_activations_over_tp():
    """With ``parallel.vision_sequence_parallel`` the ViT's checkpointed inputs and its recomputed layer are split
    over tp like the LLM's (Korthikanti et al.: 34 s h / tp bf16 values per full layer)."""
    run = load_run_config("internvl1_5_26b_sft", ["model.vision.drop_path_rate=0.0"])
    d, m, tp = run.data, run.model, 8
    base = dataclasses.replace(run.parallel, tp=tp, pp=4)
    off, on = (
        plan(run, WORLD, pcfg=dataclasses.replace(base, vision_sequence_parallel=x)) for x in (False, True)
    )
    t, w, layers = (
        d.max_tiles_per_row * (m.vision.num_patches + 1),
        m.vision.hidden_size,
        off.ranks[0].vision_layers,
    )
    vit_off = 4 * t * w * layers + t * w * (10 + 24 / tp)
    vit_on = 4 * t * w / tp * layers + t * w * 34 / tp
    in_flight = 4  # 1F1B, pp 4, rank 0
    saved = off.ranks[0].bytes["activations"] - on.ranks[0].bytes["activations"]
    assert saved == pytest.approx(in_flight * (vit_off - vit_on), rel=1e-12)
    assert off.ranks[1].bytes["activations"] == on.ranks[1].bytes["activations"]  # no ViT there
