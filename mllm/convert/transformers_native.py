"""transformers-native ``InternVLForConditionalGeneration`` layout <-> ours: config.json and tensor names.

Names follow what ``save_pretrained`` writes in transformers 5.24 (its llava-style conversion mapping reverts
the in-memory ``model.*`` names on save): ``vision_tower.*``, ``multi_modal_projector.*``,
``language_model.model.*`` and ``language_model.lm_head.weight``. On import the in-memory names
(``model.vision_tower.*``, ``model.language_model.*``, ``lm_head.weight``) are accepted too. The text model is
Llama, Qwen2 or Qwen3; InternLM2 is written as Llama (wqkv already split in our layout, w1/w3/w2 = gate/up/down).
transformers only implements pixel shuffle v2, so a v1 model cannot be exported to this format.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from mllm.convert.errors import CheckpointError
from mllm.convert.extras import deep_merge, unmapped_fields
from mllm.convert.renames import PrefixRule, RenameTable
from mllm.convert.text_config import text_arch, text_config_native, text_config_to_ours
from mllm.model.config import ModelConfig, VisionConfig

FORMAT = "transformers"
HF_QK_NORM_EPS = 1e-6  # InternVLVisionAttention builds q_norm/k_norm with the default eps, not layer_norm_eps

_LAYER = "vision_tower.encoder.layer.{i}."
_OURS = "vision.layers.{i}."
RULES = [
    PrefixRule("vision_tower.embeddings.cls_token", "vision.embeddings.class_embedding"),
    PrefixRule("vision_tower.embeddings.position_embeddings", "vision.embeddings.position_embedding"),
    PrefixRule("vision_tower.embeddings.patch_embeddings.projection.", "vision.embeddings.patch_embedding."),
    PrefixRule(_LAYER + "attention.q_proj.", _OURS + "attn.q_proj."),
    PrefixRule(_LAYER + "attention.k_proj.", _OURS + "attn.k_proj."),
    PrefixRule(_LAYER + "attention.v_proj.", _OURS + "attn.v_proj."),
    PrefixRule(_LAYER + "attention.q_norm.", _OURS + "attn.q_norm."),
    PrefixRule(_LAYER + "attention.k_norm.", _OURS + "attn.k_norm."),
    PrefixRule(_LAYER + "attention.projection_layer.", _OURS + "attn.proj."),
    PrefixRule(_LAYER + "lambda_1", _OURS + "ls1"),
    PrefixRule(_LAYER + "lambda_2", _OURS + "ls2"),
    PrefixRule(_LAYER + "layernorm_before.", _OURS + "norm1."),
    PrefixRule(_LAYER + "layernorm_after.", _OURS + "norm2."),
    PrefixRule(_LAYER + "mlp.", _OURS + "mlp."),
    PrefixRule("multi_modal_projector.layer_norm.", "projector.norm."),
    PrefixRule("multi_modal_projector.linear_1.", "projector.fc1."),
    PrefixRule("multi_modal_projector.linear_2.", "projector.fc2."),
    PrefixRule("language_model.model.", "llm."),
    PrefixRule("language_model.lm_head.", "lm_head."),
]
TABLE = RenameTable(RULES)

# In-memory (``model.state_dict()``) names -> saved names.
_IN_MEMORY_PREFIXES = [
    ("model.vision_tower.", "vision_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]


def saved_name(name: str) -> str:
    for memory, saved in _IN_MEMORY_PREFIXES:
        if name.startswith(memory):
            return saved + name[len(memory) :]
    return name


def in_memory_name(saved: str) -> str:
    """Inverse of ``saved_name``: the name in the loaded model (what PEFT's target modules match)."""
    for memory, prefix in _IN_MEMORY_PREFIXES:
        if saved.startswith(prefix):
            return memory + saved[len(prefix) :]
    return saved


# -- config ------------------------------------------------------------------------------------------------
def _square(value: Any, key: str, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise CheckpointError(
                f"{where}.{key} {list(value)} is not square; only square tiles are supported"
            )
        return int(value[0])
    return int(value)


def _vision_to_ours(v: dict[str, Any], where: str) -> VisionConfig:
    unsupported = {
        "hidden_act": ("gelu", v.get("hidden_act", "gelu")),
        "use_mean_pooling": (True, v.get("use_mean_pooling", True)),  # False adds a final LayerNorm
        "use_absolute_position_embeddings": (True, v.get("use_absolute_position_embeddings", True)),
    }
    for key, (want, got) in unsupported.items():
        if got != want:
            raise CheckpointError(f"{where}.{key} {got!r} unsupported: InternViT needs {want!r}")
    return VisionConfig(
        hidden_size=v["hidden_size"],
        num_layers=v["num_hidden_layers"],
        num_heads=v["num_attention_heads"],
        intermediate_size=v["intermediate_size"],
        image_size=_square(v.get("image_size", 448), "image_size", where),
        patch_size=_square(v.get("patch_size", 14), "patch_size", where),
        num_channels=v.get("num_channels", 3),
        norm_type=v.get("norm_type", "layer_norm"),
        norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(v.get("attention_bias", False)),
        qk_norm=bool(v.get("use_qk_norm", False)),
        layer_scale_init=float(v.get("layer_scale_init_value", 0.1)),
        drop_path_rate=float(v.get("drop_path_rate", 0.0)),  # not a transformers field; written when nonzero
    )


def config_to_ours(hf: dict[str, Any], tokenizer_image_token_id: int | None, where: str) -> ModelConfig:
    """InternVLConfig dict -> ModelConfig; unmapped fields go to ``hf_extra['transformers']``."""
    for key in ("vision_config", "text_config"):
        if key not in hf:
            raise CheckpointError(
                f"{where}: missing {key!r} (an InternVLConfig needs vision_config and text_config)"
            )
    if hf.get("vision_feature_select_strategy", "default") != "default":
        raise CheckpointError(
            f"{where}: vision_feature_select_strategy must be 'default' (CLS token dropped)"
        )
    if hf.get("projector_hidden_act", "gelu") != "gelu":
        raise CheckpointError(f"{where}: projector_hidden_act must be 'gelu'")
    layer = hf.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise CheckpointError(f"{where}: vision_feature_layer {layer!r} must be one integer")
    text_dict = hf["text_config"]
    text = text_config_to_ours(
        text_dict, text_arch(text_dict, f"{where} text_config"), f"{where} text_config"
    )
    # The tokenizer's <IMG_CONTEXT> id is what our data pipeline writes into input_ids, so it wins; the
    # config's image_token_id (what the HF processor uses) is the fallback when no tokenizer is shipped.
    image_token_id = tokenizer_image_token_id
    if image_token_id is None:
        image_token_id = hf.get("image_token_id", ModelConfig.image_token_id)
    if "tie_word_embeddings" in hf:
        text.tie_word_embeddings = bool(hf["tie_word_embeddings"])
    cfg = ModelConfig(
        vision=_vision_to_ours(hf["vision_config"], f"{where} vision_config"),
        text=text,
        downsample_ratio=float(hf.get("downsample_ratio", 0.5)),
        ps_version="v2",  # the only pixel shuffle transformers implements
        select_layer=layer,
        image_token_id=int(image_token_id),
    )
    cfg.hf_extra = {FORMAT: unmapped_fields(hf, config_from_ours(cfg, with_extra=False))}
    return cfg


def config_from_ours(cfg: ModelConfig, with_extra: bool = True) -> dict[str, Any]:
    """ModelConfig -> InternVLConfig dict (fields kept from import < our fields)."""
    v, where = cfg.vision, "export to transformers"
    if cfg.ps_version != "v2":
        raise CheckpointError(
            f"{where}: ps_version {cfg.ps_version!r} cannot be exported: transformers' InternVL only implements "
            "pixel shuffle v2; use --format internvl_chat for this model"
        )
    if cfg.projector_norm_eps != 1e-5:
        raise CheckpointError(
            f"{where}: the projector LayerNorm eps is fixed at 1e-5, got {cfg.projector_norm_eps}"
        )
    if v.qk_norm and v.norm_eps != HF_QK_NORM_EPS:
        warnings.warn(
            f"{where}: transformers' q_norm/k_norm use eps {HF_QK_NORM_EPS}, this model {v.norm_eps}; "
            "logits will differ slightly",
            stacklevel=2,
        )
    vision = {
        "model_type": "internvl_vision",
        "hidden_size": v.hidden_size,
        "num_hidden_layers": v.num_layers,
        "num_attention_heads": v.num_heads,
        "intermediate_size": v.intermediate_size,
        "image_size": [v.image_size, v.image_size],
        "patch_size": [v.patch_size, v.patch_size],
        "num_channels": v.num_channels,
        "norm_type": v.norm_type,
        "layer_norm_eps": v.norm_eps,
        "attention_bias": v.qkv_bias,
        "use_qk_norm": v.qk_norm,
        "layer_scale_init_value": v.layer_scale_init,
        "hidden_act": "gelu",
        "use_mean_pooling": True,
        "use_absolute_position_embeddings": True,
    }
    if v.drop_path_rate:
        vision["drop_path_rate"] = v.drop_path_rate
    ours = {
        "architectures": ["InternVLForConditionalGeneration"],
        "model_type": "internvl",
        "vision_config": vision,
        "text_config": text_config_native(cfg.text, f"{where} text_config"),
        "image_token_id": cfg.image_token_id,
        "image_seq_length": cfg.num_image_token,
        "downsample_ratio": cfg.downsample_ratio,
        "projector_hidden_act": "gelu",
        "vision_feature_layer": cfg.select_layer,
        "vision_feature_select_strategy": "default",
        "tie_word_embeddings": cfg.text.tie_word_embeddings,
    }
    if not with_extra:
        return ours
    return deep_merge(cfg.hf_extra.get(FORMAT, {}), ours)


# -- tensors -----------------------------------------------------------------------------------------------
def tensor_to_ours(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """One HF tensor (saved or in-memory name) -> {our name: tensor}; None when no rule maps it."""
    target = TABLE.to_ours(saved_name(name))
    return None if target is None else {target: tensor}


def state_dict_to_ours(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict, list[str]]:
    """HF tensors -> (our tensors, HF names no rule maps). Shapes are checked by the caller."""
    ours: dict[str, torch.Tensor] = {}
    unmapped: list[str] = []
    for name, tensor in hf_sd.items():
        mapped = tensor_to_ours(name, tensor)
        if mapped is None:
            unmapped.append(name)
        else:
            ours.update(mapped)
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in ours and "llm.embed_tokens.weight" in ours:
        ours["lm_head.weight"] = ours["llm.embed_tokens.weight"]
    return ours, unmapped


def state_dict_from_ours(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our tensors (complete, checked) -> HF tensors with the names save_pretrained writes."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in sd.items():
        if name == "lm_head.weight" and cfg.text.tie_word_embeddings:
            continue  # tied: transformers stores the embedding only
        target = TABLE.to_hf(name)
        if target is None:
            raise CheckpointError(f"no transformers name for tensor {name}")
        out[target] = tensor
    return out
