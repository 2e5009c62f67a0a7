"""Differentiable communication primitives for tensor and sequence parallelism.

Each primitive is a small autograd function whose forward and backward are conjugate collectives over an
explicit process group (no global state). ``group=None`` or a group of size 1 makes every primitive the
identity, so the same layer code runs unsharded (and on the meta device for memory reports).

Naming follows Megatron's regions: a *tensor-parallel region* is where activations are split over the hidden
(head / ffn) dimension; a *sequence-parallel region* is where they are split over the sequence dimension.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def group_size(group: ProcessGroup | None) -> int:
    return 1 if group is None else dist.get_world_size(group)


def group_rank(group: ProcessGroup | None) -> int:
    return 0 if group is None else dist.get_rank(group)


def _all_reduce(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    if group_size(group) == 1:
        return x
    x = x.contiguous().clone()
    dist.all_reduce(x, group=group)
    return x


def _all_gather(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(size)]
    dist.all_gather(parts, x, group=group)
    return torch.cat(parts, dim=dim)


def _reduce_scatter(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(f"cannot reduce-scatter dim {dim} of size {x.shape[dim]} over {size} ranks")
    parts = [p.contiguous() for p in x.chunk(size, dim=dim)]
    out = torch.empty_like(parts[0])
    dist.reduce_scatter(out, parts, group=group)
    return out


def _split(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    size = group_size(group)
    if size == 1:
        return x
    if x.shape[dim] % size:
        raise ValueError(
            f"sequence length {x.shape[dim]} is not divisible by tp={size}: pad packed rows to a multiple of "
            f"tp when parallel.sequence_parallel is on"
        )
    return x.chunk(size, dim=dim)[group_rank(group)].contiguous()


class _CopyToTensorParallel(torch.autograd.Function):
    """Enter a TP region from replicated activations: identity forward, all-reduce of gradients backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _ReduceFromTensorParallel(torch.autograd.Function):
    """Leave a TP region: all-reduce of partial sums forward; backward identity (consumers are replicated)."""

    @staticmethod
    def forward(ctx, x, group):
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _AllReducePartialStatistic(torch.autograd.Function):
    """Sum a statistic whose consumers stay sharded (QK-norm's sum of squares): all-reduce both ways.

    Every rank uses the total to normalize its *own* shard, so the gradient of the total is the sum of the
    per-rank gradients, hence the all-reduce in backward too.
    """

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, grad):
        return _all_reduce(grad, ctx.group), None


class _GatherFromSequenceParallel(torch.autograd.Function):
    """Leave an SP region into a TP region: all-gather over the sequence, reduce-scatter of gradients."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _reduce_scatter(grad, ctx.group, ctx.dim), None, None


class _ReduceScatterToSequenceParallel(torch.autograd.Function):
    """Leave a TP region into an SP region: reduce-scatter of partial sums, all-gather of gradients."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _reduce_scatter(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _ScatterToSequenceParallel(torch.autograd.Function):
    """Enter an SP region from replicated activations: keep this rank's chunk, all-gather gradients."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _split(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _all_gather(grad, ctx.group, ctx.dim), None, None


class _GatherToReplicated(torch.autograd.Function):
    """Leave an SP region into replicated consumers (the ViT's output into the projector): all-gather forward;
    backward keeps this rank's chunk, since replicated consumers give every rank the same full gradient."""

    @staticmethod
    def forward(ctx, x, group, dim):
        ctx.group, ctx.dim = group, dim
        return _all_gather(x, group, dim)

    @staticmethod
    def backward(ctx, grad):
        return _split(grad, ctx.group, ctx.dim), None, None


def copy_to_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group_size(group) == 1 else _CopyToTensorParallel.apply(x, group)


def reduce_from_tensor_parallel(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceFromTensorParallel.apply(x, group)


def all_reduce_partial_statistic(x: torch.Tensor, group: ProcessGroup | None) -> torch.Tensor:
    return x if group_size(group) == 1 else _AllReducePartialStatistic.apply(x, group)


def gather_from_sequence_parallel(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherFromSequenceParallel.apply(x, group, dim)


def reduce_scatter_to_sequence_parallel(
    x: torch.Tensor, group: ProcessGroup | None, dim: int = 1
) -> torch.Tensor:
    return x if group_size(group) == 1 else _ReduceScatterToSequenceParallel.apply(x, group, dim)


def scatter_to_sequence_parallel(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    return x if group_size(group) == 1 else _ScatterToSequenceParallel.apply(x, group, dim)


def gather_to_replicated(x: torch.Tensor, group: ProcessGroup | None, dim: int = 1) -> torch.Tensor:
    return x if group_size(group) == 1 else _GatherToReplicated.apply(x, group, dim)


def all_reduce_no_grad(x: torch.Tensor, group: ProcessGroup | None, op=dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce outside autograd (statistics, gradients, losses for logging)."""
    if group_size(group) > 1:
        dist.all_reduce(x, op=op, group=group)
    return x


def all_gather_no_grad(x: torch.Tensor, group: ProcessGroup | None, dim: int) -> torch.Tensor:
    """Concatenate every rank's tensor along ``dim`` outside autograd (checkpoint gathering)."""
    return _all_gather(x.detach(), group, dim)
