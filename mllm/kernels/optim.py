"""Fused AdamW selection: one kernel for all parameters instead of a loop of small ones."""

from __future__ import annotations

from collections.abc import Iterable

import torch

ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


def adamw_implementation_kwargs(params: Iterable[torch.Tensor], choice: str = "auto") -> dict[str, bool]:
    """Keyword arguments for ``torch.optim.AdamW`` selecting its implementation.

    ``auto``: ``fused=True`` when every parameter is a floating-point tensor on CUDA (the fastest path),
    else ``foreach=True`` (multi-tensor kernels, any device). ``fused`` forces the fused kernel (torch also has
    it on CPU). DTensor parameters are treated like their local shards by torch.
    """
    if choice not in ADAMW_IMPLEMENTATIONS:
        raise ValueError(f"optim.implementation={choice!r}: use one of {', '.join(ADAMW_IMPLEMENTATIONS)}")
    if choice == "fused":
        return {"fused": True}
    if choice == "foreach":
        return {"foreach": True}
    if choice == "for_loop":
        return {"foreach": False}
    params = list(params)
    on_cuda = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if on_cuda else {"foreach": True}


def build_adamw(
    param_groups: list[dict] | Iterable[torch.Tensor], choice: str = "auto", **kwargs
) -> torch.optim.AdamW:
    """``torch.optim.AdamW(param_groups, **kwargs)`` with the implementation chosen by ``choice``."""
    groups = list(param_groups)
    tensors = [p for g in groups for p in g["params"]] if groups and isinstance(groups[0], dict) else groups
    return torch.optim.AdamW(groups, **kwargs, **adamw_implementation_kwargs(tensors, choice))
