"""What goes into a checkpoint, in layout-independent form, and how it comes back into any layout.

Tensors are saved *unsharded* under single-device names (``model/<param>``, ``optim/<param>/<state>``), so
``torch.distributed.checkpoint`` reshards on load: a checkpoint written at tp2 x pp2 loads at dp2, and a
torch-backend checkpoint loads into the TE backend (same names). Every tp rank of a stage offers the same full
tensor; DCP's planner writes each key once. Pipeline ranks offer disjoint keys (their own stages), and with a
sharded (ZeRO-1) optimizer each data-parallel rank offers the states of the parameters it owns.

Limitation: a full tensor of each local parameter is materialized on its rank while saving (one stage's worth,
on CPU when the device memory is short); saving DTensor shards would avoid it.
"""

from __future__ import annotations

import torch

from parallel.shard import gather_full_tensor, shard_full_tensor

ADAM_TENSOR_STATES = ("exp_avg", "exp_avg_sq")


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
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def _owned(pm, opt) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable local parameters whose optimizer state lives on this rank, in a rank-independent order."""
    inner = inner_optimizer(opt)
    return [(n, p) for n, p in pm.trainable_parameters() if p in inner.state]


def check_owners_agree_over_tp(pm, opt, mesh) -> None:
    """With a sharded optimizer, the tp ranks of a replica must own the states of the same parameters:
    saving gathers each state over tp, a collective every tp rank must join for the same names."""
    if inner_optimizer(opt) is opt or mesh.tp == 1:
        return
    import torch.distributed as dist

    owned = [n for n, _ in _owned(pm, opt)]
    everyone: list = [None] * mesh.tp
    dist.all_gather_object(everyone, owned, group=mesh.tp_group)
    if any(o != owned for o in everyone):
        raise RuntimeError(
            "parallel.shard_optimizer: tensor-parallel ranks partitioned the optimizer state differently "
            "(unequal shard sizes); set parallel.shard_optimizer=false"
        )


@torch.no_grad()
def model_tensors(pm) -> dict[str, torch.Tensor]:
    """``model/<name>`` -> full fp32 tensor for this pipeline rank's parameters (collective over tp)."""
    return {f"model/{n}": t.float() for n, t in pm.full_state_dict().items()}


@torch.no_grad()
def optimizer_tensors(pm, opt) -> dict[str, torch.Tensor]:
    """``optim/<name>/<state>`` -> full tensors for the states this rank owns (collective over tp)."""
    inner = inner_optimizer(opt)
    out: dict[str, torch.Tensor] = {}
    for name, p in _owned(pm, opt):
        state = inner.state[p]
        spec = pm.specs.get(name)
        for key in ADAM_TENSOR_STATES:
            out[f"optim/{name}/{key}"] = gather_full_tensor(state[key], spec, pm.tp).float()
        out[f"optim/{name}/step"] = state["step"].detach().float().reshape(1).clone()
    return out


def checkpoint_tensors(pm, opt) -> dict[str, torch.Tensor]:
    return {**model_tensors(pm), **optimizer_tensors(pm, opt)}


@torch.no_grad()
def restore_tensors(pm, opt, loaded: dict[str, torch.Tensor]) -> None:
    """Copy loaded full tensors back into this rank's shards of the model and optimizer state."""
    model_sd = {k[len("model/") :]: v for k, v in loaded.items() if k.startswith("model/")}
    pm.load_full_state_dict(model_sd)
    inner = inner_optimizer(opt)
    for name, p in _owned(pm, opt):
        state = inner.state[p]
        spec = pm.specs.get(name)
        for key in ADAM_TENSOR_STATES:
            local = shard_full_tensor(loaded[f"optim/{name}/{key}"], spec, pm.tp)
            state[key].copy_(local.to(state[key].device, state[key].dtype))
        state["step"].copy_(loaded[f"optim/{name}/step"].reshape(()))
