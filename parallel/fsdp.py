"""FSDP2 (``fully_shard``) over the data-parallel axis, composed with our tensor and pipeline parallelism.

Tensor parallelism here keeps plain local tensors (Megatron style), so FSDP2 shards each tp rank's *local*
parameters over the ``dp_shard`` ranks of its (tp rank, pp rank) (dim 0, ``torch.chunk`` sizes): the 2-D
layout torchtitan builds with DTensor TP, and with pp the 3-D one (one ``fully_shard`` root per pipeline stage
module, which ``torch.distributed.pipelining`` drives: no gradient reduction per micro-batch, one
reduce-scatter after the last, ``PipelineStage.perform_reduce_grad``). HSDP: a 2-D (dp_replicate, dp_shard)
mesh, reduce-scatter inside a shard group, all-reduce across replicas.

Units (each one all-gather / reduce-scatter; the next unit's all-gather is issued before this one computes,
forward and backward, ``set_modules_to_{forward,backward}_prefetch``): the ViT embeddings, every ViT block,
every LLM decoder layer; the rest of a stage (projector, token embedding, final norm, output layer)
belongs to the stage root. Mixed precision: ``MixedPrecisionPolicy(param_dtype, reduce_dtype)`` (bf16 compute
copies gathered from fp32 master shards, fp32 reduction by default). Gradients are *summed* over dp
(``set_gradient_divide_factor(1)``): the loss is already divided by the global batch's weight. Frozen
parameters are sharded too but get no gradient and no reduce-scatter.

Parameters become DTensors (global shape = the tp-local shape). ``local_rows`` / ``to_local`` let the rest of
``parallel`` and the checkpoint code work on the local shard and its offset along dim 0.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from parallel.mesh import ParallelMesh

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def is_sharded(t: torch.Tensor) -> bool:
    return isinstance(t, DTensor)


def to_local(t: torch.Tensor) -> torch.Tensor:
    """The local tensor of a DTensor (a view sharing its storage), or ``t`` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(local shard, its first row in the tp-local tensor): FSDP2 shards dim 0 in ``torch.chunk`` pieces."""
    if not isinstance(t, DTensor):
        return t, 0
    local = t.to_local()
    rows = t.shape[0]
    # torch.chunk sizes over the shard dimension: ceil(rows / n) each, the last ones shorter or empty.
    mesh, placements = t.device_mesh, t.placements
    shard_dims = [i for i, p in enumerate(placements) if p.is_shard()]
    coord = mesh.get_coordinate()
    index, count = 0, 1
    for i in shard_dims:  # nested sharding of dim 0 over several mesh dims, outermost first
        index = index * mesh.size(i) + coord[i]
        count *= mesh.size(i)
    chunk = -(-rows // count)
    return local, min(rows, index * chunk)


def full_tp_local(t: torch.Tensor) -> torch.Tensor:
    """The whole tp-local tensor (an all-gather over dp_shard for a DTensor)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def copy_rows_(param: torch.Tensor, tp_local_full: torch.Tensor) -> None:
    """Copy this rank's rows of a whole tp-local tensor into ``param`` (sharded or not)."""
    local, row0 = local_rows(param)
    local.copy_(tp_local_full.narrow(0, row0, local.shape[0]).to(local.dtype))


def resolve_dtype(name: str, compute_dtype: torch.dtype) -> torch.dtype:
    return compute_dtype if name == "auto" else _DTYPES[name]


def fsdp_units(stage) -> list[nn.Module]:
    """The modules of one ``StageModule`` that get their own all-gather (innermost first)."""
    return [unit for chain in unit_chains(stage) for unit in chain]


def unit_chains(stage) -> list[list[nn.Module]]:
    """Units in the order the forward runs them: the stage's ViT pieces (the patch embedding on stage 0, the
    blocks this stage runs: all of them, or its share when the ViT spans stages) and its decoder layers."""
    chains = []
    if stage.runs_vision:
        embeddings = [stage.vision_embeddings] if stage.vision_embeddings is not None else []
        chains.append([*embeddings, *stage.vision_layers])
    chains.append(list(stage.layers))
    return [c for c in chains if c]


def apply_fsdp(stages: list, mesh: ParallelMesh, param_dtype: torch.dtype, reduce_dtype: torch.dtype) -> None:
    """``fully_shard`` every unit of every stage, then each stage module as its root."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=reduce_dtype)
    for stage in stages:
        for unit in fsdp_units(stage):
            fully_shard(unit, mesh=mesh.fsdp_mesh, mp_policy=policy)
        # The root's own parameters (embeddings, projector, head) are gathered once per forward and kept
        # until the backward: resharding the root after forward only frees them to gather them again.
        fully_shard(stage, mesh=mesh.fsdp_mesh, mp_policy=policy, reshard_after_forward=False)
        for chain in unit_chains(stage):  # explicit prefetch: the next unit's all-gather under this one
            for i, unit in enumerate(chain):
                if i + 1 < len(chain):
                    unit.set_modules_to_forward_prefetch([chain[i + 1]])
                if i > 0 and any(p.requires_grad for p in chain[i - 1].parameters()):
                    unit.set_modules_to_backward_prefetch([chain[i - 1]])  # a frozen unit has no backward
        for module in stage.modules():
            if isinstance(module, FSDPModule):
                # A plain sum (gloo has no pre-multiplied sum; a divide factor of 1 would need one).
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
        # A text-only micro-batch on one rank must not skip the ViT's reduce-scatter that another rank runs.
        stage.set_reduce_scatter_unused_params(True)


def set_micro_batch_sync(stages: list, reduce: bool, last: bool) -> None:
    """Before a micro-batch's backward (no pipeline): reduce-scatter only when asked (last micro-batch, or
    every one with ``reduce_grads_every_micro_batch``); unsharded gradients accumulate otherwise."""
    for stage in stages:
        stage.set_requires_gradient_sync(reduce)
        stage.set_is_last_backward(last)
