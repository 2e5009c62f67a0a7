"""The attention-backend seam.

Model code computes q, k, v and hands them to a ``CoreAttention`` module together with an ``AttentionMask``
that says which keys each query may see (causal or not, and the per-token segment ids of packed rows).
Backends only differ in the kernel: the reference is torch SDPA with a dense block-diagonal mask; FlexAttention,
flash-attn varlen and Transformer Engine register themselves here (``register_attention_backend``) so the model
never changes. Tensors are [batch, seq, heads, head_dim] ("bshd"), the layout flash-attn and TE use.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionMask:
    """Which keys a query may attend to.

    ``segment_ids`` [B, S]: tokens attend only within their own segment (packed samples); padding (id 0) attends
    only to padding, so no row is empty. ``None`` means one sample per row.
    """

    causal: bool
    segment_ids: torch.Tensor | None = None
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    def dense(self, seq_len: int, device: torch.device) -> torch.Tensor | None:
        """Boolean mask [B or 1, 1, S, S] (True = may attend), or None when plain causal/full suffices."""
        if self.segment_ids is None:
            return None
        if "dense" not in self._cache:
            seg = self.segment_ids.to(device)
            mask = seg[:, None, :, None] == seg[:, None, None, :]
            if self.causal:
                mask = mask & torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
            self._cache["dense"] = mask
        return self._cache["dense"]


AttentionFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMask, float], torch.Tensor]
_BACKENDS: dict[str, AttentionFn] = {}


def register_attention_backend(name: str, fn: AttentionFn) -> None:
    """Make ``fn(q, k, v, mask, scale) -> out`` (all bshd) selectable as ``model.attention_backend=name``."""
    _BACKENDS[name] = fn


def sdpa_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
) -> torch.Tensor:
    """Reference kernel: torch SDPA, GQA by repeating kv heads, dense mask for packed rows."""
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    dense = mask.dense(q.shape[2], q.device)
    if dense is None:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=mask.causal, scale=scale)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=dense, scale=scale)
    return out.transpose(1, 2)


register_attention_backend("sdpa", sdpa_attention)


def available_attention_backends() -> list[str]:
    return sorted(_BACKENDS)


def resolve_attention_backend(name: str) -> AttentionFn:
    """The kernel for ``name``; optional backends are imported lazily so a missing package is a clear error."""
    if name not in _BACKENDS:
        _try_register_optional(name)
    if name not in _BACKENDS:
        raise ValueError(
            f"model.attention_backend={name!r} is unknown; available: {', '.join(available_attention_backends())}"
        )
    return _BACKENDS[name]


def _try_register_optional(name: str) -> None:
    # Optional kernels live outside the model package and register on import.
    import importlib

    module = {
        "flex": "mllm.kernels.flex_attention",
        "flash": "mllm.kernels.flash_attention",
        "auto": "mllm.kernels.auto",
    }
    if name in module:
        try:
            importlib.import_module(module[name])
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith("mllm.kernels"):
                raise


def to_compute_dtype(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Give q, k, v one dtype: the autocast dtype when autocast is on.

    Under bf16 autocast with fp32 master weights, norms and RoPE return fp32 while projections return bf16, so
    q/k arrive in fp32 and v in bf16. SDPA casts by itself, but flash-attn, FlexAttention's backward and TE's
    DotProductAttention need a single low-precision dtype.
    """
    device_type = q.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        return q.to(dtype), k.to(dtype), v.to(dtype)
    return q, k, v


class CoreAttention(nn.Module):
    """Parameter-free attention kernel; swap the backend (or the whole module, e.g. for TE) from outside."""

    def __init__(self, backend: str = "sdpa") -> None:
        super().__init__()
        self.backend = backend
        self.fn = resolve_attention_backend(backend)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
    ) -> torch.Tensor:
        return self.fn(*to_compute_dtype(q, k, v), mask, scale)

    def extra_repr(self) -> str:
        return f"backend={self.backend}"
