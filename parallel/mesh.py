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


def meta_mesh(pcfg: ParallelConfig, world_size: int, pp_rank: int = 0, tp_rank: int = 0) -> ParallelMesh:
    """Coordinates without process groups: for building a rank's model on the meta device (memory reports)."""
    dp = world_size // (pcfg.tp * pcfg.pp)
    return ParallelMesh(None, tp=pcfg.tp, pp=pcfg.pp, dp=dp, tp_rank=tp_rank, pp_rank=pp_rank)


def default_device(mesh: ParallelMesh) -> torch.device:
    if mesh.device_mesh is not None and mesh.device_mesh.device_type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
