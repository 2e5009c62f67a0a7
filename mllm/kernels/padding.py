"""Exact row padding for FP8 GEMMs.

FP8 GEMMs (``torch._scaled_mm``) need every dimension that is reduced over to be a multiple of 16. In the
weight-gradient GEMM (grad_out^T @ input) that is the token count, and a ViT tile has 1025 tokens (1024 patches
+ CLS), so N tiles give N * 1025 rows. Padding the rows with zeros before such a linear and slicing them off
after changes nothing: rows are independent in a linear, zero rows add zero to the weight gradient, and they do
not change a tensorwise amax (nor a rowwise one along the token axis) so the FP8 scales are the same.

Applied by swapping the module's class for a padded subclass, so parameter names, state dicts and the
optimizer see the same module.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

FP8_ROW_MULTIPLE = 16


def pad_rows(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, int]:
    """[..., K] -> ([M', K] zero-padded to a multiple of ``multiple`` rows, original row count M)."""
    rows = x.reshape(-1, x.shape[-1])
    m = rows.shape[0]
    pad = -m % multiple
    return (F.pad(rows, (0, 0, 0, pad)) if pad else rows), m


class _RowPadded:
    """Mixin: run the wrapped linear's forward on rows padded to ``row_multiple`` and strip the padding."""

    row_multiple: int = FP8_ROW_MULTIPLE

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.numel() // x.shape[-1]) % self.row_multiple == 0:
            return super().forward(x)
        padded, m = pad_rows(x, self.row_multiple)
        out = super().forward(padded)
        return out[:m].reshape(*x.shape[:-1], out.shape[-1])


@functools.cache
def _padded_class(cls: type) -> type:
    return type(f"RowPadded{cls.__name__}", (_RowPadded, cls), {})


def pad_linear_rows(module: nn.Module, multiple: int = FP8_ROW_MULTIPLE) -> nn.Module:
    """Make ``module`` (a linear taking [..., K]) pad its input rows to ``multiple``; same object, same names."""
    if not isinstance(module, _RowPadded):
        module.__class__ = _padded_class(type(module))
    module.row_multiple = multiple
    return module


def pad_rows_where(model: nn.Module, predicate, multiple: int = FP8_ROW_MULTIPLE) -> list[str]:
    """Apply ``pad_linear_rows`` to every submodule whose (name, module) satisfies ``predicate``."""
    names = [name for name, m in model.named_modules() if predicate(name, m)]
    for name in names:
        pad_linear_rows(model.get_submodule(name), multiple)
    return names
