"""What goes into a checkpoint, as this rank's shards placed in the single-device tensors, and back.

Every entry is keyed by a single-device name (``model/<param>``, ``optim/<param>/<state>``) and holds only what
this rank owns, without copies (detached views of the parameters and AdamW states):

- a tensor-parallel parameter (and its ``exp_avg`` / ``exp_avg_sq``) contributes its local shard minus the
  padding (dummy ViT heads, vocabulary padding), placed at its offset in the unpadded full tensor (``Chunk``);
  a shard that is all padding contributes nothing;
- a replicated parameter is offered whole by every tp rank (DCP's planner writes it once).

``mllm.train.checkpoint``'s planners hand the chunks to ``torch.distributed.checkpoint`` (DCP), which writes
every element once and, on load, reads each rank's chunk from whichever saved chunks overlap it: a checkpoint
written at tp2 x pp2 loads at dp2 or pp4, into the TE backend (same local shards), or in one process into full
tensors (export). Pipeline ranks offer disjoint names (their stages' parameters); with a sharded (ZeRO-1)
optimizer each data-parallel rank offers the states of the parameters it owns. Under FSDP2
(``parallel.dp_shard``) a parameter and its AdamW states are DTensors sharded along dim 0 of the tp-local
tensor: the local rows are offered at their row offset added to the tensor-parallel placement, so a checkpoint
moves between dp_shard layouts (and to tp/pp layouts without FSDP) like any other. Nothing full-size is
materialized on any rank.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from parallel.fsdp import is_sharded, local_rows
from parallel.shard import ShardSpec

ADAM_TENSOR_STATES = ("exp_avg", "exp_avg_sq")


@dataclass(frozen=True)
class Chunk:
    """Where a saved local tensor sits in the full (single-device, unpadded) tensor."""

    offsets: tuple[int, ...]
    global_size: tuple[int, ...]


@dataclass
class ShardedState:
    """``tensors``: name -> this rank's real part (a view into the live tensor); ``chunks``: name -> its
    placement, for tensor-parallel entries only (the others are whole tensors at offset 0)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    chunks: dict[str, Chunk] = field(default_factory=dict)
    # name -> (local tensor, spec) of every tensor-parallel entry, to zero its padding after a load.
    padded: dict[str, tuple[torch.Tensor, ShardSpec]] = field(default_factory=dict)
    # name -> AdamW step tensor (0-dim); saved as a [1] copy, restored by ``restore``.
    steps: dict[str, torch.Tensor] = field(default_factory=dict)


def inner_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds the local state (ZeroRedundancyOptimizer keeps it in ``.optim``)."""
    return getattr(opt, "optim", opt)


@torch.no_grad()
def init_optimizer_state(opt: torch.optim.Optimizer) -> None:
    """Zero AdamW state for every local parameter, identical to fresh state (step 0, zero moments).

    Done once at start so that the state exists before the first (possibly skipped) step: checkpoints then
    always have the same keys, and a resume into a fresh optimizer has a template to load into.
    """
    inner = inner_optimizer(opt)
    for group in inner.param_groups:
        for p in group["params"]:
            state = inner.state[p]
            if state:
                continue
            state["step"] = torch.zeros((), dtype=torch.float32, device=step_device(group, p))
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def step_device(group: dict, p: torch.Tensor) -> torch.device:
    """Where torch's AdamW keeps ``step``: on the parameter's device for the fused and capturable kernels
    (they read it there; torch/optim/adam.py ``_init_group``), on the CPU otherwise."""
    return p.device if group.get("fused") or group.get("capturable") else torch.device("cpu")


def _owned(pm, opt) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable local parameters whose optimizer state lives on this rank, in a rank-independent order."""
    inner = inner_optimizer(opt)
    return [(n, p) for n, p in pm.trainable_parameters() if p in inner.state]


def _add(out: ShardedState, key: str, tensor: torch.Tensor, spec: ShardSpec | None, pm) -> None:
    """Offer ``tensor`` (this rank's tp shard of a tensor described by ``spec``; under FSDP a DTensor holding
    rows ``row0..`` of it) under ``key``."""
    sharded = is_sharded(tensor)
    local, row0 = local_rows(tensor.detach())
    tp_shape = list(tensor.shape)  # the whole tp-local shape (a DTensor's global shape)
    if spec is None and not sharded:
        out.tensors[key] = local
        return
    offsets, size, real = [0] * local.ndim, list(tp_shape), local
    if local.ndim:
        offsets[0] = row0
    if spec is not None:
        out.padded[key] = (local, spec)
        start, length = spec.real_extent(pm.tp.rank, pm.tp.size)
        # Real entries along spec.dim are [0, length) of the tp-local tensor; along dim 0 this shard holds
        # [row0, row0 + rows).
        keep = min(length - row0, local.shape[0]) if spec.dim == 0 else length
        if keep <= 0:  # only dummy heads / vocabulary padding: nothing of the full tensor lives here
            return
        real = local.narrow(spec.dim, 0, keep)
        offsets[spec.dim] += start
        size[spec.dim] = spec.full
    if real.numel() == 0:  # an empty FSDP shard (more dp_shard ranks than rows)
        return
    out.tensors[key] = real
    out.chunks[key] = Chunk(tuple(offsets), tuple(size))


@torch.no_grad()
def checkpoint_state(pm, opt) -> ShardedState:
    """This rank's model shards and owned AdamW states, as views (no communication, no copies but the steps)."""
    out = ShardedState()
    for name, p in pm.named_parameters():
        _add(out, f"model/{name}", p, pm.specs.get(name), pm)
    inner = inner_optimizer(opt)
    for name, p in _owned(pm, opt):
        state = inner.state[p]
        for key in ADAM_TENSOR_STATES:
            _add(out, f"optim/{name}/{key}", state[key], pm.specs.get(name), pm)
        step_key = f"optim/{name}/step"
        out.steps[step_key] = state["step"]
        out.tensors[step_key] = state["step"].detach().float().reshape(1).clone()
    return out


@torch.no_grad()
def restore(state: ShardedState) -> None:
    """After a load into ``state.tensors`` (in place): zero the padding, write the AdamW steps back."""
    for key, (local, spec) in state.padded.items():
        n = local.shape[spec.dim]
        length = state.tensors[key].shape[spec.dim] if key in state.tensors else 0
        if length < n:
            local.narrow(spec.dim, length, n - length).zero_()
    for key, step in state.steps.items():
        step.copy_(state.tensors[key].reshape(()).to(step.dtype))
