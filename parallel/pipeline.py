"""Pipeline stages built by hand, layer balancing by estimated FLOPs, and ``torch.distributed.pipelining`` glue.

Stage 0 holds the ViT, the projector, the token embedding and its share of LLM layers; the last stage holds the
final norm and the output layer. With ``virtual_stages`` v, pipeline rank r holds stages r, r + pp, ...,
r + (v - 1) * pp (interleaved 1F1B).

Packed-row metadata reaches every stage as keyword arguments: every rank of a data-parallel replica is given
the same micro-batches, and ``torch.distributed.pipelining`` passes per-micro-batch ``kwargs`` to all stages
(only activations travel point-to-point). Stage inputs/outputs are therefore just one tensor: ``input_ids`` into
stage 0, hidden states [B, S (/ tp with sequence parallelism), D] between stages, local-vocabulary logits
out of the last stage, consumed by the vocab-parallel loss on that stage. All micro-batches of a step must have
the same [B, S] under pp (packed rows of fixed length); a new shape builds (and caches) a new schedule.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from mllm.model.attention import AttentionMask
from mllm.model.config import ModelConfig
from mllm.model.internvl import InternVLModel, splice_image_tokens
from mllm.model.projector import vit_features_to_tokens
from parallel.comm import scatter_to_sequence_parallel
from parallel.config import ParallelConfig
from parallel.layers import TPInfo


def llm_layer_flops_per_token(cfg: ModelConfig) -> float:
    """Training FLOPs (forward + backward = 6 x multiply-adds) of one decoder layer per token."""
    t = cfg.text
    hd = t.resolved_head_dim
    attn = t.hidden_size * hd * (2 * t.num_heads + 2 * t.num_kv_heads)
    mlp = 3 * t.hidden_size * t.intermediate_size
    return 6.0 * (attn + mlp)


def vision_flops_per_llm_token(cfg: ModelConfig, image_token_fraction: float) -> float:
    """ViT + projector training FLOPs per LLM token, when ``image_token_fraction`` of the tokens are image."""
    v = cfg.vision
    tokens_per_tile = v.num_patches + 1
    layer = 4 * v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
    vit = 6.0 * layer * v.num_layers * tokens_per_tile
    proj_in = v.hidden_size * int(1 / cfg.downsample_ratio) ** 2
    projector = 6.0 * (proj_in + cfg.text.hidden_size) * cfg.text.hidden_size * cfg.num_image_token
    return (vit + projector) / cfg.num_image_token * image_token_fraction


def balance_layers(cfg: ModelConfig, num_stages: int, image_token_fraction: float = 0.5) -> list[int]:
    """Contiguous split of the LLM layers minimizing the most expensive stage (then the spread), with the
    vision tower counted on stage 0 and the output layer on the last stage."""
    n, layer = cfg.text.num_layers, llm_layer_flops_per_token(cfg)
    extra = [0.0] * num_stages
    extra[0] += vision_flops_per_llm_token(cfg, image_token_fraction)
    extra[-1] += 6.0 * cfg.text.hidden_size * cfg.text.vocab_size
    worst = (float("inf"), float("inf"))
    # best[s][k]: (max stage cost, sum of squared costs) placing the first k layers on stages 0..s-1.
    best = [[worst] * (n + 1) for _ in range(num_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, num_stages + 1):
        for k in range(s, n + 1):
            for j in range(s - 1, k):
                cost = (k - j) * layer + extra[s - 1]
                prev = best[s - 1][j]
                value = (max(prev[0], cost), prev[1] + cost * cost)
                if value < best[s][k]:
                    best[s][k], cut[s][k] = value, j
    sizes, k = [], n
    for s in range(num_stages, 0, -1):
        sizes.append(k - cut[s][k])
        k = cut[s][k]
    return sizes[::-1]


def resolve_layers_per_stage(cfg: ModelConfig, pcfg: ParallelConfig) -> list[int]:
    if pcfg.layers_per_stage is not None:
        return list(pcfg.layers_per_stage)
    return balance_layers(cfg, pcfg.num_stages, pcfg.balance_image_token_fraction)


def stage_layer_indices(layers_per_stage: list[int], stage: int) -> list[int]:
    start = sum(layers_per_stage[:stage])
    return list(range(start, start + layers_per_stage[stage]))


def stages_of_pp_rank(pp_rank: int, pcfg: ParallelConfig) -> list[int]:
    return [pp_rank + v * pcfg.pp for v in range(pcfg.virtual_stages)]


def _all_frozen(module: nn.Module) -> bool:
    return not any(p.requires_grad for p in module.parameters())


class StageModule(nn.Module):
    """One pipeline stage's forward. Holds (shares) the parts of the rank's model skeleton it runs."""

    def __init__(
        self,
        model: InternVLModel,
        layer_indices: list[int],
        is_first: bool,
        is_last: bool,
        tp: TPInfo,
        pcfg: ParallelConfig,
    ) -> None:
        super().__init__()
        self.cfg: ModelConfig = model.cfg
        self.is_first, self.is_last, self.tp = is_first, is_last, tp
        self.sequence_parallel = pcfg.sequence_parallel
        self.ckpt_vision = pcfg.activation_checkpointing_vision
        self.ckpt_llm = pcfg.activation_checkpointing_llm
        if is_first:
            self.vision, self.projector, self.embed_tokens = (
                model.vision,
                model.projector,
                model.llm.embed_tokens,
            )
        self.layers = nn.ModuleList(model.llm.layers[str(i)] for i in layer_indices)
        self.rotary = model.llm.rotary
        if is_last:
            self.norm, self.lm_head = model.llm.norm, model.lm_head

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """ViT -> pixel shuffle -> projector. A frozen prefix (embeddings, layers) runs without autograd."""
        vision = self.vision
        pieces = [vision.embeddings, *vision.layers[: vision.num_layers_run]]
        frozen = 0
        while frozen < len(pieces) and _all_frozen(pieces[frozen]):
            frozen += 1
        x = pixel_values
        with torch.no_grad():
            for piece in pieces[:frozen]:
                x = piece(x)
        for i, piece in enumerate(pieces[frozen:], start=frozen):
            use_ckpt = self.ckpt_vision and i > 0 and torch.is_grad_enabled()
            x = checkpoint(piece, x, use_reentrant=False) if use_ckpt else piece(x)
        if frozen == len(pieces) and _all_frozen(self.projector):
            with torch.no_grad():
                return self._project(x)
        return self._project(x)

    def _project(self, feats: torch.Tensor) -> torch.Tensor:
        return vit_features_to_tokens(feats, self.projector, self.cfg.downsample_ratio, self.cfg.ps_version)

    def embed(self, input_ids, pixel_values, image_flags) -> torch.Tensor:
        embeds = self.embed_tokens(input_ids)
        if callable(pixel_values):  # tiles delivered just in time (mllm.train.batches.PixelFeeder)
            pixel_values = pixel_values()
        if pixel_values is not None:
            image = self.image_tokens(pixel_values)
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
    ) -> torch.Tensor:
        """Stage 0: x = input_ids [B, S]; later stages: hidden states. Returns hidden or local logits."""
        hidden = self.embed(x, pixel_values, image_flags) if self.is_first else x
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
    )

    stages = [
        PipelineStage(module, sid, pcfg.num_stages, device, group=mesh.pp_group)
        for module, sid in zip(stage_modules, stage_ids)
    ]
    if pcfg.pp_schedule == "interleaved_1f1b":
        return ScheduleInterleaved1F1B(stages, n_micro, loss_fn=loss_fn, scale_grads=False)
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
