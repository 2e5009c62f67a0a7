"""The native single-file checkpoint: ``model.safetensors`` (our state dict) + ``config.json`` (ModelConfig).

Until the trainer's sharded (DCP) format exists this is what ``python -m mllm.convert import-hf`` writes and
``export-hf`` reads. Writes are atomic: everything goes into a temporary sibling directory, is fsynced, and is
renamed into place, so a crash never leaves a half-written checkpoint under the final name.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mllm.convert.errors import CheckpointError
from mllm.model.config import ModelConfig, TextConfig, VisionConfig
from mllm.model.lora import LoraConfig

FORMAT_NAME = "mllm-native"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def config_to_dict(cfg: ModelConfig) -> dict[str, Any]:
    return {"mllm_format": FORMAT_NAME, "format_version": FORMAT_VERSION, "model": dataclasses.asdict(cfg)}


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise CheckpointError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
    return cls(**values)


def config_from_dict(d: dict[str, Any], where: str = CONFIG_FILE) -> ModelConfig:
    if d.get("mllm_format") != FORMAT_NAME:
        raise CheckpointError(
            f'{where}: not an mllm native checkpoint config (no "mllm_format": "{FORMAT_NAME}")'
        )
    if d.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format_version {d.get('format_version')!r} unsupported (this mllm reads {FORMAT_VERSION})"
        )
    model = dict(d["model"])
    vision = _build(VisionConfig, model.pop("vision"), f"{where} model.vision")
    text = _build(TextConfig, model.pop("text"), f"{where} model.text")
    lora = _build(LoraConfig, model.pop("lora", {}), f"{where} model.lora")  # absent before LoRA existed
    return _build(ModelConfig, {**model, "vision": vision, "text": text, "lora": lora}, f"{where} model")


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(out_dir: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory that replaces ``out_dir`` (if any) once the block succeeds."""
    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        _fsync_tree(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _state_dict(model_or_state_dict: nn.Module | dict[str, torch.Tensor], cfg: ModelConfig) -> dict:
    sd = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    if cfg.text.tie_word_embeddings:
        sd.pop("lm_head.weight", None)  # safetensors refuses shared storage; load_native re-ties
    return sd


def save_native(
    model_or_state_dict: nn.Module | dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    extra_files: dict[str, Path] | None = None,
) -> Path:
    """Write ``out_dir/{model.safetensors,config.json}`` atomically; ``extra_files`` (name -> source) are copied
    in too (tokenizer files). Returns the final directory."""
    sd = _state_dict(model_or_state_dict, cfg)
    with atomic_directory(out_dir) as tmp:
        save_file(sd, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / CONFIG_FILE).write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
        for name, src in (extra_files or {}).items():
            shutil.copy2(src, tmp / name)
    return Path(out_dir)


def is_native(ckpt_dir: str | os.PathLike) -> bool:
    path = Path(ckpt_dir) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("mllm_format") == FORMAT_NAME
    except (json.JSONDecodeError, AttributeError):
        return False


def load_native(ckpt_dir: str | os.PathLike) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(state dict in the stored dtypes, ModelConfig) from a native checkpoint directory."""
    root = Path(ckpt_dir)
    for name, what in ((CONFIG_FILE, "the model config"), (WEIGHTS_FILE, "the weights")):
        if not (root / name).is_file():
            raise CheckpointError(
                f"{root / name} not found: a native checkpoint needs {name} ({what}); "
                "create one with `python -m mllm.convert import-hf HF_DIR OUT_DIR`"
            )
    cfg = config_from_dict(json.loads((root / CONFIG_FILE).read_text()), str(root / CONFIG_FILE))
    sd = load_file(str(root / WEIGHTS_FILE))
    if cfg.text.tie_word_embeddings and "llm.embed_tokens.weight" in sd:
        sd["lm_head.weight"] = sd["llm.embed_tokens.weight"]
    return sd, cfg
