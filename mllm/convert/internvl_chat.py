"""InternVL-Chat (remote-code) layout <-> ours: config.json fields and tensor names/layouts.

Pure functions on dicts and tensors; file I/O lives in ``mllm.convert.files``. Layout facts
(InternVL's modeling_internvl_chat.py and modeling_internlm2.py, github.com/OpenGVLab/InternVL): the ViT's fused ``attn.qkv`` rows are [all q | all k | all v];
InternLM2's ``wqkv`` rows are grouped per kv head: for each kv head, its ``num_heads // num_kv_heads`` q heads,
then its k head, then its v head. Llama/Qwen2/Qwen3 language models keep transformers' names under
``language_model.``.
"""

from __future__ import annotations

from typing import Any

import torch

from mllm.convert.errors import CheckpointError
from mllm.convert.extras import deep_merge, unmapped_fields
from mllm.convert.renames import PrefixRule, RenameTable
from mllm.convert.text_config import text_arch, text_config_legacy, text_config_to_ours
from mllm.model.config import ModelConfig, TextConfig, VisionConfig

FORMAT = "internvl_chat"

# Written when exporting a model that has no InternVL-Chat fields of its own (the V1-5 release's values).
DEFAULT_FIELDS: dict[str, Any] = {
    "use_backbone_lora": 0,
    "use_llm_lora": 0,
    "pad2square": False,
    "dynamic_image_size": True,
    "use_thumbnail": True,
    "min_dynamic_patch": 1,
    "max_dynamic_patch": 12,
}

VISION_RULES = [
    PrefixRule("vision_model.embeddings.", "vision.embeddings."),
    PrefixRule("vision_model.encoder.layers.{i}.attn.proj.", "vision.layers.{i}.attn.proj."),
    PrefixRule("vision_model.encoder.layers.{i}.attn.q_norm.", "vision.layers.{i}.attn.q_norm."),
    PrefixRule("vision_model.encoder.layers.{i}.attn.k_norm.", "vision.layers.{i}.attn.k_norm."),
    PrefixRule("vision_model.encoder.layers.{i}.mlp.", "vision.layers.{i}.mlp."),
    PrefixRule("vision_model.encoder.layers.{i}.norm1.", "vision.layers.{i}.norm1."),
    PrefixRule("vision_model.encoder.layers.{i}.norm2.", "vision.layers.{i}.norm2."),
    PrefixRule("vision_model.encoder.layers.{i}.ls1", "vision.layers.{i}.ls1"),
    PrefixRule("vision_model.encoder.layers.{i}.ls2", "vision.layers.{i}.ls2"),
    PrefixRule("mlp1.0.", "projector.norm."),
    PrefixRule("mlp1.1.", "projector.fc1."),
    PrefixRule("mlp1.3.", "projector.fc2."),
]
INTERNLM2_RULES = [
    PrefixRule("language_model.model.tok_embeddings.", "llm.embed_tokens."),
    PrefixRule("language_model.model.layers.{i}.attention.wo.", "llm.layers.{i}.self_attn.o_proj."),
    PrefixRule("language_model.model.layers.{i}.feed_forward.w1.", "llm.layers.{i}.mlp.gate_proj."),
    PrefixRule("language_model.model.layers.{i}.feed_forward.w3.", "llm.layers.{i}.mlp.up_proj."),
    PrefixRule("language_model.model.layers.{i}.feed_forward.w2.", "llm.layers.{i}.mlp.down_proj."),
    PrefixRule("language_model.model.layers.{i}.attention_norm.", "llm.layers.{i}.input_layernorm."),
    PrefixRule("language_model.model.layers.{i}.ffn_norm.", "llm.layers.{i}.post_attention_layernorm."),
    PrefixRule("language_model.model.norm.", "llm.norm."),
    PrefixRule("language_model.output.", "lm_head."),
]
LLAMA_RULES = [  # Llama, Qwen2 and Qwen3 inside InternVL-Chat: transformers' own names under language_model.
    PrefixRule("language_model.model.", "llm."),
    PrefixRule("language_model.lm_head.", "lm_head."),
]


def rename_table(arch: str) -> RenameTable:
    return RenameTable(VISION_RULES + (INTERNLM2_RULES if arch == "internlm2" else LLAMA_RULES))


# -- config ------------------------------------------------------------------------------------------------
def vision_config_to_ours(v: dict[str, Any], where: str) -> VisionConfig:
    if v.get("hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}.hidden_act {v['hidden_act']!r} unsupported (exact GELU only)")
    return VisionConfig(
        hidden_size=v["hidden_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        image_size=int(v.get("image_size", 224)),
        patch_size=int(v.get("patch_size", 14)),
        num_channels=v.get("num_channels", 3),
        norm_type=v.get("norm_type", "rms_norm"),
        norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(v.get("qkv_bias", False)),
        qk_norm=bool(v.get("qk_normalization", True)),
        layer_scale_init=float(v.get("initializer_factor", 0.1)),  # InternViT inits ls1/ls2 to this
        drop_path_rate=float(v.get("drop_path_rate", 0.0)),
    )


def config_to_ours(hf: dict[str, Any], tokenizer_image_token_id: int | None, where: str) -> ModelConfig:
    """InternVLChatConfig dict -> ModelConfig; unmapped fields go to ``hf_extra['internvl_chat']``."""
    for key in ("vision_config", "llm_config"):
        if key not in hf:
            raise CheckpointError(
                f"{where}: missing {key!r} (an InternVLChatConfig needs vision_config and llm_config)"
            )
    vision = vision_config_to_ours(hf["vision_config"], f"{where} vision_config")
    force = hf.get("force_image_size")
    if force and int(force) != vision.image_size:
        raise CheckpointError(
            f"{where}: force_image_size {force} differs from vision_config.image_size {vision.image_size}; "
            "set both to the tile size the model was trained with"
        )
    llm = hf["llm_config"]
    text = text_config_to_ours(llm, text_arch(llm, f"{where} llm_config"), f"{where} llm_config")
    # The image token id is not a model field in InternVL-Chat: chat() sets img_context_token_id at run time
    # from the tokenizer's <IMG_CONTEXT>, so the tokenizer is the authority; a config value is the fallback.
    image_token_id = tokenizer_image_token_id
    if image_token_id is None:
        image_token_id = (
            hf.get("img_context_token_id") or hf.get("image_token_id") or ModelConfig.image_token_id
        )
    cfg = ModelConfig(
        vision=vision,
        text=text,
        downsample_ratio=float(hf.get("downsample_ratio", 0.5)),
        ps_version=hf.get("ps_version") or "v1",  # absent means v1 (InternVLChatConfig's default)
        select_layer=int(hf.get("select_layer", -1)),
        image_token_id=int(image_token_id),
        template=hf.get("template") or ModelConfig.template,
    )
    cfg.hf_extra = {FORMAT: unmapped_fields(hf, config_from_ours(cfg, with_extra=False))}
    return cfg


def config_from_ours(cfg: ModelConfig, with_extra: bool = True) -> dict[str, Any]:
    """ModelConfig -> InternVLChatConfig dict (defaults < fields kept from import < our fields)."""
    v, where = cfg.vision, "export to internvl_chat"
    if cfg.projector_norm_eps != 1e-5:
        raise CheckpointError(f"{where}: mlp1's LayerNorm eps is fixed at 1e-5, got {cfg.projector_norm_eps}")
    vision = {
        "architectures": ["InternVisionModel"],
        "model_type": "intern_vit_6b",
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "image_size": v.image_size,
        "patch_size": v.patch_size,
        "num_channels": v.num_channels,
        "norm_type": v.norm_type,
        "layer_norm_eps": v.norm_eps,
        "qkv_bias": v.qkv_bias,
        "qk_normalization": v.qk_norm,
        "initializer_factor": v.layer_scale_init,
        "drop_path_rate": v.drop_path_rate,
        "hidden_act": "gelu",
    }
    ours = {
        "architectures": ["InternVLChatModel"],
        "model_type": "internvl_chat",
        "vision_config": vision,
        "llm_config": text_config_legacy(cfg.text, cfg.text.arch, f"{where} llm_config"),
        "downsample_ratio": cfg.downsample_ratio,
        "ps_version": cfg.ps_version,
        "select_layer": cfg.select_layer,
        "force_image_size": v.image_size,
        "template": cfg.template,
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
        # Not read by the remote code (chat() takes it from the tokenizer) but keeps the id for tokenizer-less
        # directories; our import prefers the tokenizer's <IMG_CONTEXT> when one is shipped.
        "img_context_token_id": cfg.image_token_id,
        # Exports hold merged weights (mllm.convert.core.merged): no adapters for the remote code to wrap.
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
    }
    if not with_extra:
        return ours
    return deep_merge(deep_merge(DEFAULT_FIELDS, cfg.hf_extra.get(FORMAT, {})), ours)


# -- tensors -----------------------------------------------------------------------------------------------
def _check_shape(name: str, tensor: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(tensor.shape) != expected:
        raise CheckpointError(
            f"tensor {name} has shape {tuple(tensor.shape)}, expected {expected} from config.json"
        )


def split_wqkv(wqkv: torch.Tensor, t: TextConfig, name: str) -> tuple[torch.Tensor, ...]:
    """InternLM2's grouped ``wqkv`` [(H + 2 KV) D, ...] -> q [H D, ...], k [KV D, ...], v [KV D, ...]."""
    d, kv, groups = t.resolved_head_dim, t.num_kv_heads, t.num_heads // t.num_kv_heads
    _check_shape(name, wqkv, ((t.num_heads + 2 * kv) * d, *wqkv.shape[1:]))
    grouped = wqkv.reshape(kv, groups + 2, d, *wqkv.shape[1:])
    q = grouped[:, :groups].reshape(t.num_heads * d, *wqkv.shape[1:])
    return (
        q.contiguous(),
        grouped[:, groups].reshape(kv * d, *wqkv.shape[1:]).contiguous(),
        (grouped[:, groups + 1].reshape(kv * d, *wqkv.shape[1:]).contiguous()),
    )


def fuse_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, t: TextConfig) -> torch.Tensor:
    """Inverse of ``split_wqkv``."""
    d, kv, groups = t.resolved_head_dim, t.num_kv_heads, t.num_heads // t.num_kv_heads
    rest = q.shape[1:]
    grouped = torch.cat(
        [q.reshape(kv, groups, d, *rest), k.reshape(kv, 1, d, *rest), v.reshape(kv, 1, d, *rest)], dim=1
    )
    return grouped.reshape((t.num_heads + 2 * kv) * d, *rest)


def tensor_to_ours(
    name: str, tensor: torch.Tensor, cfg: ModelConfig, table: RenameTable
) -> dict[str, torch.Tensor] | None:
    """One HF tensor -> our tensor(s) (fused qkv / wqkv split into q, k, v); None when no rule maps it.

    Shared by whole-checkpoint import and the part readers (``mllm.convert.core.read_vision_checkpoint`` /
    ``read_llm_checkpoint``, which first put a standalone checkpoint's names under ``vision_model.`` /
    ``language_model.``).
    """
    parts = name.split(".")
    if name.startswith("vision_model.encoder.layers.") and parts[-2] == "qkv":
        prefix = f"vision.layers.{parts[3]}.attn."
        _check_shape(name, tensor, (3 * cfg.vision.hidden_size, *tensor.shape[1:]))
        chunks = tensor.chunk(3, dim=0)
        return {
            f"{prefix}{p}.{parts[-1]}": c.contiguous() for p, c in zip(("q_proj", "k_proj", "v_proj"), chunks)
        }
    if (
        cfg.text.arch == "internlm2"
        and name.startswith("language_model.model.layers.")
        and parts[-2] == "wqkv"
    ):
        prefix = f"llm.layers.{parts[3]}.self_attn."
        chunks = split_wqkv(tensor, cfg.text, name)
        return {f"{prefix}{p}.{parts[-1]}": c for p, c in zip(("q_proj", "k_proj", "v_proj"), chunks)}
    target = table.to_ours(name)
    return None if target is None else {target: tensor}


def tie_lm_head(ours: dict[str, torch.Tensor], cfg: ModelConfig) -> None:
    """Tied embeddings: transformers stores the embedding only; our model names both."""
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in ours and "llm.embed_tokens.weight" in ours:
        ours["lm_head.weight"] = ours["llm.embed_tokens.weight"]


def state_dict_to_ours(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict, list[str]]:
    """HF tensors -> (our tensors, HF names no rule maps). Shapes are checked by the caller."""
    table = rename_table(cfg.text.arch)
    ours: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for name, tensor in hf_sd.items():
        mapped = tensor_to_ours(name, tensor, cfg, table)
        if mapped is None:
            unmapped.append(name)
        else:
            ours.update(mapped)
    tie_lm_head(ours, cfg)
    return ours, unmapped


def state_dict_from_ours(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our tensors (complete, checked) -> HF tensors."""
    table = rename_table(cfg.text.arch)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        parts = name.split(".")
        if name.startswith("vision.layers.") and parts[-2] in ("q_proj", "k_proj", "v_proj"):
            if parts[-2] == "q_proj":
                prefix, leaf = f"vision.layers.{parts[2]}.attn.", parts[-1]
                fused = torch.cat([sd[f"{prefix}{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj")])
                out[f"vision_model.encoder.layers.{parts[2]}.attn.qkv.{leaf}"] = fused
        elif (
            cfg.text.arch == "internlm2"
            and name.startswith("llm.layers.")
            and parts[-2] in ("q_proj", "k_proj", "v_proj")
        ):
            if parts[-2] == "q_proj":
                prefix, leaf = f"llm.layers.{parts[2]}.self_attn.", parts[-1]
                q, k, v = (sd[f"{prefix}{p}.{leaf}"] for p in ("q_proj", "k_proj", "v_proj"))
                out[f"language_model.model.layers.{parts[2]}.attention.wqkv.{leaf}"] = fuse_wqkv(
                    q, k, v, cfg.text
                )
        elif name == "lm_head.weight" and cfg.text.tie_word_embeddings:
            continue  # tied: transformers stores the embedding only
        else:
            target = table.to_hf(name)
            if target is None:
                raise CheckpointError(f"no InternVL-Chat name for tensor {name}")
            out[target] = tensor
    return out
