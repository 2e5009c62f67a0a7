"""Hydra glue: register the typed configs with ConfigStore, compose recipes, validate a run before it starts.

The only module that imports Hydra. Recipes live in ``recipes/`` (``recipes/model/`` holds the model presets)
and compose onto the structured schema ``run_schema`` (``mllm.train.config.RunConfig``), so unknown keys and
wrong types are rejected by OmegaConf at composition time. ``validate_run_config`` then runs every cross-field
check (layout vs world size, heads vs tp, stage split, global batch vs micro batch x dp, tiles per row, fast-path
keys, data files and the tokenizer's image token) with one clear message each, before any process group or model
exists.
"""

from __future__ import annotations

import os
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf

from mllm.data.config import DataConfig
from mllm.model.config import ModelConfig
from mllm.train.config import (
    CheckpointConfig,
    EvalConfig,
    LoggingConfig,
    OptimConfig,
    RunConfig,
    TrainConfig,
)
from parallel.config import ParallelConfig, validate_layout

# The repository's top-level recipes/ in a source checkout; mllm/recipes/ inside an installed wheel (setup.py
# maps the one onto the other). MLLM_RECIPES replaces it; --config-dir adds a user directory in front of it.
_SOURCE_RECIPES = Path(__file__).resolve().parent.parent / "recipes"
_BUNDLED_RECIPES = Path(__file__).resolve().parent / "recipes"
RECIPES_DIR = Path(
    os.environ.get("MLLM_RECIPES", _SOURCE_RECIPES if _SOURCE_RECIPES.is_dir() else _BUNDLED_RECIPES)
)
SCHEMA_NAME = "run_schema"
GROUP_SCHEMAS = {
    "model": ModelConfig,
    "parallel": ParallelConfig,
    "data": DataConfig,
    "optim": OptimConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "logging": LoggingConfig,
    "eval": EvalConfig,
}


class ConfigError(ValueError):
    """A recipe that cannot run; the message is one line naming the key and the fix."""


def register_configs() -> None:
    """Store ``run_schema`` (the whole run) and ``<group>/<group>_schema`` for each part (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=RunConfig)
    for group, node in GROUP_SCHEMAS.items():
        cs.store(group=group, name=f"{group}_schema", node=node)


def compose_run_config(
    config_name: str, overrides: list[str] | None = None, config_dir: str | Path | None = None
) -> DictConfig:
    """Compose ``config_name`` with Hydra overrides; typed DictConfig.

    Recipes are looked up in ``config_dir`` (a user's own directory) first, then in the bundled ``recipes/``;
    a user recipe may compose bundled ones (``defaults: [tiny_sft, _self_]``, ``model: tiny``). ``+key=value``
    adds a key only where the schema allows new ones (dict-valued keys such as ``optim.lr_mult``).
    """
    register_configs()
    dirs = list(dict.fromkeys(Path(d).resolve() for d in (config_dir, RECIPES_DIR) if d))
    primary = next((d for d in dirs if (d / f"{config_name}.yaml").is_file()), None)
    if primary is None:
        available = sorted({p.stem for d in dirs for p in d.glob("*.yaml")})
        where = " or ".join(str(d) for d in dirs)
        raise ConfigError(f"no recipe {config_name!r} in {where}; available: {', '.join(available)}")
    others = [f"file://{d}" for d in dirs if d != primary]
    search = [f"hydra.searchpath=[{','.join(others)}]"] if others else []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(primary), version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=search + list(overrides or []))
    except Exception as exc:  # Hydra/OmegaConf errors are multi-line; keep the essential line
        raise ConfigError(f"recipe {config_name}: {one_line(exc)}") from exc
    finally:
        GlobalHydra.instance().clear()
    unknown = unknown_keys(cfg, OmegaConf.structured(RunConfig))
    if unknown:  # Hydra's +key=value bypasses the schema; to_object would drop the key silently
        raise ConfigError(
            f"recipe {config_name}: unknown key {unknown[0]}: +key=value adds only to dict-valued keys "
            "(e.g. +optim.lr_mult.vision=0.1); check the spelling, and set existing keys without '+'"
        )
    return cfg


def unknown_keys(cfg: DictConfig, schema: DictConfig, prefix: str = "") -> list[str]:
    """Full names of keys in ``cfg`` that the typed ``schema`` has no field for (dict-valued fields take any)."""
    out: list[str] = []
    for key in cfg.keys():
        name = f"{prefix}{key}"
        if key not in schema:
            out.append(name)
            continue
        sub, sub_schema = cfg._get_node(key), schema._get_node(key)
        if isinstance(sub, DictConfig) and isinstance(sub_schema, DictConfig) and not sub_schema._is_none():
            if OmegaConf.get_type(sub_schema) is not dict:
                out += unknown_keys(sub, sub_schema, name + ".")
    return out


def load_run_config(
    config_name: str, overrides: list[str] | None = None, config_dir: str | Path | None = None
) -> RunConfig:
    """Compose a recipe and convert it to the ``RunConfig`` dataclass."""
    cfg = compose_run_config(config_name, overrides, config_dir)
    try:
        run = OmegaConf.to_object(cfg)
    except Exception as exc:
        raise ConfigError(f"recipe {config_name}: {one_line(exc)}") from exc
    if not isinstance(run, RunConfig):
        raise ConfigError(f"recipe {config_name} does not list '{SCHEMA_NAME}' first in its defaults")
    return run


def to_yaml(run: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(run))


def one_line(exc: BaseException) -> str:
    """Hydra/OmegaConf messages in one line: Hydra's first line, then the OmegaConf cause and its full_key."""
    parts: list[str] = []
    for err in (exc, exc.__cause__):
        if err is None:
            continue
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
        parts += [ln for ln in lines[:1] if not ln.startswith("To append")]
        parts += [ln for ln in lines[1:] if ln.startswith("full_key:")][:1]
    return " | ".join(dict.fromkeys(parts)) or type(exc).__name__


# -- validation -----------------------------------------------------------------------------------------------
def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate_run_config(
    run: RunConfig, world_size: int, need_data: bool = True, device_type: str | None = None
) -> None:
    """Every consistency check of a run for ``world_size`` ranks; raises ``ConfigError`` (one line).

    Cheap config checks first, then the fast-path keys for ``device_type`` (default: the device this machine
    would train on), then, with ``need_data``, the data files: ``data.path`` and ``data.tokenizer`` exist and
    the tokenizer's ``<IMG_CONTEXT>`` id is ``model.image_token_id``. All of it before any process group or
    model exists, so a bad run fails once, in one line, not on every rank after the model is built.
    """
    from mllm.train.fast_path import FastPathError, validate_fast_path

    try:
        validate_layout(run.model, run.parallel, world_size)
        if need_data:
            run.data.validate()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    _validate_batch(run, world_size)
    _check(
        run.parallel.dp_shard == 1 or not (run.fp8.enabled or run.train.compile),
        "parallel.dp_shard > 1 (FSDP2) with fp8.enabled or train.compile is not supported yet: use dp_shard=1",
    )
    _validate_tiles(run)
    _validate_train(run)
    _validate_reporting(run, need_data)
    _validate_optim(run.optim)
    try:
        validate_fast_path(run, device_type)
    except FastPathError as exc:
        raise ConfigError(str(exc)) from exc
    if need_data:
        _validate_data_files(run)


def _validate_batch(run: RunConfig, world_size: int) -> None:
    dp = run.parallel.dp_size(world_size)
    micro = run.data.micro_batch_size
    gbs = run.train.global_batch_size
    _check(
        gbs >= micro * dp and gbs % (micro * dp) == 0,
        f"train.global_batch_size={gbs} must be a multiple of data.micro_batch_size * dp = {micro} * {dp} "
        f"(dp = world size {world_size} / (tp {run.parallel.tp} * pp {run.parallel.pp}))",
    )


def _validate_tiles(run: RunConfig) -> None:
    data, model = run.data, run.model
    _check(
        data.num_image_token == model.num_image_token,
        f"data.num_image_token={data.num_image_token} but the model makes {model.num_image_token} tokens per "
        f"tile (model.vision.image_size/patch_size and downsample_ratio): set data.num_image_token="
        f"{model.num_image_token}",
    )
    _check(
        data.tile_size == model.vision.image_size,
        f"data.tile_size={data.tile_size} but model.vision.image_size={model.vision.image_size}: they must match",
    )
    per_sample = data.max_dynamic_patch + (1 if data.use_thumbnail and data.max_dynamic_patch > 1 else 0)
    _check(
        per_sample <= data.max_tiles_per_row,
        f"data.max_tiles_per_row={data.max_tiles_per_row} < {per_sample} tiles of one image "
        f"(max_dynamic_patch + thumbnail): raise max_tiles_per_row or lower max_dynamic_patch",
    )
    _check(
        per_sample * data.num_image_token < data.seq_len,
        f"one image of {per_sample} tiles is {per_sample * data.num_image_token} tokens, which does not fit "
        f"data.seq_len={data.seq_len} with its text: raise seq_len or lower data.max_dynamic_patch",
    )


def _validate_train(run: RunConfig) -> None:
    t, c = run.train, run.checkpoint
    _check(t.steps >= 1, f"train.steps={t.steps} must be >= 1")
    _check(t.epochs is None or t.epochs >= 1, f"train.epochs={t.epochs} must be >= 1 (or null: train.steps)")
    _check(t.dtype in ("auto", "bf16", "fp32"), f"train.dtype={t.dtype!r} must be auto, bf16 or fp32")
    _check(t.device in ("auto", "cpu", "cuda"), f"train.device={t.device!r} must be auto, cpu or cuda")
    _check(t.max_consecutive_nonfinite >= 1, "train.max_consecutive_nonfinite must be >= 1")
    _check(c.every >= 0 and c.keep_last >= 0, "checkpoint.every and checkpoint.keep_last must be >= 0")
    _check(run.logging.progress in ("auto", "on", "off"), "logging.progress must be auto, on or off")
    if c.resume not in ("none", "auto"):
        _check(Path(c.resume).is_dir(), f"checkpoint.resume={c.resume}: no such directory (or use auto/none)")


def _validate_reporting(run: RunConfig, need_data: bool) -> None:
    log, ev = run.logging, run.eval
    _check(log.every >= 1 and log.print_every >= 1, "logging.every and logging.print_every must be >= 1")
    _check(ev.every >= 0 and ev.batches >= 1, "eval.every must be >= 0 and eval.batches >= 1")
    if need_data and ev.data_path:
        _check(Path(ev.data_path).exists(), f"eval.data_path={ev.data_path}: no such file or directory")
    if log.wandb:
        _check(
            log.wandb_mode in ("online", "offline", "disabled"),
            f"logging.wandb_mode={log.wandb_mode!r} must be online, offline or disabled",
        )
        import importlib.util

        _check(
            importlib.util.find_spec("wandb") is not None,
            "logging.wandb=true needs the wandb package: pip install 'mllm[wandb]' (or set logging.wandb=false)",
        )


def _validate_optim(o: OptimConfig) -> None:
    _check(o.lr > 0, f"optim.lr={o.lr} must be > 0")
    _check(o.schedule in ("cosine", "linear", "constant"), f"optim.schedule={o.schedule!r} is unknown")
    _check(0.0 <= o.warmup_ratio < 1.0, f"optim.warmup_ratio={o.warmup_ratio} must be in [0, 1)")
    _check(0.0 <= o.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    _check(0.0 < o.vit_layer_decay <= 1.0, f"optim.vit_layer_decay={o.vit_layer_decay} must be in (0, 1]")
    _check(o.weight_decay >= 0, f"optim.weight_decay={o.weight_decay} must be >= 0")


def _validate_data_files(run: RunConfig) -> None:
    data = run.data
    _check(
        "://" in data.path or Path(data.path).exists(),  # a URL (s3://...) is checked when the data opens
        f"data.path={data.path}: no such file or directory; set it to a meta JSON or a prepared shard directory",
    )
    _check(
        bool(data.tokenizer), "data.tokenizer is empty: set it to a local Hugging Face tokenizer directory"
    )
    _check(
        Path(data.tokenizer).is_dir(),
        f"data.tokenizer={data.tokenizer}: no such directory; set it to a local Hugging Face tokenizer directory",
    )
    from mllm.data.conversation import IMG_CONTEXT
    from mllm.data.pipeline import load_tokenizer

    try:
        vocab = load_tokenizer(data.tokenizer).get_vocab()
    except ValueError as exc:
        raise ConfigError(one_line(exc)) from exc
    _check(
        IMG_CONTEXT in vocab,
        f"data.tokenizer={data.tokenizer} has no {IMG_CONTEXT} token: use the InternVL tokenizer of the model "
        "(it adds <img>, </img> and <IMG_CONTEXT>)",
    )
    token = vocab[IMG_CONTEXT]
    _check(
        token == run.model.image_token_id,
        f"model.image_token_id={run.model.image_token_id} but {IMG_CONTEXT} is token {token} of "
        f"data.tokenizer={data.tokenizer}: set model.image_token_id={token}",
    )
