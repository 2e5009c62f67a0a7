"""AdamW over a ``ParallelModel``'s local shards, optionally with its state sharded over data parallel (ZeRO-1).

Padding entries (dummy ViT heads, vocabulary padding) are exactly zero with exactly zero gradients
(``parallel.grads`` masks them), so AdamW's update (0 / (sqrt(0) + eps)) and decoupled decay (lr * wd * 0)
leave them at zero: they never need to be excluded from the optimizer.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


def param_groups(named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """Decay matrices and embeddings; no decay for biases, norm weights and layer scales (ndim < 2).

    Works on full or sharded parameters alike (sharding keeps ndim), so the single-device reference and every
    layout get the same groups.
    """
    decay, no_decay = [], []
    for _, p in named_params:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    pm,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    shard_state: bool | None = None,
) -> torch.optim.Optimizer:
    """AdamW over trainable local shards. ``shard_state`` (default ``pcfg.shard_optimizer``) partitions the
    optimizer state over the dp group: each dp rank updates the parameters it owns and broadcasts them."""
    shard_state = pm.pcfg.shard_optimizer if shard_state is None else shard_state
    groups = [g for g in param_groups(pm.named_parameters(), weight_decay) if g["params"]]
    if shard_state and pm.mesh.dp > 1:
        from torch.distributed.optim import ZeroRedundancyOptimizer

        first, *rest = groups
        opt = ZeroRedundancyOptimizer(
            first["params"],
            optimizer_class=torch.optim.AdamW,
            process_group=pm.mesh.dp_group,
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=first["weight_decay"],
        )
        for group in rest:
            opt.add_param_group(group)
        return opt
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held by this rank (for the start-up report)."""
    inner = getattr(opt, "optim", opt)  # ZeroRedundancyOptimizer wraps the local shard's optimizer
    return sum(
        v.numel() * v.element_size()
        for state in inner.state.values()
        for v in state.values()
        if isinstance(v, torch.Tensor)
    )
