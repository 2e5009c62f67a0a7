"""Pipeline stages built by hand, layer balancing by estimated FLOPs, and ``torch.distributed.pipelining`` glue.

Stage 0 holds the ViT (or its first layers: ``parallel.stage_split=joint`` or ``vision_layers_per_stage`` spread
them over the leading stages), the projector, the token embedding and its share of LLM layers; the last stage
holds the final norm and the output layer. With ``virtual_stages`` v, pipeline rank r holds stages r, r + pp, ...,
r + (v - 1) * pp (interleaved 1F1B).

Packed-row metadata reaches every stage as keyword arguments: every rank of a data-parallel replica is given
the same micro-batches, and ``torch.distributed.pipelining`` passes per-micro-batch ``kwargs`` to all stages
(only activations travel point-to-point). Stage inputs/outputs are therefore just one tensor: ``input_ids`` into
stage 0, padded tile activations [tile_budget, tokens, width] between ViT stages, hidden states
[B, S (/ tp with sequence parallelism), D] between the others, local-vocabulary logits
out of the last stage, consumed by the vocab-parallel loss on that stage. All micro-batches of a step must have
the same [B, S] under pp (packed rows of fixed length); a new shape builds (and caches) a new schedule.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllm.model.attention import AttentionMask
from mllm.model.config import ModelConfig
from mllm.model.internvl import InternVLModel, splice_image_tokens
from mllm.model.projector import vit_features_to_tokens
from mllm.train.flops import TrainedParts
from parallel.comm import scatter_to_sequence_parallel
from parallel.config import ParallelConfig
from parallel.layers import TPInfo
from parallel.stage_split import Split, best_stage_split, vit_layers_run
from parallel.vision_sp import enter_vision_sequence_parallel, leave_vision_sequence_parallel


def resolve_split(cfg: ModelConfig, pcfg: ParallelConfig) -> Split:
    """ViT and LLM layers per stage: explicit, or ``best_stage_split`` for a micro-batch of
    ``balance_seq_len`` tokens, ``balance_image_token_fraction`` of them image tokens."""
    n_vit = vit_layers_run(cfg)
    if pcfg.layers_per_stage is not None:
        vision = pcfg.vision_layers_per_stage or [n_vit] + [0] * (pcfg.num_stages - 1)
        return Split(pcfg.pp, tuple(vision), tuple(pcfg.layers_per_stage))
    tiles = pcfg.balance_image_token_fraction * pcfg.balance_seq_len / cfg.num_image_token
    split = best_stage_split(
        cfg,
        pcfg.pp,
        pcfg.virtual_stages,
        tiles,
        pcfg.balance_seq_len,
        vision_across_stages=pcfg.stage_split == "joint",
        parts=TrainedParts(
            vision=not pcfg.freeze_vision, projector=not pcfg.freeze_projector, llm=not pcfg.freeze_llm
        ),
    )
    if split.projector_stage > 0 and (
        pcfg.freeze_vision or pcfg.freeze_vit_layers_below >= split.vision_layers[0]
    ):
        raise ValueError(
            f"parallel.stage_split=joint puts ViT layers {list(split.vision_layers)} over several stages but "
            "stage 0's are all frozen: use parallel.stage_split=llm or explicit vision_layers_per_stage"
        )
    return split


def resolve_layers_per_stage(cfg: ModelConfig, pcfg: ParallelConfig) -> list[int]:
    return list(resolve_split(cfg, pcfg).llm_layers)


def stage_layer_indices(layers_per_stage: list[int], stage: int) -> list[int]:
    start = sum(layers_per_stage[:stage])
    return list(range(start, start + layers_per_stage[stage]))


def stages_of_pp_rank(pp_rank: int, pcfg: ParallelConfig) -> list[int]:
    return [pp_rank + v * pcfg.pp for v in range(pcfg.virtual_stages)]


def _all_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


class StageModule(nn.Module):
    """One pipeline stage's forward. Holds (shares) the parts of the rank's model skeleton it runs.

    A stage may run ViT layers (``vision_layers``; stage 0 also the patch embedding), then on the projector
    stage the projector, token embedding and image splice, then decoder layers, then on the last stage the
    output layer. Between ViT stages the tile activations [tiles, tokens, width] are zero-padded to
    ``tile_budget`` tiles (the pipeline needs one shape per step); the receiving stage slices the real tiles
    (``pixel_values`` tells how many) so padding costs communication only.
    """

    def __init__(
        self,
        model: InternVLModel,
        layer_indices: list[int],
        is_first: bool,
        is_last: bool,
        tp: TPInfo,
        pcfg: ParallelConfig,
        vision_layers: list[int] | None = None,
        has_projector: bool | None = None,
    ) -> None:
        super().__init__()
        self.cfg: ModelConfig = model.cfg
        self.is_first, self.is_last, self.tp = is_first, is_last, tp
        self.has_projector = is_first if has_projector is None else has_projector
        if vision_layers is None:  # the whole ViT with the projector
            vision_layers = list(range(model.vision.num_layers_run)) if self.has_projector else []
        self.sequence_parallel = pcfg.sequence_parallel
        self.vision_sp = pcfg.vision_sequence_parallel and tp.size > 1
        self.ckpt_vision = pcfg.activation_checkpointing_vision
        self.ckpt_llm = pcfg.activation_checkpointing_llm
        self.tile_budget = 0  # set per step by ParallelModel when the ViT spans stages
        self.runs_vision = bool(vision_layers) or (is_first and self.has_projector)
        if self.runs_vision:
            self.vision_embeddings = model.vision.embeddings if is_first else None
            self.vision_layers = nn.ModuleList(
                model.vision.layers[_key(model.vision.layers, i)] for i in vision_layers
            )
        if self.has_projector:
            self.projector, self.embed_tokens = model.projector, model.llm.embed_tokens
        self.layers = nn.ModuleList(model.llm.layers[str(i)] for i in layer_indices)
        self.rotary = model.llm.rotary
        if is_last:
            self.norm, self.lm_head = model.llm.norm, model.lm_head

    def run_vision(self, x: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """This stage's ViT pieces on the real tiles (with ViT sequence parallelism: on this rank's token chunk,
        tiles padded to ``tile_budget`` when the ViT spans stages). A frozen prefix (embeddings, layers) runs
        without autograd (only on stage 0: validation keeps a trainable layer there when the ViT spans stages).
        """
        n_tiles = pixel_values.shape[0]
        if self.is_first:  # tiles delivered just in time are a callable (mllm.train.batches.PixelFeeder)
            pieces, x = [self.vision_embeddings, *self.vision_layers], pixel_values
            if callable(x):
                x = x()
        else:
            pieces, x = list(self.vision_layers), x if self.vision_sp else x[:n_tiles]
        frozen = 0
        while frozen < len(pieces) and _all_frozen(pieces[frozen]):
            frozen += 1
        for i, piece in enumerate(pieces):
            with torch.no_grad() if i < frozen else contextlib.nullcontext():
                use_ckpt = i >= frozen and self.ckpt_vision and torch.is_grad_enabled()
                use_ckpt = use_ckpt and piece is not self.vision_embeddings
                x = checkpoint(piece, x, use_reentrant=False) if use_ckpt else piece(x)
                if piece is self.vision_embeddings and self.vision_sp:
                    x = enter_vision_sequence_parallel(self._pad_tiles(x), self.tp)
        if self.vision_sp and self.has_projector:
            x = leave_vision_sequence_parallel(x, self.cfg.vision.num_patches + 1, self.tp)[:n_tiles]
        return x

    def _pad_tiles(self, feats: torch.Tensor) -> torch.Tensor:
        """[tiles, tokens, width] zero-padded to ``tile_budget`` tiles (no-op without a budget)."""
        return F.pad(feats, (0, 0, 0, 0, 0, max(0, self.tile_budget - feats.shape[0])))

    def image_tokens(self, feats: torch.Tensor) -> torch.Tensor:
        """Pixel shuffle -> projector (without autograd when nothing before or in it is trained)."""
        if not feats.requires_grad and _all_frozen(self.projector):
            with torch.no_grad():
                return self._project(feats)
        return self._project(feats)

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        return vit_features_to_tokens(feats, self.projector, self.cfg.downsample_ratio, self.cfg.ps_version)

    def embed(self, input_ids, feats, image_flags) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        if feats is not None:
            image = self.image_tokens(feats)
            embeds = splice_image_tokens(embeds, input_ids, image, self.cfg.image_token_id, image_flags)
        if self.sequence_parallel:
            embeds = scatter_to_sequence_parallel(embeds, self.tp.group, dim=1)
        return embeds

    def forward(
        self,
        x: torch.Tensor,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Stage 0: x = input_ids [B, S]; later stages: padded tile activations or hidden states. Returns
        padded tile activations (ViT-only stage), hidden states, or local logits (last stage)."""
        feats = None
        if self.runs_vision and pixel_values is not None:
            feats = self.run_vision(x, pixel_values)
            if not self.has_projector:  # a token chunk of budget-padded tiles under ViT sequence parallelism
                return feats if self.vision_sp else self._pad_tiles(feats)
        if self.has_projector:
            hidden = self.embed(x if self.is_first else input_ids, feats, image_flags)
        else:
            hidden = x
        if self.layers:
            rope = self.rotary(position_ids, hidden.dtype)
            mask = AttentionMask(causal=True, segment_ids=segment_ids)
            for layer in self.layers:
                if self.ckpt_llm and torch.is_grad_enabled():
                    hidden = checkpoint(layer, hidden, rope, mask, use_reentrant=False)
                else:
                    hidden = layer(hidden, rope, mask)
        if self.is_last:
            return self.lm_head(self.norm(hidden))
        return hidden


def _key(layers: nn.Module, i: int) -> int | str:
    """Index into the ViT's layers: a ModuleList (whole ViT on this rank) or a ModuleDict of the owned ones."""
    return str(i) if isinstance(layers, nn.ModuleDict) else i


def build_schedule(
    stage_modules: list[StageModule], stage_ids: list[int], pcfg, mesh, device, n_micro, loss_fn
):
    """A ``torch.distributed.pipelining`` schedule over this rank's stages; grads are summed, not averaged
    (the loss is already normalized by the global token weight)."""
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleGPipe,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
    )

    stages = [
        PipelineStage(module, sid, pcfg.num_stages, device, group=mesh.pp_group)
        for module, sid in zip(stage_modules, stage_ids)
    ]
    if pcfg.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, n_micro, loss_fn=loss_fn, scale_grads=False)
    if pcfg.pp_schedule == "interleaved_zero_bubble":
        return ScheduleInterleavedZeroBubble(stages, n_micro, loss_fn=loss_fn, scale_grads=False)
    schedule_cls = Schedule1F1B if pcfg.pp_schedule == "1f1b" else ScheduleGPipe
    return schedule_cls(stages[0], n_micro, loss_fn=loss_fn, scale_grads=False)


def run_schedule(schedule, arg_mbs: list, kwarg_mbs: list, target_mbs: list, losses: list) -> None:
    """One training step over explicit per-micro-batch inputs.

    ``step()`` concatenates and re-chunks a whole batch, which cannot express micro-batches with different
    tile counts; this does what ``step()`` does around ``_step_microbatches`` (the one private entry point
    used here, stable since torch 2.4).
    """
    stages = getattr(schedule, "_stages", None) or [schedule._stage]
    for stage in stages:
        stage.has_backward = schedule._has_backward
        stage.clear_runtime_states()
    schedule._step_microbatches(arg_mbs, kwarg_mbs, target_mbs, losses, return_outputs=False)
