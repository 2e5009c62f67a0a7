"""Per-rank parameter / gradient / optimizer-state memory, computed on the meta device (nothing allocated).

Works for any preset and layout without process groups, e.g. the 26B preset on 64 GPUs::

    reports = memory_report(PRESETS["internvl_chat_v1_5"](), ParallelConfig(tp=8, pp=4), world_size=64)
    print(format_memory_report(reports))

Activations are not included (they depend on the batch); the numbers are the model-state floor per rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mllm.model.config import ModelConfig
from parallel.build import build_rank_skeleton
from parallel.config import ParallelConfig, validate_layout
from parallel.mesh import meta_mesh

GIB = 1024**3


@dataclass
class RankMemory:
    pp_rank: int
    tp_rank: int
    stages: list[int]
    params: int  # local parameter elements (padding included)
    trainable: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def rank_memory(
    params: int,
    trainable: int,
    pcfg: ParallelConfig,
    dp: int,
    param_dtype: torch.dtype,
    grad_dtype: torch.dtype,
    pp_rank: int = 0,
    tp_rank: int = 0,
    stages: list[int] | None = None,
) -> RankMemory:
    """AdamW keeps two fp32 moments, plus an fp32 master copy when parameters are not fp32; ZeRO-1 divides the
    optimizer state by dp (ideal split; ZeroRedundancyOptimizer partitions whole tensors)."""
    per_param = 8 + (4 if param_dtype != torch.float32 else 0)
    optimizer = trainable * per_param
    if pcfg.shard_optimizer:
        optimizer = -(-optimizer // dp)
    return RankMemory(
        pp_rank=pp_rank,
        tp_rank=tp_rank,
        stages=stages or [],
        params=params,
        trainable=trainable,
        param_bytes=params * _dtype_bytes(param_dtype),
        grad_bytes=trainable * _dtype_bytes(grad_dtype),
        optimizer_bytes=optimizer,
    )


def memory_report(
    model_cfg: ModelConfig,
    pcfg: ParallelConfig,
    world_size: int,
    param_dtype: torch.dtype = torch.bfloat16,
    grad_dtype: torch.dtype = torch.float32,
) -> list[RankMemory]:
    """One entry per pipeline rank (tp ranks hold equal shapes: padding makes shards even)."""
    validate_layout(model_cfg, pcfg, world_size)
    dp = pcfg.dp_size(world_size)
    reports = []
    for pp_rank in range(pcfg.pp):
        skeleton = build_rank_skeleton(model_cfg, pcfg, meta_mesh(pcfg, world_size, pp_rank=pp_rank))
        params = sum(p.numel() for p in skeleton.module.parameters())
        trainable = sum(p.numel() for p in skeleton.module.parameters() if p.requires_grad)
        reports.append(
            rank_memory(params, trainable, pcfg, dp, param_dtype, grad_dtype, pp_rank, 0, skeleton.stage_ids)
        )
    return reports


def format_memory_report(reports: list[RankMemory]) -> str:
    lines = [
        f"{'pp':>3} {'stages':>10} {'params':>14} {'trainable':>14} {'param GiB':>10} {'grad GiB':>9} "
        f"{'optim GiB':>10} {'total GiB':>10}"
    ]
    for r in reports:
        lines.append(
            f"{r.pp_rank:>3} {','.join(map(str, r.stages)):>10} {r.params:>14,} {r.trainable:>14,} "
            f"{r.param_bytes / GIB:>10.2f} {r.grad_bytes / GIB:>9.2f} {r.optimizer_bytes / GIB:>10.2f} "
            f"{r.total_bytes / GIB:>10.2f}"
        )
    return "\n".join(lines)
