"""Tensor-parallel layers and the layer-backend seam.

The seam (``LayerBackend``) is three factories. The parallel blocks in ``parallel.blocks`` only ever call them,
so another backend (Transformer Engine, ``parallel.te_backend``) can swap the GEMMs and the attention kernel::

    column_linear(in_features, out_features, *, bias, tp, sequence_parallel) -> nn.Module
        Holds ``weight`` [out_features // tp.size, in_features] (and ``bias`` [out_features // tp.size]):
        rows ``tp.rank * out/tp ...`` of the full (padded) weight. Input: the activation of the surrounding
        region, replicated [.., in] or, with ``sequence_parallel``, split over dim 1 (sequence). The module
        does the entry communication itself (identity/all-reduce-grad, or all-gather/reduce-scatter-grad).
        Output: this rank's slice of the features [.., S, out // tp].
    row_linear(in_features, out_features, *, bias, tp, sequence_parallel) -> nn.Module
        Holds ``weight`` [out_features, in_features // tp.size] (columns of the full weight) and a full,
        replicated ``bias`` [out_features] added once after the reduction. Input: local features. Output:
        all-reduced [.., S, out], or reduce-scattered over the sequence with ``sequence_parallel``.
    core_attention(attention_backend, *, tp) -> nn.Module
        Parameter-free, called as ``(q, k, v, mask: AttentionMask, scale) -> out`` on local heads (bshd).

The torch backend's linears run their local GEMM through a ``local_gemm(x, weight, bias)`` attribute
(``F.linear`` by default) so precision recipes (FP8) can replace just the shard's GEMM.

``out_features``/``in_features`` are the full sizes after any padding (dummy heads, vocabulary padding); a
backend never sees the padding logic. Parameter names and local shapes must be exactly these so checkpoints
and ``ParallelModel`` state-dict hooks move between backends unchanged. Backends are looked up by name in
``parallel.backends`` (``get_layer_backend``, ``register_layer_backend``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from mllm.model.attention import CoreAttention
from parallel.comm import (
    all_reduce_partial_statistic,
    copy_to_tensor_parallel,
    gather_from_sequence_parallel,
    reduce_from_tensor_parallel,
    reduce_scatter_to_sequence_parallel,
)


@dataclass(frozen=True)
class TPInfo:
    """What a tensor-parallel module needs to know: shard count, its index, the group (None on meta)."""

    size: int = 1
    rank: int = 0
    group: ProcessGroup | None = None

    def local(self, n: int, what: str) -> int:
        if n % self.size:
            raise ValueError(f"{what}={n} is not divisible by tp={self.size}")
        return n // self.size


def _enter_region(x: torch.Tensor, tp: TPInfo, sequence_parallel: bool) -> torch.Tensor:
    if sequence_parallel:
        return gather_from_sequence_parallel(x, tp.group, dim=1)
    return copy_to_tensor_parallel(x, tp.group)


def _leave_region(x: torch.Tensor, tp: TPInfo, sequence_parallel: bool) -> torch.Tensor:
    if sequence_parallel:
        return reduce_scatter_to_sequence_parallel(x, tp.group, dim=1)
    return reduce_from_tensor_parallel(x, tp.group)


class ColumnParallelLinear(nn.Module):
    """Y_local = X @ W[rows of this rank]^T + b_local (Megatron's column-parallel linear)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, tp: TPInfo, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.tp, self.sequence_parallel = tp, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        local = tp.local(out_features, "column-parallel out_features")
        self.weight = nn.Parameter(torch.empty(local, in_features))
        self.bias = nn.Parameter(torch.empty(local)) if bias else None
        # (x, weight, bias) -> y on the local shard; FP8 swaps it (mllm.kernels.fp8).
        self.local_gemm = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.local_gemm(_enter_region(x, self.tp, self.sequence_parallel), self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}/tp{self.tp.size}, sp={self.sequence_parallel}"


class RowParallelLinear(nn.Module):
    """Y = reduce(X_local @ W[:, cols of this rank]^T) + b (Megatron's row-parallel linear)."""

    def __init__(
        self, in_features: int, out_features: int, *, bias: bool, tp: TPInfo, sequence_parallel: bool = False
    ) -> None:
        super().__init__()
        self.tp, self.sequence_parallel = tp, sequence_parallel
        self.in_features, self.out_features = in_features, out_features
        local = tp.local(in_features, "row-parallel in_features")
        self.weight = nn.Parameter(torch.empty(out_features, local))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        # (x, weight, bias) -> y on the local shard; FP8 swaps it (mllm.kernels.fp8).
        self.local_gemm = F.linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _leave_region(self.local_gemm(x, self.weight, None), self.tp, self.sequence_parallel)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in={self.in_features}/tp{self.tp.size}, out={self.out_features}, sp={self.sequence_parallel}"


class VocabParallelEmbedding(nn.Module):
    """Rows [rank*V/tp, (rank+1)*V/tp) of the (padded) table; other ids give zeros; all-reduce joins them."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, tp: TPInfo) -> None:
        super().__init__()
        self.tp = tp
        self.num_embeddings = num_embeddings
        self.local_rows = tp.local(num_embeddings, "padded vocabulary")
        self.start = tp.rank * self.local_rows
        self.weight = nn.Parameter(torch.empty(self.local_rows, embedding_dim))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local_ids = input_ids - self.start
        outside = (local_ids < 0) | (local_ids >= self.local_rows)
        out = F.embedding(local_ids.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_from_tensor_parallel(out, self.tp.group)


class TensorParallelRMSNorm(nn.Module):
    """RMSNorm over a width split across tp ranks (InternViT's QK-norm spans all heads jointly).

    The sum of squares is all-reduced over tp and divided by the *real* width, so zero dummy heads (padding to
    a multiple of tp) do not change the statistic. Same fp32 arithmetic as ``mllm.model.norms.RMSNorm``.
    """

    def __init__(self, local_width: int, real_width: int, eps: float, *, tp: TPInfo) -> None:
        super().__init__()
        self.tp, self.real_width, self.eps = tp, real_width, eps
        self.weight = nn.Parameter(torch.empty(local_width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        sum_sq = all_reduce_partial_statistic(x32.pow(2).sum(-1, keepdim=True), self.tp.group)
        x32 = x32 * torch.rsqrt(sum_sq / self.real_width + self.eps)
        return self.weight * x32.to(dtype)


class TorchLayerBackend:
    """The reference backend: plain torch GEMMs with the primitives of ``parallel.comm``."""

    name = "torch"

    def column_linear(
        self, in_features: int, out_features: int, *, bias: bool, tp: TPInfo, sequence_parallel: bool = False
    ) -> nn.Module:
        return ColumnParallelLinear(
            in_features, out_features, bias=bias, tp=tp, sequence_parallel=sequence_parallel
        )

    def row_linear(
        self, in_features: int, out_features: int, *, bias: bool, tp: TPInfo, sequence_parallel: bool = False
    ) -> nn.Module:
        return RowParallelLinear(
            in_features, out_features, bias=bias, tp=tp, sequence_parallel=sequence_parallel
        )

    def core_attention(self, attention_backend: str, *, tp: TPInfo) -> nn.Module:
        return CoreAttention(attention_backend)


LayerBackend = TorchLayerBackend  # the protocol: any object with the same three factory methods
