"""The device mesh: one object with named axes (pp, dp, tp), passed explicitly to everything that communicates.

Rank order is pp-major, tp-minor (tp neighbours are adjacent ranks, so on GPUs tp stays inside a node).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from parallel.config import ParallelConfig


@dataclass
class ParallelMesh:
    """Sizes, this rank's coordinates and the process group of every axis."""

    device_mesh: DeviceMesh | None
    tp: int
    pp: int
    dp: int
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    tp_group: ProcessGroup | None = None
    pp_group: ProcessGroup | None = None
    dp_group: ProcessGroup | None = None
    # FSDP2 (parallel.dp_shard > 1): dp = dp_replicate x dp_shard; ``fsdp_mesh`` is the DeviceMesh that
    # ``fully_shard`` shards over (1-D "dp_shard", or 2-D ("dp_replicate", "dp_shard") for HSDP).
    dp_shard: int = 1
    fsdp_mesh: DeviceMesh | None = None
    dp_shard_group: ProcessGroup | None = None

    @property
    def is_first_pp(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_pp(self) -> bool:
        return self.pp_rank == self.pp - 1

    def describe(self) -> str:
        return f"pp{self.pp_rank}/{self.pp} dp{self.dp_rank}/{self.dp} tp{self.tp_rank}/{self.tp}"


def build_mesh(pcfg: ParallelConfig, device_type: str | None = None) -> ParallelMesh:
    """Build the (pp, dp, tp) mesh over the initialized default process group (gloo on CPU, NCCL on GPU)."""
    if not dist.is_initialized():
        raise RuntimeError("build_mesh needs torch.distributed initialized (torchrun or init_process_group)")
    world = dist.get_world_size()
    if world % (pcfg.tp * pcfg.pp):
        raise ValueError(f"world size {world} is not divisible by tp*pp = {pcfg.tp}*{pcfg.pp}")
    dp = world // (pcfg.tp * pcfg.pp)
    device_type = device_type or ("cuda" if dist.get_backend() == "nccl" else "cpu")
    if pcfg.dp_shard > 1:
        return _build_fsdp_mesh(pcfg, dp, device_type)
    mesh = init_device_mesh(device_type, (pcfg.pp, dp, pcfg.tp), mesh_dim_names=("pp", "dp", "tp"))
    coords = mesh.get_coordinate()
    return ParallelMesh(
        device_mesh=mesh,
        tp=pcfg.tp,
        pp=pcfg.pp,
        dp=dp,
        pp_rank=coords[0],
        dp_rank=coords[1],
        tp_rank=coords[2],
        tp_group=mesh.get_group("tp"),
        pp_group=mesh.get_group("pp"),
        dp_group=mesh.get_group("dp"),
    )


def _build_fsdp_mesh(pcfg: ParallelConfig, dp: int, device_type: str) -> ParallelMesh:
    """(pp, dp_replicate, dp_shard, tp) with the two dp axes flattened into "dp" (same rank order as the
    3-D mesh: dp rank = replica * dp_shard + shard index), as torchtitan builds its mesh."""
    if dp % pcfg.dp_shard:
        raise ValueError(f"parallel.dp_shard={pcfg.dp_shard} does not divide dp={dp}")
    names = ("pp", "dp_replicate", "dp_shard", "tp")
    mesh = init_device_mesh(
        device_type, (pcfg.pp, dp // pcfg.dp_shard, pcfg.dp_shard, pcfg.tp), mesh_dim_names=names
    )
    dp_mesh = mesh["dp_replicate", "dp_shard"]._flatten("dp")
    hsdp = dp > pcfg.dp_shard
    coords = mesh.get_coordinate()
    return ParallelMesh(
        device_mesh=mesh,
        tp=pcfg.tp,
        pp=pcfg.pp,
        dp=dp,
        pp_rank=coords[0],
        dp_rank=coords[1] * pcfg.dp_shard + coords[2],
        tp_rank=coords[3],
        tp_group=mesh.get_group("tp"),
        pp_group=mesh.get_group("pp"),
        dp_group=dp_mesh.get_group(),
        dp_shard=pcfg.dp_shard,
        fsdp_mesh=mesh["dp_replicate", "dp_shard"] if hsdp else mesh["dp_shard"],
        dp_shard_group=mesh.get_group("dp_shard"),
    )


def meta_mesh(pcfg: ParallelConfig, world_size: int, pp_rank: int = 0, tp_rank: int = 0) -> ParallelMesh:
    """Coordinates without process groups: for building a rank's model on the meta device (memory reports)."""
    dp = world_size // (pcfg.tp * pcfg.pp)
    return ParallelMesh(None, tp=pcfg.tp, pp=pcfg.pp, dp=dp, tp_rank=tp_rank, pp_rank=pp_rank)


def default_device(mesh: ParallelMesh) -> torch.device:
    if mesh.device_mesh is not None and mesh.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
