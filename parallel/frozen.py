"""Frozen weights held in the compute dtype (``parallel.frozen_dtype=compute``).

A frozen parameter gets no gradient and no optimizer step, so an fp32 master copy of it buys nothing: under
bf16 autocast every matmul reads it as bf16 anyway. Holding it in the compute dtype halves its memory (the 26B
LoRA fine-tune on two GPUs: 24 GiB less per rank, room to skip activation recompute), as DeepSpeed's bf16 mode
holds frozen weights; ``mllm.train.planner`` counts it the same way. The token
embedding stays fp32 even when frozen: its rows start the residual stream, which stays fp32 under autocast.
Trainable parameters (and LoRA adapters) keep their fp32 master weights.
"""

from __future__ import annotations

import torch
from torch import nn

KEPT_FP32 = ("llm.embed_tokens.",)  # frozen parameters that stay fp32 (see the module docstring)


def holds_in_compute_dtype(name: str, param: nn.Parameter) -> bool:
    """Whether ``parallel.frozen_dtype=compute`` casts this parameter."""
    return not param.requires_grad and not name.startswith(KEPT_FP32)


@torch.no_grad()
def hold_frozen_in(module: nn.Module, dtype: torch.dtype) -> None:
    """Cast the frozen parameters of ``module`` (full-model names) to ``dtype`` in place."""
    for name, param in module.named_parameters():
        if holds_in_compute_dtype(name, param):
            param.data = param.data.to(dtype)
