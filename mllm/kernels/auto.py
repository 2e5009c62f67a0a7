"""``model.attention_backend=auto``: the best attention kernel available for the tensors' device.

CUDA: flash-attn when installed (Ampere or newer), else FlexAttention when Triton is there, else SDPA.
CPU and other devices: SDPA (FlexAttention's CPU path is a dense reference, slower than SDPA's dense mask).
The choice is made once per device and logged, so a run's log says which kernel it actually used.
"""

from __future__ import annotations

import logging

import torch

from mllm.kernels.deps import is_available
from mllm.model.attention import (
    AttentionFn,
    AttentionMask,
    register_attention_backend,
    resolve_attention_backend,
)

log = logging.getLogger(__name__)


def select_attention_backend(device: torch.device | str) -> str:
    """Name of the kernel ``auto`` uses on ``device``: 'flash', 'flex' or 'sdpa'."""
    device = torch.device(device)
    if device.type != "cuda":
        return "sdpa"
    major, _ = torch.cuda.get_device_capability(device)
    if major >= 8 and is_available("flash_attn"):
        return "flash"
    if is_available("triton") and is_available("torch.nn.attention.flex_attention"):
        return "flex"
    return "sdpa"


_CHOSEN: dict[str, AttentionFn] = {}  # per device string; a plain dict so compiled blocks can read it


def _kernel_for(device: str) -> AttentionFn:
    if device not in _CHOSEN:
        name = select_attention_backend(device)
        log.info("model.attention_backend=auto uses %r on %s", name, device)
        _CHOSEN[device] = resolve_attention_backend(name)
    return _CHOSEN[device]


def auto_attention_kernel(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, scale: float
) -> torch.Tensor:
    return _kernel_for(str(q.device))(q, k, v, mask, scale)


register_attention_backend("auto", auto_attention_kernel)
