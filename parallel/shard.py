"""How each parameter is split over tensor-parallel ranks, and moving between full and local tensors.

A parameter without a ``ShardSpec`` is replicated over tp. A sharded one is split along ``dim`` into tp equal
chunks after zero-padding from ``full`` to ``padded`` (dummy ViT heads, vocabulary padding); the padding is
stripped again when gathering, so full tensors always have the single-device model's shapes and names.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from parallel.comm import all_gather_no_grad
from parallel.layers import TPInfo


@dataclass(frozen=True)
class ShardSpec:
    dim: int
    full: int
    padded: int

    def local_size(self, tp_size: int) -> int:
        return self.padded // tp_size

    def real_mask(self, tp: TPInfo) -> torch.Tensor | None:
        """Bool [local size] marking entries that exist in the full tensor (None when nothing is padding)."""
        if self.padded == self.full:
            return None
        n = self.local_size(tp.size)
        return torch.arange(tp.rank * n, (tp.rank + 1) * n) < self.full

    def real_extent(self, tp_rank: int, tp_size: int) -> tuple[int, int]:
        """(offset in the full tensor, number of real entries) of rank ``tp_rank``'s shard along ``dim``: the
        shard's first ``length`` entries are real, the rest is padding (``length`` may be 0)."""
        n = self.local_size(tp_size)
        start = tp_rank * n
        return start, max(0, min(n, self.full - start))


def pad_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def shard_full_tensor(full: torch.Tensor, spec: ShardSpec | None, tp: TPInfo) -> torch.Tensor:
    """This rank's shard of a full (unpadded) tensor."""
    if spec is None:
        return full
    if full.shape[spec.dim] != spec.full:
        raise ValueError(f"expected size {spec.full} along dim {spec.dim}, got shape {tuple(full.shape)}")
    if spec.padded != spec.full:
        pad = [0, 0] * full.ndim
        pad[2 * (full.ndim - 1 - spec.dim) + 1] = spec.padded - spec.full  # F.pad lists the last dim first
        full = F.pad(full, pad)
    n = spec.local_size(tp.size)
    return full.narrow(spec.dim, tp.rank * n, n)


def gather_full_tensor(local: torch.Tensor, spec: ShardSpec | None, tp: TPInfo) -> torch.Tensor:
    """The full, unpadded tensor from every tp rank's shard (a collective over tp when sharded)."""
    if spec is None:
        return local.detach()
    full = all_gather_no_grad(local, tp.group, spec.dim)
    return full.narrow(spec.dim, 0, spec.full)
