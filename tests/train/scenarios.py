"""Trainer scenarios that share spawned rank groups (``conftest.py``: one 2-rank and one 4-rank group per test
session), so that each test file does not pay for its own process start-up and model builds.

A scenario is ``(name, "module:function", args)``; ``function(rank, world, scenario_dir, *args)`` runs on every
rank of the group (the module is one of the test modules here, imported by the spawned workers) and its return
value per rank, or its traceback, is reported to the scenario's test by ``scenario_result``.
"""

from __future__ import annotations

import importlib
import traceback
from pathlib import Path

import pytest

BASE_OVERRIDES = [
    "data.path=unused",
    "data.seq_len=64",
    "train.global_batch_size=4",
    "logging.progress=off",
    "optim.warmup_steps=1",
    "model.image_token_id=1000",
    "checkpoint.every=0",
]


def run_config(overrides: list[str]):
    """The ``tiny_sft`` recipe for the ``fixtures.RowSource`` batches, validated for this world size."""
    import torch.distributed as dist

    from mllm.config import load_run_config, validate_run_config

    run = load_run_config("tiny_sft", BASE_OVERRIDES + overrides)
    validate_run_config(run, dist.get_world_size(), need_data=False)  # RowSource: no data files
    return run


def make_trainer(overrides: list[str], poison: tuple[int, ...] = ()):
    """A ``Trainer`` over ``fixtures.RowSource`` (torch.distributed already initialized by the group)."""
    import functools

    from fixtures import RowSource

    from mllm.train.trainer import Trainer

    return Trainer(run_config(overrides), functools.partial(RowSource, poison_steps=poison))


def portable(tensors: dict) -> dict:
    """Tensors as numpy arrays for the result queue (torch's queue pickling shares tensor memory through file
    descriptors that vanish when the worker exits); ``torch.from_numpy`` restores them."""
    return {k: v.detach().cpu().numpy() for k, v in tensors.items()}


def restored(arrays: dict) -> dict:
    import torch

    return {k: torch.from_numpy(v) for k, v in arrays.items()}


def run_scenarios(rank: int, world: int, root: str, scenarios: list[tuple[str, str, tuple]]) -> dict:
    """Run the scenarios in order on these ranks; (status, result or traceback) per scenario."""
    out = {}
    for name, target, args in scenarios:
        module, function = target.split(":")
        try:
            fn = getattr(importlib.import_module(module), function)
            out[name] = ("ok", fn(rank, world, str(Path(root) / name), *args))
        except Exception:  # noqa: BLE001 - reported by the scenario's test
            out[name] = ("error", traceback.format_exc())
    return out


def scenario_result(group: tuple[Path, list[dict]], name: str) -> tuple[Path, list]:
    """(the scenario's directory, its result per rank); fails with the first failing rank's traceback."""
    root, per_rank = group
    for rank, results in enumerate(per_rank):
        status, value = results[name]
        if status != "ok":
            pytest.fail(f"scenario {name} failed on rank {rank}:\n{value}")
    return root / name, [results[name][1] for results in per_rank]
