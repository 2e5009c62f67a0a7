"""Read and write whole checkpoints in any supported format; the key/config mapping lives per format.

Formats: ``native`` (``mllm.checkpoint_io``), ``internvl_chat`` (remote-code layout) and ``transformers``
(``InternVLForConditionalGeneration``). Everything passes through our state dict + ModelConfig, so a new format
(e.g. the trainer's sharded DCP checkpoint) only needs a reader/writer of that pair.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch

from mllm import checkpoint_io
from mllm.convert import files, internvl_chat, transformers_native
from mllm.convert.errors import CheckpointError, name_a_few
from mllm.model.config import ModelConfig
from mllm.model.internvl import build_model

HF_FORMATS: dict[str, ModuleType] = {"internvl_chat": internvl_chat, "transformers": transformers_native}
_ARCHITECTURES = {  # config.json's model_type / architectures[0] -> format
    "internvl_chat": "internvl_chat",
    "InternVLChatModel": "internvl_chat",
    "internvl": "transformers",
    "InternVLForConditionalGeneration": "transformers",
}
IMAGE_TOKEN = "<IMG_CONTEXT>"


def detect_format(ckpt_dir: str | os.PathLike) -> str:
    """'native', 'internvl_chat' or 'transformers' from the directory's config.json."""
    root = Path(ckpt_dir)
    config = files.read_config(root)
    if config.get("mllm_format") == checkpoint_io.FORMAT_NAME:
        return "native"
    names = [config.get("model_type"), *(config.get("architectures") or [])]
    for name in names:
        if name in _ARCHITECTURES:
            return _ARCHITECTURES[name]
    shown = (config.get("architectures") or [None])[0] or config.get("model_type")
    raise CheckpointError(
        f"{root / files.CONFIG_FILE}: unknown architecture {shown!r}; supported: InternVLChatModel "
        "(model_type internvl_chat), InternVLForConditionalGeneration (model_type internvl), or an mllm native "
        "checkpoint"
    )


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``cfg`` (built on the meta device: no memory)."""
    return {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}


def check_state_dict(
    sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    where: str,
    hf_name: Callable[[str], str | None] | None = None,
    unmapped: list[str] = (),
) -> None:
    """One-line errors for unexpected, missing or wrongly shaped tensors (HF names when ``hf_name`` maps)."""

    def shown(name: str) -> str:
        other = hf_name(name) if hf_name else None
        return other or name

    expected = expected_shapes(cfg)
    unexpected = list(unmapped) + [shown(k) for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensors not in the model described by config.json: {name_a_few(unexpected)}"
        )
    missing = [shown(k) for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{where}: missing tensors: {name_a_few(missing)}")
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise CheckpointError(
                f"{where}: tensor {shown(name)} has shape {tuple(sd[name].shape)}, expected {shape} "
                "from config.json"
            )


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def read_hf(hf_dir: str | os.PathLike, fmt: str | None = None) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Our (state dict, ModelConfig) from an HF directory of either format; dtypes as stored."""
    root = Path(hf_dir)
    fmt = fmt or detect_format(root)
    module = HF_FORMATS[fmt]
    where = str(root / files.CONFIG_FILE)
    cfg = module.config_to_ours(files.read_config(root), files.added_token_id(root, IMAGE_TOKEN), where)
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e
    sd, unmapped = module.state_dict_to_ours(files.read_safetensors(root), cfg)
    table = module.rename_table(cfg.text.arch) if fmt == "internvl_chat" else module.TABLE
    check_state_dict(sd, cfg, str(root), table.to_hf, unmapped)
    return sd, cfg


def read_checkpoint(ckpt_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state dict, ModelConfig) from a native or HF directory."""
    fmt = detect_format(ckpt_dir)
    if fmt == "native":
        sd, cfg = checkpoint_io.load_native(ckpt_dir)
        check_state_dict(sd, cfg, str(ckpt_dir))
        return sd, cfg
    return read_hf(ckpt_dir, fmt)


def write_hf(
    sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    fmt: str,
    max_shard_size: str | int = files.DEFAULT_MAX_SHARD_SIZE,
    tokenizer_dir: str | os.PathLike | None = None,
) -> Path:
    """Write an HF directory (weights, config.json, generation_config.json, tokenizer files) atomically."""
    if fmt not in HF_FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; supported: {', '.join(HF_FORMATS)}")
    module = HF_FORMATS[fmt]
    check_state_dict(sd, cfg, "model to export")
    config = module.config_from_ours(cfg)  # raises before anything is written (e.g. v1 -> transformers)
    hf_sd = module.state_dict_from_ours(sd, cfg)
    dtypes = {t.dtype for t in hf_sd.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        config["torch_dtype" if fmt == "internvl_chat" else "dtype"] = str(next(iter(dtypes))).removeprefix(
            "torch."
        )
    src = Path(tokenizer_dir) if tokenizer_dir is not None else None
    text = config.get("llm_config") or config.get("text_config") or {}
    gen = files.generation_config(src, text.get("bos_token_id"), text.get("eos_token_id"))
    with checkpoint_io.atomic_directory(out_dir) as tmp:
        files.write_safetensors(hf_sd, tmp, max_shard_size)
        files.write_json(tmp / files.CONFIG_FILE, config)
        files.write_json(tmp / files.GENERATION_CONFIG_FILE, gen)
        for name, path in (files.tokenizer_files(src) if src else {}).items():
            (tmp / name).write_bytes(path.read_bytes())
    return Path(out_dir)


def import_hf(
    hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: torch.dtype | None = None
) -> Path:
    """HF directory (either format) -> native checkpoint directory (tokenizer and generation config copied)."""
    sd, cfg = read_hf(hf_dir)
    extra = files.tokenizer_files(Path(hf_dir))
    gen = Path(hf_dir) / files.GENERATION_CONFIG_FILE
    if gen.is_file():
        extra[files.GENERATION_CONFIG_FILE] = gen
    return checkpoint_io.save_native(_cast(sd, dtype), cfg, out_dir, extra_files=extra)


def export_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    fmt: str,
    max_shard_size: str | int = files.DEFAULT_MAX_SHARD_SIZE,
    dtype: torch.dtype | None = None,
) -> Path:
    """Native (or HF) checkpoint directory -> HF directory of format ``fmt``."""
    sd, cfg = read_checkpoint(ckpt_dir)
    return write_hf(_cast(sd, dtype), cfg, out_dir, fmt, max_shard_size, tokenizer_dir=ckpt_dir)
