"""Hugging Face directory I/O: (sharded) safetensors, config.json, tokenizer files, generation_config.json."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mllm.convert.errors import CheckpointError
from mllm.convert.lazy import SafetensorsSource

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"
_TOKENIZER_PATTERNS = (
    re.compile(r"^tokenizer.*"),
    re.compile(r"^special_tokens_map\.json$"),
    re.compile(r"^added_tokens\.json$"),
    re.compile(r".*\.model$"),  # sentencepiece (InternLM2's tokenizer.model)
    re.compile(r"^vocab\..*"),
    re.compile(r"^merges\.txt$"),
    re.compile(r"^chat_template\.(jinja|json)$"),
)


def read_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(f"{path} not found: expected {what}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e})") from e


def read_config(hf_dir: Path) -> dict[str, Any]:
    return read_json(hf_dir / CONFIG_FILE, "the model's config.json (a Hugging Face checkpoint directory)")


def safetensors_paths(hf_dir: Path) -> list[Path]:
    """The weight files: ``model.safetensors`` or the shards listed in ``model.safetensors.index.json``."""
    if (hf_dir / INDEX_FILE).is_file():
        index = read_json(hf_dir / INDEX_FILE, "a safetensors shard index")
        names = sorted(set(index.get("weight_map", {}).values()))
    elif (hf_dir / SINGLE_FILE).is_file():
        names = [SINGLE_FILE]
    else:
        raise CheckpointError(
            f"{hf_dir / SINGLE_FILE} not found (nor {INDEX_FILE}): expected the weights as safetensors; "
            "re-save a .bin checkpoint with save_pretrained(safe_serialization=True)"
        )
    paths = [hf_dir / name for name in names]
    for path in paths:
        if not path.is_file():
            raise CheckpointError(f"{path} not found: listed in {hf_dir / INDEX_FILE} as a weight shard")
    return paths


def open_safetensors(hf_dir: Path) -> SafetensorsSource:
    """The directory's tensors, listed from the file headers; data is read per tensor on access."""
    return SafetensorsSource(safetensors_paths(hf_dir))


def read_safetensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of ``model.safetensors`` or of the shards listed in ``model.safetensors.index.json``."""
    tensors: dict[str, torch.Tensor] = {}
    for path in safetensors_paths(hf_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                tensors[key] = f.get_tensor(key)
    return tensors


def parse_size(size: str | int) -> int:
    """'5GB', '200MB', '10KB', '123' -> bytes (decimal units, as transformers)."""
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", size, flags=re.IGNORECASE)
    if not m:
        raise CheckpointError(f"max shard size {size!r} not understood: use e.g. 5GB, 500MB or a byte count")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}[unit]
    return int(float(m.group(1)) * scale)


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_safetensors(
    tensors: dict[str, torch.Tensor], out_dir: Path, max_shard_size: str | int
) -> list[str]:
    """One ``model.safetensors``, or ``model-0000k-of-0000n.safetensors`` + index when over the shard size."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    shards = _shards(tensors, parse_size(max_shard_size))
    if len(shards) == 1:
        save_file(shards[0], str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return [SINGLE_FILE]
    names, weight_map = [], {}
    for k, shard in enumerate(shards, start=1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        names.append(name)
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def tokenizer_files(src_dir: Path) -> dict[str, Path]:
    """Tokenizer files of a checkpoint directory, name -> path."""
    if not src_dir.is_dir():
        return {}
    return {
        p.name: p
        for p in sorted(src_dir.iterdir())
        if p.is_file() and any(pat.match(p.name) for pat in _TOKENIZER_PATTERNS)
    }


def added_token_id(src_dir: Path, token: str) -> int | None:
    """The id of an added/special token from tokenizer.json or tokenizer_config.json, None when absent."""
    tok = src_dir / "tokenizer.json"
    if tok.is_file():
        for entry in json.loads(tok.read_text()).get("added_tokens", []):
            if entry.get("content") == token:
                return int(entry["id"])
    tok_cfg = src_dir / "tokenizer_config.json"
    if tok_cfg.is_file():
        for idx, entry in json.loads(tok_cfg.read_text()).get("added_tokens_decoder", {}).items():
            if entry.get("content") == token:
                return int(idx)
    added = src_dir / "added_tokens.json"
    if added.is_file():
        value = json.loads(added.read_text()).get(token)
        return int(value) if value is not None else None
    return None


def generation_config(src_dir: Path | None, bos: int | None, eos: int | None) -> dict[str, Any]:
    """The source's generation_config.json (if any) with missing ids filled in. eos: <|im_end|> first when the
    tokenizer has it (chat turns end there, so ``generate`` stops at the end of the answer), then the source's
    own eos ids; the text config's eos only when neither exists."""
    out: dict[str, Any] = {}
    if src_dir is not None and (src_dir / GENERATION_CONFIG_FILE).is_file():
        out = read_json(src_dir / GENERATION_CONFIG_FILE, "a generation config")
    im_end = added_token_id(src_dir, "<|im_end|>") if src_dir is not None else None
    if out.get("bos_token_id") is None and bos is not None:
        out["bos_token_id"] = bos
    own = out.get("eos_token_id")
    own = [] if own is None else own if isinstance(own, list) else [own]
    ids = list(dict.fromkeys(([im_end] if im_end is not None else []) + own)) or (
        [eos] if eos is not None else []
    )
    if ids:
        out["eos_token_id"] = ids[0] if len(ids) == 1 else ids
    return out
