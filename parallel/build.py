"""Building one rank's share of the model on the meta device: TP replacement, stage pruning, freezing, init."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from mllm.model.config import ModelConfig
from mllm.model.internvl import InternVLModel
from mllm.model.lora import freeze_adapted_parts, init_adapter_tensor, is_adapter_name
from parallel.backends import get_layer_backend
from parallel.config import ParallelConfig
from parallel.layers import TPInfo
from parallel.lora import parallelize_lora
from parallel.mesh import ParallelMesh
from parallel.pipeline import resolve_split, stage_layer_indices, stages_of_pp_rank
from parallel.shard import ShardSpec, shard_full_tensor
from parallel.stage_split import Split
from parallel.tensor_parallel import parallelize_model_tp


@dataclass
class RankSkeleton:
    """A rank's model (meta until materialized) and how it maps to the full model."""

    module: InternVLModel
    stage_ids: list[int]
    stage_layers: list[list[int]]
    stage_vision_layers: list[list[int]]  # ViT layer indices each of this rank's stages runs
    projector_stage: int
    specs: dict[str, ShardSpec]
    sp_params: set[str]
    tp: TPInfo


def tp_info(mesh: ParallelMesh) -> TPInfo:
    return TPInfo(size=mesh.tp, rank=mesh.tp_rank, group=mesh.tp_group)


def build_rank_skeleton(model_cfg: ModelConfig, pcfg: ParallelConfig, mesh: ParallelMesh) -> RankSkeleton:
    """The full model on meta, TP-split for this tp rank, pruned to this pp rank's stages, freezing applied."""
    tp = tp_info(mesh)
    backend = get_layer_backend(pcfg.layer_backend)
    with torch.device("meta"):
        model = InternVLModel(model_cfg)
        specs, sp_params = parallelize_model_tp(
            model, model_cfg, tp, backend, pcfg.sequence_parallel, pcfg.vision_sequence_parallel
        )
        if model_cfg.lora.enabled:
            lora_specs, lora_partial = parallelize_lora(model, model_cfg.lora, specs)
            specs, sp_params = {**specs, **lora_specs}, sp_params | lora_partial
    split = resolve_split(model_cfg, pcfg)
    stage_ids = stages_of_pp_rank(mesh.pp_rank, pcfg)
    stage_layers = [stage_layer_indices(list(split.llm_layers), s) for s in stage_ids]
    stage_vision = [stage_layer_indices(list(split.vision_layers), s) for s in stage_ids]
    owned = sorted(i for layers in stage_layers for i in layers)
    # A ModuleDict keyed by the global index keeps parameter names ("llm.layers.7....") of the full model.
    model.llm.layers = nn.ModuleDict({str(i): model.llm.layers[i] for i in owned})
    prune_vision(model, split, stage_ids, stage_vision)
    if split.projector_stage not in stage_ids:
        model.projector, model.llm.embed_tokens = None, None
    if pcfg.num_stages - 1 not in stage_ids:
        model.llm.norm, model.lm_head = None, None
    apply_freezing(model, pcfg)
    freeze_adapted_parts(model, model_cfg.lora)
    local = {name for name, _ in model.named_parameters()}
    specs = {k: v for k, v in specs.items() if k in local}
    return RankSkeleton(
        module=model,
        stage_ids=stage_ids,
        stage_layers=stage_layers,
        stage_vision_layers=stage_vision,
        projector_stage=split.projector_stage,
        specs=specs,
        sp_params=sp_params & local,
        tp=tp,
    )


def prune_vision(
    model: InternVLModel, split: Split, stage_ids: list[int], stage_vision: list[list[int]]
) -> None:
    """Keep the ViT parts this rank runs. With the ViT on one stage it stays whole (or goes); spread over
    stages, the layers become a ModuleDict keyed by global index (names stay "vision.layers.7...."), the patch
    embedding stays with stage 0 and layers past ``select_layer`` (never run) with the projector stage."""
    vit_stages = {s for s, n in enumerate(split.vision_layers) if n} | {split.projector_stage}
    if not vit_stages & set(stage_ids):
        model.vision = None
        return
    if len(vit_stages) == 1:
        return
    owned = {i for layers in stage_vision for i in layers}
    if split.projector_stage in stage_ids:
        owned |= set(range(sum(split.vision_layers), len(model.vision.layers)))
    model.vision.layers = nn.ModuleDict({str(i): model.vision.layers[i] for i in sorted(owned)})
    if 0 not in stage_ids:
        model.vision.embeddings = None


def is_frozen_name(name: str, pcfg: ParallelConfig) -> bool:
    """Whether the full-model parameter ``name`` is frozen by the config's freeze options (LoRA adapters
    always train, as in InternVL, where ``freeze_llm`` precedes ``wrap_llm_lora``)."""
    if is_adapter_name(name):
        return False
    if name.startswith("vision."):
        if pcfg.freeze_vision:
            return True
        if name.startswith("vision.embeddings.") and pcfg.freeze_vit_layers_below > 0:
            return True
        if name.startswith("vision.layers."):
            return int(name.split(".")[2]) < pcfg.freeze_vit_layers_below
        return False
    if name.startswith("projector."):
        return pcfg.freeze_projector
    if name.startswith(("llm.", "lm_head.")):
        return pcfg.freeze_llm
    return False


def apply_freezing(model: nn.Module, pcfg: ParallelConfig) -> None:
    """Frozen parameters get ``requires_grad=False``: no gradient, no communication, no optimizer state."""
    for name, param in model.named_parameters():
        if is_frozen_name(name, pcfg):
            param.requires_grad_(False)


def init_full_tensor(name: str, shape: torch.Size, cfg: ModelConfig, seed: int) -> torch.Tensor:
    """Layout-independent init of one full parameter (seeded by name), InternVL's rules as ``init_weights``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    std, leaf = cfg.init_std, name.rsplit(".", 2)
    out = torch.empty(shape)
    if is_adapter_name(name):
        init_adapter_tensor(name, out, gen)
        return out
    if name.endswith(".bias"):
        return out.zero_()
    if leaf[-1] in ("ls1", "ls2"):
        return out.fill_(cfg.vision.layer_scale_init)
    if "norm" in leaf[-2]:
        return out.fill_(1.0)
    if name.endswith("embed_tokens.weight"):
        return out.normal_(0.0, std, generator=gen)
    return nn.init.trunc_normal_(out, std=std, a=-2 * std, b=2 * std, generator=gen)


@torch.no_grad()
def materialize(
    skeleton: RankSkeleton,
    model_cfg: ModelConfig,
    device: torch.device,
    init_state_dict: dict[str, torch.Tensor] | None,
    seed: int,
    dtype: torch.dtype = torch.float32,
) -> None:
    """Allocate this rank's shards on ``device`` and fill them from full tensors (given or initialized)."""
    model = skeleton.module
    model.to_empty(device=device)
    for name, param in model.named_parameters():
        if init_state_dict is not None and (name in init_state_dict or not is_adapter_name(name)):
            if name not in init_state_dict:
                raise KeyError(f"init_state_dict has no tensor {name!r} (expected single-device model names)")
            full = init_state_dict[name]
        else:
            full = init_full_tensor(
                name, _full_shape(param, skeleton.specs.get(name), skeleton.tp), model_cfg, seed
            )
        local = shard_full_tensor(full.to(torch.float32), skeleton.specs.get(name), skeleton.tp)
        if local.shape != param.shape:
            raise ValueError(
                f"{name}: shard shape {tuple(local.shape)} != local parameter {tuple(param.shape)}"
            )
        param.copy_(local)
    model.to(dtype)


def _full_shape(param: torch.Tensor, spec: ShardSpec | None, tp: TPInfo) -> torch.Size:
    if spec is None:
        return param.shape
    shape = list(param.shape)
    shape[spec.dim] = spec.full
    return torch.Size(shape)
