"""Process-level setup: distributed init, device, precision, seeds, initial weights."""

from __future__ import annotations

import datetime
import os
import random
from collections.abc import Mapping
from functools import partial

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


def init_distributed(device: torch.device, timeout_s: int | None = None) -> None:
    """Default process group from torchrun's environment (a 1-rank group for plain ``python -m``). A collective
    that waits longer than ``timeout_s`` (default ``MLLM_COLLECTIVE_TIMEOUT_S``, else 600) fails the rank: a
    hung peer ends the job instead of holding it until the time limit."""
    if dist.is_initialized():
        return
    if timeout_s is None:
        timeout_s = int(os.environ.get("MLLM_COLLECTIVE_TIMEOUT_S", "600"))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    kwargs: dict = {"device_id": device} if device.type == "cuda" else {}
    store = elastic_attempt_store(timeout)
    if store is not None:
        kwargs.update(store=store, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(backend, timeout=timeout, **kwargs)


def elastic_attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The torchrun agent's store with keys private to this restart attempt (None outside torchrun's shared
    store).

    torchrun (torch >= 2.5, c10d rendezvous) shares its TCPStore with the workers and, unlike before, does not
    prefix the workers' keys per restart. After ``--max-restarts`` relaunches the workers, the previous
    attempt's keys are still there: a rank reading gloo's peer address (NCCL's unique id) before the new rank
    0 overwrote it connects to the dead process ("Connection refused" / a hang in init_process_group), a race
    that shows up under load (pytorch/pytorch#135712). Prefixing by the restart count restores the old
    isolation; every agent counts a failure that broke its workers, so the count agrees across nodes.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True):
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    client = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
    )
    return dist.PrefixStore(f"mllm/attempt_{attempt}/", client)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rank_seed(base: int, dp_rank: int, pp_rank: int) -> int:
    """Same across tensor-parallel ranks (their dropout / drop-path masks must agree), distinct elsewhere."""
    return base * 1_000_003 + pp_rank * 10_007 + dp_rank


def load_initial_state(run: RunConfig) -> Mapping[str, torch.Tensor] | None:
    """Full tensors (single-device names) from ``model.init_from`` and/or separate ViT / LLM checkpoints
    (``train.init_vision_from`` / ``train.init_llm_from``, which replace those parts of ``model.init_from``).

    With only part checkpoints (the usual start of stage 1), the remaining weights (the projector) get the
    seeded, layout-independent initialization of ``parallel``. None: initialize everything that way.
    The result is lazy: a tensor is read (or initialized) when accessed, so a rank reads only the tensors of
    its own pipeline stage instead of the whole checkpoint (a trainer checkpoint is still read whole).
    """
    if not (run.model.init_from or run.train.init_vision_from or run.train.init_llm_from):
        return None
    from mllm.convert import core
    from mllm.convert.lazy import LazyStateDict
    from parallel.build import init_full_tensor

    sd = LazyStateDict()
    if run.model.init_from:
        sd.update_from(core.read_checkpoint(run.model.init_from, lazy=True)[0])
    if run.train.init_vision_from:
        sd.update_from(core.read_vision_checkpoint(run.train.init_vision_from, run.model, lazy=True))
    if run.train.init_llm_from:
        sd.update_from(core.read_llm_checkpoint(run.train.init_llm_from, run.model, lazy=True))
    for name, shape in core.expected_shapes(run.model).items():
        if name not in sd:
            sd.add(name, shape, partial(init_full_tensor, name, torch.Size(shape), run.model, run.train.seed))
    return sd
