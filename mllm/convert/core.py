"""Read and write whole checkpoints in any supported format; the key/config mapping lives per format.

Formats: ``native`` (``mllm.checkpoint_io``), ``internvl_chat`` (remote-code layout), ``transformers``
(``InternVLForConditionalGeneration``) and, read-only, ``trainer`` (a ``step_*`` directory of the trainer: DCP
shards of any tp/pp/dp layout + ``model_config.json``, see ``mllm.convert.trainer_checkpoint``). Everything passes through our
state dict + ModelConfig, so a new format only needs a reader/writer of that pair.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType

import torch

from mllm import checkpoint_io
from mllm.convert import files, internvl_chat, peft_adapter, transformers_native
from mllm.convert.errors import CheckpointError, name_a_few
from mllm.convert.lazy import LazyStateDict, SafetensorsSource, TensorMapper, map_lazily, shapes_of
from mllm.convert.processor import ImageSettings, image_settings_of, processor_files
from mllm.convert.shapes import expected_shapes
from mllm.convert.text_config import text_arch, text_config_to_ours
from mllm.convert.trainer_checkpoint import is_trainer_checkpoint, read_trainer_checkpoint, tokenizer_dir_of
from mllm.model.config import ModelConfig
from mllm.model.lora import LoraConfig, is_adapter_name, merge_lora

HF_FORMATS: dict[str, ModuleType] = {"internvl_chat": internvl_chat, "transformers": transformers_native}
_ARCHITECTURES = {  # config.json's model_type / architectures[0] -> format
    "internvl_chat": "internvl_chat",
    "InternVLChatModel": "internvl_chat",
    "internvl": "transformers",
    "InternVLForConditionalGeneration": "transformers",
}
IMAGE_TOKEN = "<IMG_CONTEXT>"


def detect_format(ckpt_dir: str | os.PathLike) -> str:
    """'trainer' for a trainer checkpoint (DCP ``.metadata``), else 'native', 'internvl_chat' or
    'transformers' from the directory's config.json."""
    root = Path(ckpt_dir)
    if is_trainer_checkpoint(root):
        return "trainer"
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


def check_state_dict(
    sd: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    where: str,
    hf_name: Callable[[str], str | None] | None = None,
    unmapped: list[str] = (),
) -> None:
    """One-line errors for unexpected, missing or wrongly shaped tensors (HF names when ``hf_name`` maps)."""

    def shown(name: str) -> str:
        other = hf_name(name) if hf_name else None
        return other or name

    _check_against(shapes_of(sd), expected_shapes(cfg), where, shown, unmapped, "config.json")


def _check_against(
    sd: dict[str, tuple[int, ...]],
    expected: dict[str, tuple[int, ...]],
    where: str,
    shown: Callable[[str], str],
    unmapped: list[str],
    source: str,
) -> None:
    unexpected = list(unmapped) + [shown(k) for k in sd if k not in expected]
    if unexpected:
        raise CheckpointError(
            f"{where}: unexpected tensors not in the model described by {source}: {name_a_few(unexpected)}"
        )
    missing = [shown(k) for k in expected if k not in sd]
    if missing:
        raise CheckpointError(f"{where}: missing tensors: {name_a_few(missing)}")
    for name, shape in expected.items():
        if tuple(sd[name]) != shape:
            raise CheckpointError(
                f"{where}: tensor {shown(name)} has shape {tuple(sd[name])}, expected {shape} from {source}"
            )


def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    if dtype is None:
        return sd
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}


def _tie_lm_head(sd: LazyStateDict, cfg: ModelConfig) -> None:
    """Tied embeddings: HF stores the embedding only; our model names both."""
    if cfg.text.tie_word_embeddings and "lm_head.weight" not in sd and "llm.embed_tokens.weight" in sd:
        sd.alias("lm_head.weight", "llm.embed_tokens.weight")


def _hf_mapper(fmt: str, cfg: ModelConfig) -> TensorMapper:
    if fmt == "internvl_chat":
        table = internvl_chat.rename_table(cfg.text.arch)
        return lambda name, tensor: internvl_chat.tensor_to_ours(name, tensor, cfg, table)
    return transformers_native.tensor_to_ours


def _done(sd: LazyStateDict, lazy: bool) -> Mapping[str, torch.Tensor]:
    return sd if lazy else sd.materialize()


def read_hf(
    hf_dir: str | os.PathLike, fmt: str | None = None, lazy: bool = False
) -> tuple[Mapping[str, torch.Tensor], ModelConfig]:
    """Our (state dict, ModelConfig) from an HF directory of either format; dtypes as stored.

    ``lazy``: a ``LazyStateDict`` (names and shapes checked from the file headers, each tensor read and mapped
    when accessed) instead of all tensors in memory.
    """
    root = Path(hf_dir)
    fmt = fmt or detect_format(root)
    module = HF_FORMATS[fmt]
    where = str(root / files.CONFIG_FILE)
    cfg = module.config_to_ours(files.read_config(root), files.added_token_id(root, IMAGE_TOKEN), where)
    try:
        cfg.validate()
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from e
    sd, unmapped = map_lazily(files.open_safetensors(root), _hf_mapper(fmt, cfg))
    _tie_lm_head(sd, cfg)
    table = module.rename_table(cfg.text.arch) if fmt == "internvl_chat" else module.TABLE
    check_state_dict(sd, cfg, str(root), table.to_hf, unmapped)
    return _done(sd, lazy), cfg


def _open_native(ckpt_dir: str | os.PathLike) -> tuple[LazyStateDict, ModelConfig]:
    """A native checkpoint as a lazy state dict (same checks as ``checkpoint_io.load_native``)."""
    root = Path(ckpt_dir)
    config, weights = root / checkpoint_io.CONFIG_FILE, root / checkpoint_io.WEIGHTS_FILE
    if not (config.is_file() and weights.is_file()):
        checkpoint_io.load_native(root)  # raises its one-line error naming the missing file
    cfg = checkpoint_io.config_from_dict(json.loads(config.read_text()), str(config))
    sd, _ = map_lazily(SafetensorsSource([weights]), lambda name, tensor: {name: tensor})
    _tie_lm_head(sd, cfg)
    return sd, cfg


def read_checkpoint(
    ckpt_dir: str | os.PathLike, lazy: bool = False
) -> tuple[Mapping[str, torch.Tensor], ModelConfig]:
    """(state dict, ModelConfig) from a native, HF or trainer checkpoint directory.

    ``lazy``: native and HF checkpoints come as a ``LazyStateDict`` (each tensor read when accessed, so a
    pipeline stage reads only its own); a trainer checkpoint (DCP shards of another layout) is read whole.
    """
    fmt = detect_format(ckpt_dir)
    if fmt == "trainer":
        return read_trainer_checkpoint(ckpt_dir)
    if fmt == "native":
        sd, cfg = _open_native(ckpt_dir)
        check_state_dict(sd, cfg, str(ckpt_dir))
        return _done(sd, lazy), cfg
    return read_hf(ckpt_dir, fmt, lazy)


def write_hf(
    sd: dict[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | os.PathLike,
    fmt: str,
    max_shard_size: str | int = files.DEFAULT_MAX_SHARD_SIZE,
    tokenizer_dir: str | os.PathLike | None = None,
    image: ImageSettings | None = None,
) -> Path:
    """Write an HF directory (weights, config.json, generation_config.json, tokenizer files) atomically; the
    transformers format also gets the processor files (``mllm.convert.processor``; ``image``: tiling limits)."""
    if fmt not in HF_FORMATS:
        raise CheckpointError(f"unknown export format {fmt!r}; supported: {', '.join(HF_FORMATS)}")
    module = HF_FORMATS[fmt]
    check_state_dict(sd, cfg, "model to export")
    sd, cfg = merged(sd, cfg)
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
        if fmt == "transformers" and src is not None:
            for name, text in processor_files(cfg, src, image or image_settings_of(src)).items():
                (tmp / name).write_text(text)
    return Path(out_dir)


def merged(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """A model with LoRA adapters as the plain model they compute (W + s B A); others unchanged."""
    if not cfg.lora.enabled:
        return dict(sd), cfg
    return merge_lora(sd, cfg.lora), dataclasses.replace(cfg, lora=LoraConfig())


def without_adapters(
    sd: Mapping[str, torch.Tensor], cfg: ModelConfig
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """The base model under the adapters (trained non-adapter weights kept, adapters dropped)."""
    return {k: v for k, v in sd.items() if not is_adapter_name(k)}, dataclasses.replace(
        cfg, lora=LoraConfig()
    )


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
    adapter_dir: str | os.PathLike | None = None,
) -> Path:
    """Native, HF or trainer checkpoint directory -> HF directory of format ``fmt`` (tokenizer files from the
    checkpoint directory, or for a trainer checkpoint from its run's ``data.tokenizer`` directory).

    LoRA adapters are merged into the weights, unless ``adapter_dir`` is given: then ``out_dir`` gets the base
    model (format ``transformers`` only) and ``adapter_dir`` a PEFT adapter for it (``mllm.convert.peft_adapter``).
    """
    sd, cfg = read_checkpoint(ckpt_dir)
    tokenizer_dir: str | os.PathLike | None = ckpt_dir
    if detect_format(ckpt_dir) == "trainer":
        tokenizer_dir = tokenizer_dir_of(ckpt_dir)
    image = image_settings_of(Path(ckpt_dir))  # the run's tiling limits (trainer) or the source processor's
    sd = _cast(sd, dtype)
    if adapter_dir is None:
        return write_hf(sd, cfg, out_dir, fmt, max_shard_size, tokenizer_dir, image)
    if fmt != "transformers":
        raise CheckpointError(
            f"--adapter writes a PEFT adapter for the transformers-native model; use --format transformers, not {fmt}"
        )
    if not cfg.lora.enabled:
        raise CheckpointError(f"{ckpt_dir}: --adapter given but the checkpoint has no LoRA adapters")
    base_sd, base_cfg = without_adapters(sd, cfg)
    out = write_hf(base_sd, base_cfg, out_dir, fmt, max_shard_size, tokenizer_dir, image)
    peft_adapter.write_adapter(sd, cfg.lora, adapter_dir, str(Path(out_dir).resolve()))
    return out


# -- part checkpoints (a separate InternViT or LLM, e.g. the start of stage-1 training) ----------------------
_VISION_FIELDS = (  # VisionConfig fields that decide the tensors' names and shapes
    "hidden_size",
    "num_layers",
    "num_heads",
    "intermediate_size",
    "image_size",
    "patch_size",
    "num_channels",
    "norm_type",
    "qkv_bias",
    "qk_norm",
)
_TEXT_FIELDS = (
    "arch",
    "vocab_size",
    "hidden_size",
    "num_layers",
    "num_heads",
    "num_kv_heads",
    "resolved_head_dim",
    "intermediate_size",
    "qkv_bias",
    "o_bias",
    "tie_word_embeddings",
    "qk_norm",
)


def _check_part_config(ckpt: object, ours: object, fields: tuple[str, ...], where: str, key: str) -> None:
    """The part checkpoint's config.json describes the same tensors as the run's ``model.<key>``."""
    for field in fields:
        theirs, mine = getattr(ckpt, field), getattr(ours, field)
        if theirs != mine:
            raise CheckpointError(
                f"{where}: {field} is {theirs!r} but the run's model.{key}.{field} is {mine!r}; use a "
                f"checkpoint of the configured model or set model.{key} to match it"
            )


def _read_part(
    ckpt_dir: str | os.PathLike,
    cfg: ModelConfig,
    hf_prefix: str,
    ours: tuple[str, ...],
    what: str,
    lazy: bool = False,
) -> Mapping[str, torch.Tensor]:
    """Map a standalone checkpoint's tensors (names without ``hf_prefix``) with the InternVL-Chat rules and
    check them against the run's model config: exactly the tensors under ``ours``, with their shapes."""
    root = Path(ckpt_dir)
    table = internvl_chat.rename_table(cfg.text.arch)

    def map_one(name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor] | None:
        full = name if name.startswith(hf_prefix) else hf_prefix + name  # InternVL-Chat prefix optional
        mapped = internvl_chat.tensor_to_ours(full, tensor, cfg, table)
        return mapped if mapped is not None and all(k.startswith(ours) for k in mapped) else None

    sd, unmapped = map_lazily(files.open_safetensors(root), map_one)
    _tie_lm_head(sd, cfg)

    def shown(name: str) -> str:
        hf = table.to_hf(name)
        return hf.removeprefix(hf_prefix) if hf else name

    expected = {k: v for k, v in expected_shapes(cfg).items() if k.startswith(ours)}
    where = f"{root} ({what})"
    _check_against(shapes_of(sd), expected, where, shown, unmapped, "the run's model config")
    return _done(sd, lazy)


def read_vision_checkpoint(
    ckpt_dir: str | os.PathLike, model_cfg: ModelConfig, lazy: bool = False
) -> Mapping[str, torch.Tensor]:
    """A standalone InternViT HF checkpoint (InternViT-6B / 300M: ``embeddings.*``, ``encoder.layers.{i}.*``,
    or the same under InternVL-Chat's ``vision_model.``) -> our ``vision.*`` tensors for ``model_cfg``.

    config.json must describe the run's ViT (sizes, norm, biases); one-line errors name the key or tensor.
    ``lazy`` as in ``read_checkpoint``.
    """
    root = Path(ckpt_dir)
    where = str(root / files.CONFIG_FILE)
    config = files.read_config(root)
    config = config.get("vision_config", config)  # an InternVL-Chat config.json carries it nested
    ckpt = internvl_chat.vision_config_to_ours(config, where)
    _check_part_config(ckpt, model_cfg.vision, _VISION_FIELDS, where, "vision")
    return _read_part(root, model_cfg, "vision_model.", ("vision.",), "InternViT checkpoint", lazy)


def read_llm_checkpoint(
    ckpt_dir: str | os.PathLike, model_cfg: ModelConfig, lazy: bool = False
) -> Mapping[str, torch.Tensor]:
    """A standalone LLM HF checkpoint -> our ``llm.*`` and ``lm_head.*`` tensors for ``model_cfg``.

    InternLM2 (``model.tok_embeddings``, ``model.layers.{i}.attention.wqkv``, ..., ``output.weight``) or
    Llama / Qwen2 / Qwen3 (``model.embed_tokens``, ..., ``lm_head.weight``); the architecture in config.json must be
    the run's ``model.text.arch``, and its sizes the run's. ``lazy`` as in ``read_checkpoint``.
    """
    root = Path(ckpt_dir)
    where = str(root / files.CONFIG_FILE)
    config = files.read_config(root)
    config = config.get("llm_config", config)
    ckpt = text_config_to_ours(config, text_arch(config, where), where)
    _check_part_config(ckpt, model_cfg.text, _TEXT_FIELDS, where, "text")
    return _read_part(root, model_cfg, "language_model.", ("llm.", "lm_head."), "LLM checkpoint", lazy)
