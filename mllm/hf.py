"""Load and save InternVL models from/to Hugging Face directories (either format) or native checkpoints.

model = mllm.hf.load("OpenGVLab/InternVL-Chat-V1-5 local dir")      # eval mode
out = model(input_ids, pixel_values, segment_ids=segment_ids)      # out.logits [batch, seq, vocab]
mllm.hf.save(model, "out", format="transformers")
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from mllm import checkpoint_io
from mllm.convert import core
from mllm.convert.files import DEFAULT_MAX_SHARD_SIZE
from mllm.convert.processor import ImageSettings
from mllm.model.config import ModelConfig
from mllm.model.internvl import InternVLModel, build_model

FORMATS = ("native", *core.HF_FORMATS)


def model_from_state_dict(
    sd: dict[str, torch.Tensor], cfg: ModelConfig, dtype: torch.dtype | None = None
) -> InternVLModel:
    """Build the model on the meta device and adopt the tensors (no double allocation, dtypes kept)."""
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    model = build_model(cfg, "meta")
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.text.tie_word_embeddings:
        model.lm_head.weight = model.llm.embed_tokens.weight
    return model


def load(path: str | os.PathLike, dtype: torch.dtype | None = None) -> InternVLModel:
    """An InternVLModel in eval mode from an InternVL-Chat, transformers-native or native directory."""
    sd, cfg = core.read_checkpoint(path)
    return model_from_state_dict(sd, cfg, dtype).eval()


def save(
    model: InternVLModel,
    out_dir: str | os.PathLike,
    format: str = "native",  # noqa: A002 (mirrors the CLI's --format)
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    tokenizer_dir: str | os.PathLike | None = None,
    image: ImageSettings | None = None,
) -> Path:
    """Write ``model`` as ``format`` ('native', 'internvl_chat' or 'transformers'); tokenizer files copied from
    ``tokenizer_dir`` when given (transformers: with processor files, ``image`` = the tiling limits)."""
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; supported: {', '.join(FORMATS)}")
    sd = {k: v.detach() for k, v in model.state_dict().items()}
    if format == "native":
        from mllm.convert.files import tokenizer_files

        extra = tokenizer_files(Path(tokenizer_dir)) if tokenizer_dir else {}
        return checkpoint_io.save_native(sd, model.cfg, out_dir, extra_files=extra)
    return core.write_hf(sd, model.cfg, out_dir, format, max_shard_size, tokenizer_dir, image)
