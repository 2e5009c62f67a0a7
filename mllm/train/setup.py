"""Process-level setup: distributed init, device, precision, seeds, initial weights."""

from __future__ import annotations

import datetime
import os
import random

import numpy as np
import torch
import torch.distributed as dist

from mllm.train.config import RunConfig


def world_size_from_env() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(run: RunConfig) -> torch.device:
    if run.train.device == "cuda" or (run.train.device == "auto" and torch.cuda.is_available()):
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def compute_dtype(run: RunConfig, device: torch.device) -> torch.dtype:
    """bf16 autocast on GPU (fp32 master weights and fp32 gradients), fp32 on CPU unless asked otherwise."""
    if run.train.dtype == "bf16" or (run.train.dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return torch.float32


def init_distributed(device: torch.device, timeout_s: int = 600) -> None:
    """Default process group from torchrun's environment (a 1-rank group for plain ``python -m``)."""
    if dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(base: int, dp_rank: int, pp_rank: int) -> int:
    """Same across tensor-parallel ranks (their dropout / drop-path masks must agree), distinct elsewhere."""
    return base * 1_000_003 + pp_rank * 10_007 + dp_rank


def load_initial_state(run: RunConfig) -> dict[str, torch.Tensor] | None:
    """Full tensors (single-device names) from ``model.init_from`` and/or separate ViT / LLM checkpoints.

    With only part checkpoints (the usual start of stage 1), the remaining weights (the projector) get the
    seeded, layout-independent initialization of ``parallel``. None: initialize everything that way.
    """
    parts = [
        (p, name)
        for p, name in ((run.train.init_vision_from, "vision"), (run.train.init_llm_from, "llm"))
        if p
    ]
    if not run.model.init_from and not parts:
        return None
    from mllm.convert import core

    sd: dict[str, torch.Tensor] = {}
    if run.model.init_from:
        sd, _ = core.read_checkpoint(run.model.init_from)
    for path, part in parts:
        reader = getattr(core, f"read_{part}_checkpoint", None)
        if reader is None:
            raise NotImplementedError(
                f"train.init_{part}_from={path}: reading a separate {part} checkpoint needs "
                f"mllm.convert.core.read_{part}_checkpoint(path, model_cfg), which does not exist yet; convert "
                "a full InternVL checkpoint and use model.init_from"
            )
        sd.update(reader(path, run.model))
    from parallel.build import init_full_tensor

    for name, shape in core.expected_shapes(run.model).items():
        if name not in sd:
            sd[name] = init_full_tensor(name, torch.Size(shape), run.model, run.train.seed)
    return sd
