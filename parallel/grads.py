"""Gradient synchronization after backward, and global-norm clipping across tp/pp/dp.

Order after the last micro-batch's backward:
1. sequence-parallel parameters (norm weights in the SP region) all-reduce their partial gradients over tp;
2. all trainable gradients are summed over dp (the loss is already divided by the global token weight, so a
   sum, not a mean, gives the single-device gradient; micro-batches accumulate in ``.grad`` before this);
3. padding entries (dummy ViT heads, vocabulary padding) are zeroed so they never move.
Frozen parameters have no gradient and take no part. Under FSDP2 (``parallel.dp_shard`` > 1) step 2 is done by
FSDP's reduce-scatter during the backward; gradients are DTensors and everything here works on their local
shards (``parallel.fsdp.local_rows``), the norm summing the disjoint shards over dp_shard.
"""

from __future__ import annotations

import math

import torch

from parallel.comm import all_reduce_no_grad, group_size
from parallel.fsdp import local_rows, to_local

_BUCKET_ELEMENTS = 32 * 1024 * 1024


def _all_reduce_coalesced(tensors: list[torch.Tensor], group) -> None:
    """Sum ``tensors`` in place over ``group`` through flat buckets (one collective per bucket and dtype)."""
    if group_size(group) == 1 or not tensors:
        return
    buckets: dict[torch.dtype, list[list[torch.Tensor]]] = {}
    for t in tensors:
        per_dtype = buckets.setdefault(t.dtype, [[]])
        if sum(x.numel() for x in per_dtype[-1]) + t.numel() > _BUCKET_ELEMENTS and per_dtype[-1]:
            per_dtype.append([])
        per_dtype[-1].append(t)
    for per_dtype in buckets.values():
        for bucket in per_dtype:
            flat = torch.cat([t.reshape(-1) for t in bucket])
            all_reduce_no_grad(flat, group)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


@torch.no_grad()
def finish_grad_sync(pm) -> None:
    trainable = pm.trainable_parameters()
    for _, p in trainable:
        if p.grad is None:  # e.g. vision weights on a text-only step: every dp rank must still take part
            p.grad = torch.zeros_like(p)
    if pm.mesh.dp_shard == 1:
        reducer = getattr(pm, "grad_reducer", None)
        if reducer is not None:  # overlapped with the backward (parallel.overlap); finish what is left
            reducer.finish()
        else:
            _all_reduce_coalesced([p.grad for _, p in trainable], pm.mesh.dp_group)
    # After the dp sum has landed (the overlapped one still writes into these buffers until ``finish``); sums
    # over tp and dp commute.
    _all_reduce_coalesced([to_local(p.grad) for n, p in trainable if n in pm.sp_params], pm.tp.group)
    for name, p in trainable:
        spec = pm.specs.get(name)
        mask = spec.real_mask(pm.tp) if spec is not None else None
        if mask is not None:
            grad, row0 = local_rows(p.grad)
            if spec.dim == 0:
                mask = mask[row0 : row0 + grad.shape[0]]
            shape = [1] * p.ndim
            shape[spec.dim] = -1
            grad.mul_(mask.to(grad.device, grad.dtype).view(shape))


@torch.no_grad()
def global_grad_norm(pm) -> torch.Tensor:
    """L2 norm of the full gradient: tp-sharded gradients counted on every tp rank, replicated ones on tp rank
    0 only; summed over tp and pp. dp replicas hold identical (already summed) gradients and are not added."""
    total = torch.zeros((), dtype=torch.float32, device=pm.device)
    for name, p in pm.trainable_parameters():
        if p.grad is None:
            continue
        if name in pm.specs or pm.tp.rank == 0:
            total += to_local(p.grad).float().pow(2).sum()
    all_reduce_no_grad(total, pm.tp.group)
    all_reduce_no_grad(total, pm.mesh.pp_group)
    all_reduce_no_grad(total, pm.mesh.dp_shard_group)  # FSDP: disjoint shards (None without FSDP)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(pm, max_norm: float) -> torch.Tensor:
    """Scale gradients so the global norm is at most ``max_norm``; same formula as torch's clip_grad_norm_."""
    norm = global_grad_norm(pm)
    if not math.isfinite(float(norm)):
        return norm
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    for _, p in pm.trainable_parameters():
        if p.grad is not None:
            to_local(p.grad).mul_(coef)
    return norm
