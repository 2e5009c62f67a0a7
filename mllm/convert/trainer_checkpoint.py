"""A trainer checkpoint as (single-device state dict, ModelConfig), read in one process without a process group.

Every ``step_*`` directory carries ``model_config.json`` (the ModelConfig in ``mllm.checkpoint_io``'s native
form) and ``config.yaml`` (the resolved run config), written by the trainer (``mllm.train.export``) with the rest
before the atomic commit. So ``python -m mllm.convert export-hf RUN_DIR/checkpoints/step_XXXXXXXX OUT --format
transformers`` and ``mllm.hf.load(step_dir)`` need nothing else: ``mllm.convert.core`` detects the format with
``is_trainer_checkpoint`` and reads it with ``read_trainer_checkpoint``. DCP assembles each full tensor from the
saved tp/pp chunks, whatever layout wrote them. This module sits below both ``mllm.convert.core`` and
``mllm.train``, so neither imports the other to read checkpoints.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from mllm import checkpoint_io
from mllm.convert.errors import CheckpointError, name_a_few
from mllm.convert.shapes import expected_shapes
from mllm.model.config import ModelConfig

MODEL_PREFIX = "model/"
MODEL_CONFIG_FILE = "model_config.json"
RUN_CONFIG_FILE = "config.yaml"
DCP_METADATA_FILE = ".metadata"


def is_trainer_checkpoint(path: str | os.PathLike) -> bool:
    return (Path(path) / DCP_METADATA_FILE).is_file()


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    """The ModelConfig recorded in a trainer checkpoint."""
    file = Path(path) / MODEL_CONFIG_FILE
    if not file.is_file():
        raise CheckpointError(
            f"{file} not found: this checkpoint predates recorded model configs; load it with "
            "mllm.convert.trainer_checkpoint.read_trainer_checkpoint(path, run.model) and the run's recipe"
        )
    return checkpoint_io.config_from_dict(json.loads(file.read_text()), str(file))


def tokenizer_dir_of(path: str | os.PathLike) -> Path | None:
    """The run's ``data.tokenizer`` when it is a local directory (copied into exports), else None."""
    file = Path(path) / RUN_CONFIG_FILE
    if not file.is_file():
        return None
    from omegaconf import OmegaConf

    tokenizer = OmegaConf.select(OmegaConf.load(file), "data.tokenizer", default=None)
    return Path(tokenizer) if tokenizer and Path(tokenizer).is_dir() else None


def read_trainer_checkpoint(
    path: str | os.PathLike, cfg: ModelConfig | None = None
) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """(full fp32 state dict under single-device names, ModelConfig) of the trainer checkpoint ``path``.

    ``cfg`` defaults to the checkpoint's ``model_config.json``; a given one (the recipe's ``model``) must
    describe the stored tensors, else one line names those that do not fit.
    """
    root = Path(path)
    if not is_trainer_checkpoint(root):
        raise CheckpointError(
            f"{root}: not a trainer checkpoint (no {DCP_METADATA_FILE}); pass RUN_DIR/checkpoints/step_XXXXXXXX"
        )
    cfg = cfg if cfg is not None else read_model_config(root)
    reader = dcp.FileSystemReader(str(root))
    stored = {
        k[len(MODEL_PREFIX) :]: tuple(v.size)
        for k, v in reader.read_metadata().state_dict_metadata.items()
        if k.startswith(MODEL_PREFIX)
    }
    shapes = expected_shapes(cfg)
    if cfg.text.tie_word_embeddings:  # one tensor, saved under the embedding's name
        shapes.pop("lm_head.weight", None)
    missing = [k for k in shapes if k not in stored]
    wrong = [f"{k} {stored[k]} != {s}" for k, s in shapes.items() if k in stored and stored[k] != s]
    if missing or wrong:
        problem = f"missing {name_a_few(missing)}" if missing else f"shapes differ: {name_a_few(wrong, 3)}"
        raise CheckpointError(
            f"{root}: does not hold the recipe's model ({problem}); export with the run's recipe"
        )
    tensors = {MODEL_PREFIX + k: torch.empty(s, dtype=torch.float32) for k, s in shapes.items()}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized": one process is the intent
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(tensors, storage_reader=reader, no_dist=True)
    sd = {k[len(MODEL_PREFIX) :]: v for k, v in tensors.items()}
    if cfg.text.tie_word_embeddings:
        sd["lm_head.weight"] = sd["llm.embed_tokens.weight"]
    return sd, cfg
