"""``--dry-run``: layout, stage split, per-rank memory estimate and FLOPs per step, on the meta device.

Nothing is allocated: each pipeline rank's shard is built on the meta device (tp rank 0 stands for its tp
group; shards are equal up to padding). Works for the 26B recipes on a laptop. The world size is ``WORLD_SIZE``
(e.g. ``WORLD_SIZE=256 python -m mllm.train --config-name=internvl1_5_26b_sft --dry-run``), else tp * pp.
"""

from __future__ import annotations

import dataclasses
import functools
import os

from mllm.train.config import RunConfig
from mllm.train.flops import TrainedParts, step_flops
from parallel.build import build_rank_skeleton
from parallel.mesh import meta_mesh
from parallel.pipeline import resolve_split

GIB = 2**30


def dry_run_world_size(run: RunConfig) -> int:
    env = int(os.environ.get("WORLD_SIZE", "0"))
    return env if env > 1 else run.parallel.tp * run.parallel.pp


def rank_memory(run: RunConfig, world: int, pp_rank: int) -> dict[str, float]:
    """Bytes of one rank of pipeline rank ``pp_rank``: fp32 weights, fp32 grads and AdamW state of trainable
    parameters (AdamW state divided over dp with ZeRO-1), and the activation estimate of ``activation_bytes``."""
    pcfg = run.parallel
    skeleton = build_rank_skeleton(run.model, pcfg, meta_mesh(pcfg, world, pp_rank=pp_rank))
    params = list(skeleton.module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    dp = pcfg.dp_size(world)
    adam = 8 * trainable / (dp if pcfg.shard_optimizer else 1)
    layers = sum(len(x) for x in skeleton.stage_layers)
    vision = sum(len(x) for x in skeleton.stage_vision_layers)
    return {
        "params": total,
        "trainable": trainable,
        "llm_layers": layers,
        "weights": 4 * total,
        "grads": 4 * trainable,
        "adam": adam,
        "activations": activation_bytes(
            run,
            world,
            layers,
            bool(vision),
            pp_rank,
            [i for ids in skeleton.stage_vision_layers for i in ids],
        ),
    }


def compute_bytes(run: RunConfig) -> int:
    """Bytes of an activation value inside a layer: bf16 under autocast on GPU, fp32 on CPU / dtype=fp32."""
    fp32 = run.train.dtype == "fp32" or (run.train.dtype == "auto" and run.train.device == "cpu")
    return 4 if fp32 else 2


def micro_batches_in_flight(run: RunConfig, world: int, pp_rank: int) -> float:
    """Micro-batches whose activations a pipeline rank holds at its peak (Narayanan et al. 2021): 1F1B holds
    pp - pp_rank, interleaved 1F1B (v virtual stages) (pp - pp_rank) + (pp - 1) / v, GPipe all of them; never
    more than the step's micro-batches (grad accumulation); 1 without pipelining."""
    p, d, t = run.parallel, run.data, run.train
    accum = max(1, t.global_batch_size // (d.micro_batch_size * p.dp_size(world)))
    if p.pp == 1:
        return 1.0
    if p.pp_schedule == "gpipe":
        return float(accum)
    ahead = p.pp - pp_rank
    if p.pp_schedule == "interleaved_1f1b":
        ahead += (p.pp - 1) / p.virtual_stages
    return float(min(accum, ahead))


def layer_stack_bytes(
    tokens: int,
    width: int,
    layers: int,
    tp: int,
    sequence_parallel: bool,
    checkpointed: bool,
    value_bytes: int,
) -> float:
    """Activations of ``layers`` transformer layers for one micro-batch of ``tokens`` tokens.

    One layer's full set (Korthikanti et al. 2022, flash attention, so no s^2 term), in units of 2-byte values:
    ``34 * s * h / tp`` with sequence parallelism, ``s * h * (10 + 24 / tp)`` without (layer norms, residual
    adds and dropout masks are then replicated over tp); scaled by ``value_bytes / 2``. With activation
    checkpointing each layer keeps only its input, the residual stream, which stays fp32 under autocast:
    ``4 * s * h`` bytes (``/ tp`` with sequence parallelism), plus one layer's full set being recomputed.
    """
    if layers == 0:  # a stage without layers of this kind (joint splits: ViT-only stages)
        return 0.0
    per_value = value_bytes / 2
    split = tp if sequence_parallel else 1
    full = tokens * width * (34 / tp if sequence_parallel else 10 + 24 / tp) * per_value
    if not checkpointed:
        return full * layers
    return 4 * tokens * width / split * layers + full


def activation_bytes(
    run: RunConfig,
    world: int,
    llm_layers: int,
    has_vision: bool,
    pp_rank: int,
    vision_layer_ids: list[int] | None = None,
) -> float:
    """Peak activation bytes of one rank: the layer stacks of its stages (``layer_stack_bytes``) per
    micro-batch, times the micro-batches in flight (``micro_batches_in_flight``). The LLM uses
    ``parallel.sequence_parallel``; the ViT ``parallel.vision_sequence_parallel`` (else its tokens are
    replicated over tp). ``vision_layer_ids``: the ViT layers the rank runs (default: all of them when
    ``has_vision``; ``parallel.stage_split=joint`` spreads them over the leading stages)."""
    pcfg, data, m = run.parallel, run.data, run.model
    tp, value_bytes = pcfg.tp, compute_bytes(run)
    s, h = data.seq_len * data.micro_batch_size, m.text.hidden_size
    total = layer_stack_bytes(
        s, h, llm_layers, tp, pcfg.sequence_parallel, pcfg.activation_checkpointing_llm, value_bytes
    )
    transient = 0.0
    v = m.vision
    ids = list(range(v.num_layers)) if vision_layer_ids is None else vision_layer_ids
    if has_vision and ids:
        tiles = data.max_tiles_per_row * data.micro_batch_size
        # A frozen ViT prefix runs without autograd (parallel.pipeline.StageModule.image_tokens): it keeps
        # nothing, only one layer's values exist while it runs. A ViT with LoRA adapters keeps its activations.
        frozen_below = v.num_layers if pcfg.freeze_vision else pcfg.freeze_vit_layers_below
        if m.lora.vision > 0:
            frozen_below = 0
        trained = sum(1 for i in ids if i >= frozen_below)
        vision_sp = pcfg.vision_sequence_parallel and tp > 1
        vit = functools.partial(layer_stack_bytes, tiles * (v.num_patches + 1), v.hidden_size, tp=tp,
                                sequence_parallel=vision_sp, value_bytes=value_bytes)  # fmt: skip
        if trained:
            total += vit(layers=trained, checkpointed=pcfg.activation_checkpointing_vision)
        else:
            transient = vit(layers=1, checkpointed=False)
    return float(total * micro_batches_in_flight(run, world, pp_rank) + transient)


def flops_per_step(run: RunConfig) -> float:
    """Global-batch FLOPs assuming full rows of one sample each, with the configured image-token share."""
    d, p = run.data, run.parallel
    tiles = int(d.seq_len * p.balance_image_token_fraction) // run.model.num_image_token
    parts = TrainedParts(not p.freeze_vision, not p.freeze_projector, not p.freeze_llm)
    parts = dataclasses.replace(
        parts, vision_adapters=run.model.lora.vision > 0, llm_adapters=run.model.lora.llm > 0
    )
    return step_flops(run.model, [(d.seq_len, tiles)], parts).total * run.train.global_batch_size


def print_dry_run(
    run: RunConfig, world: int, gpu_memory_gib: float | None = None, as_json: bool = False
) -> None:
    """Layout, batch, stage split, the planner's memory per rank (``mllm.train.planner``) and FLOPs; with
    ``as_json`` the plan as one JSON object on the last line."""
    from mllm.train.plan_report import print_plan

    p, t, d = run.parallel, run.train, run.data
    dp = p.dp_size(world)
    accum = t.global_batch_size // (d.micro_batch_size * dp)
    print(
        f"layout: world {world} = tp {p.tp} x pp {p.pp} x dp {dp} (virtual stages {p.virtual_stages}, "
        f"schedule {p.pp_schedule}, sequence parallel {p.sequence_parallel}, ZeRO-1 {p.shard_optimizer}, "
        f"FSDP dp_shard {p.dp_shard} x {dp // p.dp_shard} replicas)"
    )
    print(
        f"batch: global {t.global_batch_size} rows of {d.seq_len} tokens = micro {d.micro_batch_size} x dp "
        f"{dp} x accumulation {accum}"
    )
    split = resolve_split(run.model, p)
    print(
        f"stage split ({p.stage_split}): ViT layers per stage {list(split.vision_layers)}, LLM layers per stage "
        f"{list(split.llm_layers)} (projector on stage {split.projector_stage}, head on the last)"
    )
    flops = flops_per_step(run)
    print(
        f"FLOPs per step: {flops:.3e} ({flops / world / 1e12:.1f} TFLOP per device; model FLOPs, Megatron "
        f"formula, see mllm/train/flops.py)"
    )
    print_plan(run, world, gpu_memory_gib, as_json)
