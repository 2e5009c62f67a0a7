"""InternVL-Chat: InternViT -> pixel shuffle -> MLP projector, spliced into a Llama-family LLM.

Written for one device. The pieces (``embed_inputs``, ``decoder_layers``, ``final_norm``, ``lm_head``) are
exposed so that ``parallel/`` can cut pipeline stages and swap layers without changing this file.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from mllm.model.attention import AttentionMask
from mllm.model.config import ModelConfig
from mllm.model.llm import DecoderLayer
from mllm.model.lora import apply_lora, init_lora_
from mllm.model.norms import RMSNorm
from mllm.model.projector import Projector, vit_features_to_tokens
from mllm.model.rope import RotaryEmbedding
from mllm.model.vision import InternViT


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [batch, seq, vocab]


def default_position_ids(input_ids: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Positions that restart at 0 at the start of every packed sample (0.. S-1 without segments)."""
    b, s = input_ids.shape
    ar = torch.arange(s, device=input_ids.device).expand(b, s)
    if segment_ids is None:
        return ar
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    start_index = torch.where(starts, ar, torch.zeros_like(ar)).cummax(dim=1).values
    return ar - start_index


class LanguageModel(nn.Module):
    """Token embeddings + decoder layers + final norm (no output head)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        t = cfg.text
        self.embed_tokens = nn.Embedding(t.vocab_size, t.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(t, cfg.attention_backend) for _ in range(t.num_layers))
        self.norm = RMSNorm(t.hidden_size, t.rms_norm_eps)
        self.rotary = RotaryEmbedding(
            t.resolved_head_dim, t.rope_theta, t.rope_scaling, t.max_position_embeddings
        )


class InternVLModel(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.vision = InternViT(cfg.vision, cfg.select_layer, cfg.attention_backend)
        self.projector = Projector(
            cfg.vision.hidden_size, cfg.text.hidden_size, cfg.downsample_ratio, cfg.projector_norm_eps
        )
        self.llm = LanguageModel(cfg)
        self.lm_head = nn.Linear(cfg.text.hidden_size, cfg.text.vocab_size, bias=False)
        if cfg.text.tie_word_embeddings:
            self.lm_head.weight = self.llm.embed_tokens.weight
        apply_lora(self, cfg.lora)

    # -- pieces -------------------------------------------------------------------------------------------
    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Tiles [N, 3, H, W] -> LLM-width image tokens [N, num_image_token, D]."""
        feats = self.vision(pixel_values)
        return vit_features_to_tokens(feats, self.projector, self.cfg.downsample_ratio, self.cfg.ps_version)

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with every <IMG_CONTEXT> replaced by image tokens, in flattened batch order."""
        embeds = self.llm.embed_tokens(input_ids)
        if pixel_values is None:
            return embeds
        image_embeds = self.image_tokens(pixel_values)
        return splice_image_tokens(embeds, input_ids, image_embeds, self.cfg.image_token_id, image_flags)

    def decode(
        self,
        hidden: torch.Tensor,
        position_ids: torch.Tensor,
        segment_ids: torch.Tensor | None,
        layers: nn.ModuleList | None = None,
    ) -> torch.Tensor:
        """Run decoder layers (all by default) over ``hidden`` for packed rows."""
        rope = self.llm.rotary(position_ids, hidden.dtype)
        mask = AttentionMask(causal=True, segment_ids=segment_ids)
        for layer in self.llm.layers if layers is None else layers:
            hidden = layer(hidden, rope, mask)
        return hidden

    # -- whole model --------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_flags: torch.Tensor | None = None,
    ) -> ModelOutput:
        """input_ids [B, S]; pixel_values: all tiles in order; segment_ids [B, S] for packed rows (0 = pad)."""
        if position_ids is None:
            position_ids = default_position_ids(input_ids, segment_ids)
        hidden = self.embed_inputs(input_ids, pixel_values, image_flags)
        hidden = self.llm.norm(self.decode(hidden, position_ids, segment_ids))
        return ModelOutput(logits=self.lm_head(hidden))


def splice_image_tokens(
    embeds: torch.Tensor,
    input_ids: torch.Tensor,
    image_embeds: torch.Tensor,
    image_token_id: int,
    image_flags: torch.Tensor | None = None,
) -> torch.Tensor:
    """Replace <IMG_CONTEXT> embeddings by the image tokens of the real tiles (``image_flags`` == 1).

    Dummy tiles (flag 0, sent with text-only batches) join the graph with weight zero so every data-parallel
    rank produces (zero) gradients for the vision weights and collectives never wait on a missing one.
    """
    if image_flags is not None:
        keep = image_flags.to(torch.bool)
        dummy = image_embeds[~keep]
        image_embeds = image_embeds[keep]
    else:
        dummy = image_embeds[:0]
    selected = input_ids == image_token_id
    n_tokens, n_features = int(selected.sum()), image_embeds.shape[0] * image_embeds.shape[1]
    if n_tokens != n_features:
        raise ValueError(
            f"image tokens and tiles do not match: {n_tokens} <IMG_CONTEXT> tokens in input_ids but "
            f"{image_embeds.shape[0]} tiles x {image_embeds.shape[1]} = {n_features} image features"
        )
    flat = image_embeds.reshape(-1, image_embeds.shape[-1]).to(embeds.dtype)
    embeds = embeds.masked_scatter(selected.unsqueeze(-1), flat)
    if dummy.numel():
        embeds = embeds + 0.0 * dummy.sum().to(embeds.dtype)
    return embeds


def build_model(cfg: ModelConfig, device: torch.device | str | None = None) -> InternVLModel:
    """Build and initialize (on ``device``; "meta" allocates nothing)."""
    with torch.device(device or "cpu"):
        model = InternVLModel(cfg)
    if str(device) != "meta":
        init_weights(model, cfg.init_std)
    return model


@torch.no_grad()
def init_weights(model: InternVLModel, std: float = 0.02) -> None:
    """Truncated-normal linears/embeddings, zero biases, unit norms, layer scale from the config."""
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, (nn.LayerNorm, RMSNorm)):
            module.weight.fill_(1.0)
            if getattr(module, "bias", None) is not None:
                module.bias.zero_()
    emb = model.vision.embeddings
    nn.init.trunc_normal_(emb.class_embedding, std=std, a=-2 * std, b=2 * std)
    nn.init.trunc_normal_(emb.position_embedding, std=std, a=-2 * std, b=2 * std)
    for block in model.vision.layers:
        block.ls1.fill_(model.cfg.vision.layer_scale_init)
        block.ls2.fill_(model.cfg.vision.layer_scale_init)
    init_lora_(model)


def count_parameters(model: InternVLModel) -> dict[str, int]:
    """Parameter counts of the three parts (shared tensors counted once)."""
    seen: set[int] = set()

    def count(module: nn.Module) -> int:
        total = 0
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                total += p.numel()
        return total

    vit, mlp = count(model.vision), count(model.projector)
    llm = count(model.llm) + count(model.lm_head)
    return {"vision": vit, "projector": mlp, "llm": llm, "total": vit + mlp + llm}
