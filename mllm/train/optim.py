"""AdamW parameter groups (weight decay, per-module lr multipliers, ViT layer-wise decay) and lr schedules."""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatch

import torch
from torch import nn

from mllm.kernels.optim import adamw_implementation_kwargs
from mllm.train.config import OptimConfig

# Wrappers (activation checkpointing, torch.compile, DDP) insert these into parameter names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module.", "_orig_mod.", "module.", "_fsdp_wrapped_module.")
_VIT_BLOCK = re.compile(r"(?:^|\.)vision\.layers\.(\d+)\.")


def canonical_name(name: str) -> str:
    """A parameter name without wrapper prefixes, as the single-device model names it."""
    for part in _WRAPPER_PARTS:
        name = name.replace(part, "")
    return name


def is_no_decay(name: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch(name, pattern) for pattern in patterns)


def lr_multiplier(name: str, lr_mult: dict[str, float]) -> float:
    """The multiplier of the longest module prefix of ``name`` in ``lr_mult`` (1.0 when none matches)."""
    best, best_len = 1.0, -1
    for prefix, mult in lr_mult.items():
        if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
            best, best_len = float(mult), len(prefix)
    return best


def vit_layer_scale(name: str, num_vit_layers: int, decay: float) -> float:
    """BEiT-style layer-wise decay: block i -> decay^(L - i), ViT embeddings -> decay^(L + 1), rest 1."""
    if decay == 1.0 or not name.startswith("vision."):
        return 1.0
    match = _VIT_BLOCK.search(name)
    if match:
        return decay ** (num_vit_layers - int(match.group(1)))
    if name.startswith("vision.embeddings."):
        return decay ** (num_vit_layers + 1)
    return 1.0


@dataclass
class GroupKey:
    weight_decay: float
    lr_scale: float


def build_param_groups(
    named_params: Iterable[tuple[str, nn.Parameter]], cfg: OptimConfig, num_vit_layers: int
) -> list[dict]:
    """AdamW groups keyed by (weight decay, lr scale); frozen parameters (requires_grad False) are left out.

    Each group carries ``lr_scale`` (applied by ``LRSchedule``) and ``names`` (for logs and tests).
    """
    groups: dict[tuple[float, float], dict] = {}
    for raw_name, param in named_params:
        if not param.requires_grad:
            continue
        name = canonical_name(raw_name)
        wd = 0.0 if is_no_decay(name, cfg.no_decay) else cfg.weight_decay
        scale = lr_multiplier(name, cfg.lr_mult) * vit_layer_scale(name, num_vit_layers, cfg.vit_layer_decay)
        group = groups.setdefault(
            (wd, scale), {"params": [], "names": [], "weight_decay": wd, "lr_scale": scale}
        )
        group["params"].append(param)
        group["names"].append(name)
    return [groups[key] for key in sorted(groups)]


def _torch_groups(groups: list[dict]) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


def _implementation(groups: list[dict], cfg: OptimConfig) -> dict[str, bool]:
    """``optim.implementation`` (auto | fused | foreach | for_loop) as AdamW keyword arguments."""
    return adamw_implementation_kwargs([p for g in groups for p in g["params"]], cfg.implementation)


def build_adamw(groups: list[dict], cfg: OptimConfig) -> torch.optim.AdamW:
    """Plain AdamW over the groups (every data-parallel rank holds the whole optimizer state)."""
    return torch.optim.AdamW(
        _torch_groups(groups),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **_implementation(groups, cfg),
    )


def build_sharded_adamw(groups: list[dict], cfg: OptimConfig, dp_group) -> torch.optim.Optimizer:
    """ZeRO-1: AdamW with its state partitioned over ``dp_group`` (``parallel.shard_optimizer``).

    ``ZeroRedundancyOptimizer`` assigns each parameter to one dp rank (greedily by size, group by group, so
    every tp rank of a replica makes the same assignment: their shards have equal sizes); the owner updates
    it and broadcasts it to the other replicas. Its ``param_groups`` are the global groups, so
    ``LRSchedule.apply`` works unchanged (they are copied into the local optimizer at each step). The update
    of each parameter is the plain AdamW update, so losses match the unsharded optimizer.
    """
    from torch.distributed.optim import ZeroRedundancyOptimizer

    return ZeroRedundancyOptimizer(
        _torch_groups(groups),
        optimizer_class=torch.optim.AdamW,
        process_group=dp_group,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **_implementation(groups, cfg),
    )


class LRSchedule:
    """Linear warmup from 0, then cosine / linear decay to ``lr * min_lr_ratio`` or constant.

    The schedule is a pure function of the step, so its checkpointed state is only the step.
    """

    def __init__(self, cfg: OptimConfig, total_steps: int) -> None:
        if cfg.schedule not in ("cosine", "linear", "constant"):
            raise ValueError(f"optim.schedule must be cosine, linear or constant, got {cfg.schedule!r}")
        self.cfg = cfg
        self.total_steps = max(1, total_steps)
        self.warmup = (
            cfg.warmup_steps if cfg.warmup_steps is not None else int(round(cfg.warmup_ratio * total_steps))
        )
        self.step_count = 0

    def factor(self, step: int) -> float:
        """Multiplier of the base lr for the update made at ``step`` (0-based)."""
        if step < self.warmup:
            return (step + 1) / self.warmup
        if self.cfg.schedule == "constant":
            return 1.0
        decay_steps = max(1, self.total_steps - self.warmup)
        progress = min(1.0, (step - self.warmup) / decay_steps)
        floor = self.cfg.min_lr_ratio
        if self.cfg.schedule == "linear":
            return floor + (1.0 - floor) * (1.0 - progress)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def lr(self, step: int) -> float:
        return self.cfg.lr * self.factor(step)

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's lr for ``step``; returns the base lr (lr_scale 1)."""
        base = self.lr(step)
        for group in optimizer.param_groups:
            group["lr"] = base * group.get("lr_scale", 1.0)
        self.step_count = step
        return base

    def state_dict(self) -> dict:
        return {"step": self.step_count, "total_steps": self.total_steps, "warmup": self.warmup}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step"])
