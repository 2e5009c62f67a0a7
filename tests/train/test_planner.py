"""The layout planner on the 26B recipes (meta device only): the SFT recipe has layouts that fit 80 GB GPUs at
64 ranks (one at <= 60 GiB) and at 16, the ViT-frozen fine-tune fits one 8 x 80 GB node with FSDP, and frozen
parts cost neither gradient nor optimizer memory (checked against the hand-counted parameter sizes)."""

from __future__ import annotations

import dataclasses

from mllm.config import load_run_config
from mllm.train.planner import GIB, plan
from mllm.train.planner_search import plan_layout, search_layouts


def test_sft_26b_has_fitting_layouts_at_64_and_16_gpus():
    run = load_run_config("internvl1_5_26b_sft", [])
    assert run.data.max_tiles_per_row == 16 and run.data.seq_len == 4096
    at64 = [p for p in search_layouts(run, 64, 80.0) if p.fits]
    assert min(p.max_rank_bytes for p in at64) <= 60 * GIB
    assert [p.est_step_s for p in at64] == sorted(p.est_step_s for p in at64)
    assert any(p.fits for p in search_layouts(run, 16, 80.0))


def test_26b_finetune_with_frozen_vit_fits_one_node_with_fsdp():
    run = load_run_config(
        "internvl1_5_26b_sft", ["parallel.freeze_vision=true", "train.global_batch_size=128"]
    )
    best = plan_layout(run, 8, 80.0)
    assert best is not None and best.max_rank_bytes <= 76 * GIB
    # DeepSpeed ZeRO-3's layout (InternVL's script): FSDP over all 8, a reduce-scatter per micro-batch (the
    # unsharded fp32 gradient accumulation of a once-per-step reduction would not fit), LLM checkpointing.
    fsdp_all = dataclasses.replace(run.parallel, tp=1, pp=1, dp_shard=8, shard_optimizer=False,
                                   sequence_parallel=False, activation_checkpointing_llm=True,
                                   reduce_grads_every_micro_batch=True)  # fmt: skip
    assert plan(run, 8, pcfg=fsdp_all).max_rank_bytes <= 76 * GIB
    once = dataclasses.replace(fsdp_all, reduce_grads_every_micro_batch=False)
    assert plan(run, 8, pcfg=once).max_rank_bytes > 80 * GIB


def test_frozen_parts_hold_no_gradients_or_optimizer_state():
    from mllm.model.internvl import build_model

    run = load_run_config("tiny_sft", ["parallel.dp_shard=2", "train.global_batch_size=8"])
    vit = sum(
        p.numel() for n, p in build_model(run.model, "meta").named_parameters() if n.startswith("vision.")
    )
    trained = plan(run, 2).ranks[0].bytes
    frozen_run = dataclasses.replace(run, parallel=dataclasses.replace(run.parallel, freeze_vision=True))
    frozen = plan(frozen_run, 2).ranks[0].bytes
    assert trained["grads"] - frozen["grads"] == 4 * vit / 2  # fp32, sharded over dp_shard 2
    assert trained["optimizer"] - frozen["optimizer"] == 8 * vit / 2  # two fp32 moments
    assert trained["weights"] == frozen["weights"]  # frozen weights are still held
