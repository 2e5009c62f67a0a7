"""Printing plans for ``--dry-run`` (one layout) and ``--dry-run --search`` (the best layouts), and resolving
``parallel.layout=auto``. ``--json`` ends the output with the report as one JSON object on the last line."""

from __future__ import annotations

import dataclasses
import json

from mllm.train.config import RunConfig
from mllm.train.planner import CUDA_CONTEXT_GIB, FRAGMENTATION, GIB, NCCL_GIB, Hardware, LayoutPlan, plan
from mllm.train.planner_search import apply_layout, plan_layout, search_layouts, smallest_fitting_world

# parallel.layout=auto picks among layouts whose estimated peak is at most this share of the GPU memory: a margin
# for the estimate's error (the fragmentation allowance is already inside the estimate).
AUTO_HEADROOM = 0.95
COLUMNS = (
    "weights",
    "gathered",
    "grads",
    "grad_buffers",
    "optimizer",
    "activations",
    "logits",
    "pixels",
    "overhead",
)
HEADERS = ("weights", "gathered", "grads", "grad buf", "optim", "activ.", "logits", "pixels", "overhead")


def _gib(x: float) -> str:
    return f"{x / GIB:.1f}"


def assumptions(hw: Hardware) -> str:
    return (
        f"assumptions: {hw.describe()}; allowance per rank {CUDA_CONTEXT_GIB:g} GiB CUDA context + "
        f"{NCCL_GIB:g} GiB NCCL buffers + {FRAGMENTATION:.0%} allocator fragmentation (mllm/train/planner.py)"
    )


def format_ranks(p: LayoutPlan) -> str:
    head = f"{'pp rank':>7} {'params':>9} {'trainable':>9} " + " ".join(f"{h:>8}" for h in HEADERS)
    lines = [head + f" {'total GiB':>9}"]
    budget = p.hardware.gpu_memory_gib * GIB
    for r in p.ranks:
        over = "  OVER BUDGET" if r.total_bytes > budget else ""
        cells = " ".join(f"{_gib(r.bytes[c]):>8}" for c in COLUMNS)
        lines.append(
            f"{r.pp_rank:>7} {r.params / 1e9:>8.2f}B {r.trainable / 1e9:>8.2f}B {cells} {_gib(r.total_bytes):>9}"
            f"{over}"
        )
    return "\n".join(lines)


def format_time(p: LayoutPlan) -> str:
    t = p.time
    return (
        f"estimated step time {t['total']:.1f} s (an estimate): compute {t['compute']:.1f} + pipeline bubble "
        f"{t['bubble']:.1f} + tp communication {t['tp_comm']:.1f} + pp sends {t['pp_comm']:.1f} + exposed dp "
        f"communication {t['dp_comm_exposed']:.1f}"
    )


def layout_line(p: LayoutPlan) -> str:
    lay = p.layout()
    ckpt = "+".join(n for n, on in (("vit", lay["activation_checkpointing_vision"]),
                                    ("llm", lay["activation_checkpointing_llm"])) if on) or "none"  # fmt: skip
    return (
        f"tp {lay['tp']:>2} pp {lay['pp']:>2} v {lay['virtual_stages']} split {lay['stage_split']:<5} vit_sp "
        f"{int(lay['vision_sequence_parallel'])} dp {lay['dp']:>4} dp_shard "
        f"{lay['dp_shard']:>4} ckpt {ckpt:<7} zero1 {int(lay['shard_optimizer'])} rs/mb "
        f"{int(lay['reduce_grads_every_micro_batch'])}"
    )


def print_plan(run: RunConfig, world: int, gpu_memory_gib: float | None, as_json: bool) -> LayoutPlan:
    hw = Hardware(gpu_memory_gib=gpu_memory_gib) if gpu_memory_gib else Hardware()
    p = plan(run, world, hw)
    print(f"memory per rank (GiB; tp and dp ranks of a pipeline rank hold the same; budget "
          f"{hw.gpu_memory_gib:g} GiB{'' if gpu_memory_gib else ', the default'}):")  # fmt: skip
    print(format_ranks(p))
    peak = p.max_rank_bytes
    verdict = "fits" if p.fits else "DOES NOT FIT"
    print(f"peak {_gib(peak)} GiB per rank: {verdict} in {hw.gpu_memory_gib:g} GiB")
    print(format_time(p))
    print(assumptions(hw))
    if as_json:
        print(json.dumps(p.to_json()))
    return p


def print_search(run: RunConfig, world: int, gpu_memory_gib: float, as_json: bool, top: int = 10) -> None:
    plans = search_layouts(run, world, gpu_memory_gib)
    fitting = [p for p in plans if p.fits]
    print(f"layouts for {world} ranks with {gpu_memory_gib:g} GiB each: {len(fitting)} of {len(plans)} fit; "
          f"best {min(top, len(fitting))}, fastest estimate first:")  # fmt: skip
    for p in fitting[:top]:
        print(f"  {layout_line(p)}  peak {_gib(p.max_rank_bytes):>5} GiB  step ~{p.est_step_s:.1f} s")
    if not fitting:
        smallest = smallest_fitting_world(run, gpu_memory_gib, world)
        print(f"  none fits; smallest world size that fits: {smallest}")
    print(assumptions(Hardware(gpu_memory_gib=gpu_memory_gib)))
    if as_json:
        print(json.dumps({"layouts": [p.to_json() for p in fitting[:top]]}))


def device_memory_gib() -> float | None:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GIB
    return None


def resolve_auto_layout(run: RunConfig, world: int, gpu_memory_gib: float | None = None) -> LayoutPlan | None:
    """``parallel.layout=auto``: replace the layout keys of ``run.parallel`` by the planner's fastest layout
    that fits (returned), or raise a one-line ``ValueError`` naming the smallest world size that fits."""
    if run.parallel.layout != "auto":
        return None
    memory = gpu_memory_gib or run.parallel.gpu_memory_gib or device_memory_gib()
    if not memory:
        raise ValueError(
            "parallel.layout=auto needs the GPU memory: set parallel.gpu_memory_gib=GIB (no GPU is visible here)"
        )
    budget = memory * AUTO_HEADROOM
    best = plan_layout(run, world, budget)
    if best is None:
        smallest = smallest_fitting_world(run, budget, world)
        where = (
            f"the smallest world size that fits is {smallest}" if smallest else "none up to 4096 ranks fits"
        )
        raise ValueError(
            f"parallel.layout=auto: no layout of this run fits {world} ranks of {memory:g} GiB (peak at most "
            f"{AUTO_HEADROOM:.0%}); {where} "
            f"(or lower data.seq_len / data.max_tiles_per_row, or freeze parts)"
        )
    run.parallel = apply_layout(run.parallel, best.pcfg)
    return dataclasses.replace(best, hardware=dataclasses.replace(best.hardware, gpu_memory_gib=memory))
