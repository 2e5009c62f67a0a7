"""Search over layouts for a world size and a GPU memory: the fastest estimated layouts that fit first.

``search_layouts(run, world, gpu_memory_gib)`` enumerates tp (dividing the kv heads, within a node), pp
(dividing the world with tp, at most one stage per LLM layer), virtual stages (interleaved 1F1B with 2 when
the accumulation allows it), the stage split (``llm`` and, under a pipeline, ``joint``: ViT layers over the leading
stages), ViT sequence parallelism (tp > 1, drop path 0), dp_shard (every divisor of dp; 1 = DDP with ZeRO-1), activation checkpointing
(none, LLM, ViT + LLM) and, under FSDP without a pipeline, whether gradients are reduced after every
micro-batch; sequence parallelism is on whenever tp > 1. Layouts the run cannot use (global batch not a
multiple of micro batch x dp, heads, stage split) are skipped. ``plan_layout`` returns the best fitting plan,
``smallest_fitting_world`` the smallest world size at which one fits (for ``parallel.layout=auto``).
"""

from __future__ import annotations

import dataclasses
import itertools

from mllm.train.config import RunConfig
from mllm.train.planner import GIB, Hardware, LayoutPlan, plan, rank_plans
from parallel.config import ParallelConfig, validate_layout

CHECKPOINTING = ((False, False), (False, True), (True, True))  # (vision, llm)
LAYOUT_KEYS = (
    "tp",
    "pp",
    "virtual_stages",
    "pp_schedule",
    "dp_shard",
    "sequence_parallel",
    "shard_optimizer",
    "activation_checkpointing_vision",
    "activation_checkpointing_llm",
    "reduce_grads_every_micro_batch",
    "layers_per_stage",
    "stage_split",
    "vision_sequence_parallel",
)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _split_options(run: RunConfig, pp: int) -> list[str]:
    """``stage_split=joint`` (ViT layers over the leading stages) next to ``llm`` under a pipeline, unless the
    layout pins the split or the ViT is frozen (a frozen stage-0 ViT prefix cannot start a pipeline)."""
    p = run.parallel
    if pp == 1 or p.vision_layers_per_stage is not None or p.freeze_vision:
        return ["llm"]
    return ["llm", "joint"]


def _vision_sp_options(run: RunConfig, tp: int) -> list[bool]:
    """ViT sequence parallelism where the run allows it (tp > 1, no drop path, the torch backend, a ViT with
    activations to keep)."""
    p, v = run.parallel, run.model.vision
    if tp == 1 or v.drop_path_rate > 0 or p.layer_backend != "torch" or p.freeze_vision:
        return [False]
    return [False, True]


def candidate_layouts(run: RunConfig, world: int, hw: Hardware) -> list[ParallelConfig]:
    m, base = run.model, run.parallel
    out = []
    for tp in _divisors(m.text.num_kv_heads):
        if tp > hw.gpus_per_node or world % tp or m.text.num_heads % tp or m.text.intermediate_size % tp:
            continue
        for pp in _divisors(world // tp):
            if pp > m.text.num_layers:
                continue
            dp = world // (tp * pp)
            micro = run.data.micro_batch_size
            gbs = run.train.global_batch_size
            if gbs % (micro * dp) or gbs < micro * dp:
                continue
            accum = gbs // (micro * dp)
            schedules = [("1f1b", 1)] if pp > 1 else [(base.pp_schedule if pp > 1 else "1f1b", 1)]
            if pp > 1 and accum % pp == 0 and m.text.num_layers >= 2 * pp:
                schedules.append(("interleaved_1f1b", 2))
            for schedule, v in schedules:
                for ds, split, vision_sp in itertools.product(
                    _divisors(dp), _split_options(run, pp), _vision_sp_options(run, tp)
                ):
                    reduce_options = [False, True] if ds > 1 and pp == 1 and accum > 1 else [False]
                    for ckpt_vit, ckpt_llm in CHECKPOINTING:
                        if ckpt_vit and base.freeze_vision:  # a frozen ViT keeps no activations anyway
                            continue
                        for reduce_every in reduce_options:
                            out.append(
                                dataclasses.replace(
                                    base,
                                    tp=tp,
                                    pp=pp,
                                    virtual_stages=v,
                                    pp_schedule=schedule,
                                    layers_per_stage=None,
                                    stage_split=split,
                                    vision_sequence_parallel=vision_sp,
                                    dp_shard=ds,
                                    sequence_parallel=tp > 1,
                                    shard_optimizer=ds == 1 and dp > 1,
                                    activation_checkpointing_vision=ckpt_vit,
                                    activation_checkpointing_llm=ckpt_llm,
                                    reduce_grads_every_micro_batch=reduce_every,
                                    layout="manual",
                                )
                            )
    return out


def search_layouts(
    run: RunConfig, world: int, gpu_memory_gib: float, hw: Hardware | None = None
) -> list[LayoutPlan]:
    """Every usable layout's plan: those that fit ``gpu_memory_gib`` first, fastest estimate first; then the
    ones that do not fit, smallest peak first."""
    hw = dataclasses.replace(hw or Hardware(), gpu_memory_gib=gpu_memory_gib)
    plans = []
    for pcfg in candidate_layouts(run, world, hw):
        try:
            plans.append(plan(run, world, hw, pcfg))
        except ValueError:  # e.g. a stage split the model cannot take
            continue
    fitting = sorted((p for p in plans if p.fits), key=lambda p: (p.est_step_s, p.max_rank_bytes))
    over = sorted((p for p in plans if not p.fits), key=lambda p: p.max_rank_bytes)
    return fitting + over


def plan_layout(
    run: RunConfig, world: int, gpu_memory_gib: float, hw: Hardware | None = None
) -> LayoutPlan | None:
    """The fastest layout that fits, or None."""
    plans = search_layouts(run, world, gpu_memory_gib, hw)
    return plans[0] if plans and plans[0].fits else None


def smallest_fitting_world(
    run: RunConfig, gpu_memory_gib: float, start: int, hw: Hardware | None = None, limit: int = 4096
) -> int | None:
    """The smallest world size above ``start`` (whole nodes beyond one node) where some layout fits."""
    hw = hw or Hardware()
    world = start + 1
    while world <= limit:
        if any_layout_fits(run, world, gpu_memory_gib, hw):
            return world
        world = world + 1 if world < hw.gpus_per_node else (world // hw.gpus_per_node + 1) * hw.gpus_per_node
    return None


def any_layout_fits(run: RunConfig, world: int, gpu_memory_gib: float, hw: Hardware) -> bool:
    """Whether some layout's memory fits (no step-time estimates: stops at the first that fits)."""
    for pcfg in candidate_layouts(run, world, hw):
        try:
            validate_layout(run.model, pcfg, world)
            ranks = rank_plans(run, pcfg, world)
        except ValueError:
            continue
        if max(r.total_bytes for r in ranks) <= gpu_memory_gib * GIB:
            return True
    return False


def apply_layout(pcfg: ParallelConfig, chosen: ParallelConfig) -> ParallelConfig:
    """``pcfg`` with the layout keys of ``chosen`` (everything else, e.g. freezing, kept)."""
    return dataclasses.replace(pcfg, **{k: getattr(chosen, k) for k in LAYOUT_KEYS}, layout="manual")
