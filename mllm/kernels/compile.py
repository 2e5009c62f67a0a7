"""``torch.compile`` of whole blocks (each ViT block and LLM decoder layer), as an option.

Per-block compilation keeps compile time bounded (one graph per distinct block, reused by all layers of the
same shape), composes with activation checkpointing and pipeline stages, and leaves parameter names unchanged:
each block's ``forward`` is replaced by a wrapper that first prepares the attention mask's per-forward data
eagerly (FlexAttention's BlockMask, flash-attn's cu_seqlens: both cached on the ``AttentionMask`` and built
once for all layers, outside any graph) and then calls the compiled forward.
"""

from __future__ import annotations

import re
import sys

import torch
from torch import nn

from mllm.model.attention import AttentionMask

_BLOCK_NAME = re.compile(r"(?:^|\.)layers\.\d+$")


def prepare_attention_mask(mask: AttentionMask, device: torch.device) -> None:
    """Build and cache whatever the loaded packed-row kernels need for ``mask`` (no-op without segments)."""
    if mask.segment_ids is None:
        return
    flex = sys.modules.get("mllm.kernels.flex_attention")
    if flex is not None:
        flex.block_mask_for(mask, device)
    if "mllm.kernels.flash_attention" in sys.modules or "parallel.te_backend" in sys.modules:
        from mllm.kernels.varlen import varlen_inputs

        varlen_inputs(mask, device)


class _PreparedCompiledForward:
    """A block's forward: prepare AttentionMask arguments eagerly, then run the compiled graph."""

    def __init__(self, compiled, device_of) -> None:
        self.compiled, self.device_of = compiled, device_of

    def __call__(self, *args, **kwargs):
        for arg in (*args, *kwargs.values()):
            if isinstance(arg, AttentionMask):
                prepare_attention_mask(arg, self.device_of())
        return self.compiled(*args, **kwargs)


def compile_blocks(
    model: nn.Module, *, mode: str | None = None, fullgraph: bool = False, backend: str = "inductor"
) -> list[str]:
    """Compile every block (modules named ``...layers.<i>``) of ``model`` in place; returns their names.

    ``mode``/``backend`` go to ``torch.compile`` (e.g. mode "max-autotune-no-cudagraphs"). Shapes are static per run
    (packed rows have a fixed length), so ``dynamic=False``.
    """
    names = [name for name, _ in model.named_modules() if _BLOCK_NAME.search(name)]
    for name in names:
        block = model.get_submodule(name)
        compiled = torch.compile(
            block.forward, mode=mode, fullgraph=fullgraph, dynamic=False, backend=backend
        )
        block.forward = _PreparedCompiledForward(compiled, lambda b=block: next(b.parameters()).device)
    return names
