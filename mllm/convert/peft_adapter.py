"""LoRA adapters as a PEFT adapter directory for the transformers-native export of the base model.

``adapter_model.safetensors`` holds ``base_model.model.<module>.lora_A.weight`` / ``lora_B.weight`` with
``<module>`` the in-memory name in transformers' ``InternVLForConditionalGeneration``
(``model.language_model.layers.0.self_attn.q_proj``, ``model.vision_tower.encoder.layer.0.attention.q_proj``);
``adapter_config.json`` is a PEFT ``LoraConfig`` naming exactly those modules, with ``rank_pattern`` /
``alpha_pattern`` when the ViT and LLM ranks differ. ``PeftModel.from_pretrained(base, adapter_dir)`` then
computes what the trained model computes (tested in tests/train/test_lora_export.py).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from mllm import checkpoint_io
from mllm.convert import files, transformers_native
from mllm.convert.errors import CheckpointError
from mllm.model.lora import LoraConfig, adapter_pairs

ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."


def _hf_module(base: str) -> str:
    """Our adapted linear's name -> its module name in transformers' in-memory model."""
    saved = transformers_native.TABLE.to_hf(f"{base}.weight")
    if saved is None:
        raise CheckpointError(f"no transformers name for adapted layer {base}")
    return transformers_native.in_memory_name(saved).removesuffix(".weight")


def adapter_files(
    sd: dict[str, torch.Tensor], lora: LoraConfig, base_model_path: str
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(PEFT tensors, adapter_config.json dict) for the adapters in our full state dict ``sd``."""
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, tuple[int, float]] = {}
    for base, (a, b) in adapter_pairs(sd).items():
        module = _hf_module(base)
        tensors[f"{PEFT_PREFIX}{module}.lora_A.weight"] = a.contiguous()
        tensors[f"{PEFT_PREFIX}{module}.lora_B.weight"] = b.contiguous()
        rank, scaling, _ = lora.part("vision" if base.startswith("vision.") else "llm")
        ranks[module] = (rank, scaling * rank)
    if not ranks:
        raise CheckpointError("the checkpoint has no LoRA adapters (lora.vision and lora.llm were 0)")
    main_part = "llm" if lora.llm else "vision"
    r, scaling, _ = lora.part(main_part)
    alpha = scaling * r
    others = {m: v for m, v in ranks.items() if v != (r, alpha)}
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_path,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(ranks),
        "rank_pattern": {m: v[0] for m, v in others.items()},
        "alpha_pattern": {m: v[1] for m, v in others.items()},
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
    }
    return tensors, config


def write_adapter(
    sd: dict[str, torch.Tensor], lora: LoraConfig, out_dir: str | os.PathLike, base_model_path: str
) -> Path:
    """Write the PEFT adapter directory atomically."""
    tensors, config = adapter_files(sd, lora, base_model_path)
    with checkpoint_io.atomic_directory(out_dir) as tmp:
        # One file under PEFT's fixed name (adapters are small; PEFT reads no sharded index).
        save_file({k: v.detach().cpu() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS_FILE))
        files.write_json(tmp / ADAPTER_CONFIG_FILE, config)
    return Path(out_dir)
