"""``--dry-run``: layout, stage split, per-rank memory estimate and FLOPs per step, on the meta device.

Nothing is allocated: each pipeline rank's shard is built on the meta device (tp rank 0 stands for its tp
group; shards are equal up to padding). Works for the 26B recipes on a laptop. The world size is ``WORLD_SIZE``
(e.g. ``WORLD_SIZE=256 python -m mllm.train --config-name=internvl1_5_26b_sft --dry-run``), else tp * pp.
"""

from __future__ import annotations

import os

from mllm.train.config import RunConfig
from mllm.train.flops import TrainedParts, step_flops
from parallel.build import build_rank_skeleton
from parallel.mesh import meta_mesh
from parallel.pipeline import resolve_layers_per_stage

GIB = 2**30


def dry_run_world_size(run: RunConfig) -> int:
    env = int(os.environ.get("WORLD_SIZE", "0"))
    return env if env > 1 else run.parallel.tp * run.parallel.pp


def rank_memory(run: RunConfig, world: int, pp_rank: int) -> dict[str, float]:
    """Bytes of one rank of pipeline rank ``pp_rank``: fp32 weights, fp32 grads and AdamW state of trainable
    parameters (AdamW state divided over dp with ZeRO-1), and a rough activation estimate."""
    pcfg = run.parallel
    skeleton = build_rank_skeleton(run.model, pcfg, meta_mesh(pcfg, world, pp_rank=pp_rank))
    params = list(skeleton.module.parameters())
    total = sum(p.numel() for p in params)
    trainable = sum(p.numel() for p in params if p.requires_grad)
    dp = pcfg.dp_size(world)
    adam = 8 * trainable / (dp if pcfg.shard_optimizer else 1)
    layers = sum(len(x) for x in skeleton.stage_layers)
    return {
        "params": total,
        "trainable": trainable,
        "llm_layers": layers,
        "weights": 4 * total,
        "grads": 4 * trainable,
        "adam": adam,
        "activations": activation_bytes(run, layers, pp_rank == 0),
    }


def activation_bytes(run: RunConfig, llm_layers: int, has_vision: bool) -> float:
    """Megatron's per-layer estimate (Korthikanti et al. 2022, sequence parallel + flash attention:
    34 * s * h / tp bytes per layer and micro-batch in bf16; with activation checkpointing only each layer's
    2 * s * h input is kept plus one layer's full set), times the micro-batches in flight (pp for 1F1B)."""
    pcfg, data, m = run.parallel, run.data, run.model
    tp, in_flight = pcfg.tp, pcfg.pp  # 1F1B: stage 0 holds pp micro-batches (the worst rank)
    s, h = data.seq_len * data.micro_batch_size, m.text.hidden_size

    def stack(tokens: int, width: int, layers: int, checkpointed: bool) -> float:
        full = 34 * tokens * width / tp
        return (2 * tokens * width / tp * layers + full) if checkpointed else full * layers

    total = stack(s, h, llm_layers, pcfg.activation_checkpointing_llm)
    if has_vision:
        tiles = data.max_tiles_per_row * data.micro_batch_size
        v = m.vision
        total += stack(
            tiles * (v.num_patches + 1), v.hidden_size, v.num_layers, pcfg.activation_checkpointing_vision
        )
    return float(total * in_flight)


def flops_per_step(run: RunConfig) -> float:
    """Global-batch FLOPs assuming full rows of one sample each, with the configured image-token share."""
    d, p = run.data, run.parallel
    tiles = int(d.seq_len * p.balance_image_token_fraction) // run.model.num_image_token
    parts = TrainedParts(not p.freeze_vision, not p.freeze_projector, not p.freeze_llm)
    return step_flops(run.model, [(d.seq_len, tiles)], parts).total * run.train.global_batch_size


def print_dry_run(run: RunConfig, world: int) -> None:
    p, t, d = run.parallel, run.train, run.data
    dp = p.dp_size(world)
    accum = t.global_batch_size // (d.micro_batch_size * dp)
    print(
        f"layout: world {world} = tp {p.tp} x pp {p.pp} x dp {dp} (virtual stages {p.virtual_stages}, "
        f"schedule {p.pp_schedule}, sequence parallel {p.sequence_parallel}, ZeRO-1 {p.shard_optimizer})"
    )
    print(
        f"batch: global {t.global_batch_size} rows of {d.seq_len} tokens = micro {d.micro_batch_size} x dp "
        f"{dp} x accumulation {accum}"
    )
    lps = resolve_layers_per_stage(run.model, p)
    print(f"stage split (LLM layers per stage; ViT + projector on stage 0, head on the last): {lps}")
    print(
        f"{'pp rank':>7} {'params':>9} {'trainable':>9} {'weights':>8} {'grads':>8} {'adam':>8} "
        f"{'activ.':>8} {'total GiB':>9}"
    )
    for pp_rank in range(p.pp):
        m = rank_memory(run, world, pp_rank)
        total = m["weights"] + m["grads"] + m["adam"] + m["activations"]
        print(
            f"{pp_rank:>7} {m['params'] / 1e9:>8.2f}B {m['trainable'] / 1e9:>8.2f}B {m['weights'] / GIB:>8.1f} "
            f"{m['grads'] / GIB:>8.1f} {m['adam'] / GIB:>8.1f} {m['activations'] / GIB:>8.1f} {total / GIB:>9.1f}"
        )
    flops = flops_per_step(run)
    print(
        f"FLOPs per step: {flops:.3e} ({flops / world / 1e12:.1f} TFLOP per device; model FLOPs, Megatron "
        f"formula, see mllm/train/flops.py)"
    )
