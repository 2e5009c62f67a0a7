"""Run a training job on this process (called by ``python -m mllm.train`` on every rank)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch.distributed as dist

from mllm.train import signals
from mllm.train.batches import BatchSource
from mllm.train.config import RunConfig
from mllm.train.fast_path import validate_fast_path
from mllm.train.preflight import preflight
from mllm.train.setup import init_distributed, resolve_device
from mllm.train.trainer import Trainer
from parallel.mesh import ParallelMesh

MakeBatches = Callable[[RunConfig, ParallelMesh], BatchSource]


def default_batches(run: RunConfig, mesh: ParallelMesh) -> BatchSource:
    from mllm.train.data import DataLoaderSource

    return DataLoaderSource(run, mesh)


def run_training(run: RunConfig, make_batches: MakeBatches | None = None) -> dict:
    """Initialize torch.distributed (if needed), train, and tear down; returns the last step's summary."""
    validate_fast_path(run)  # before any process group: a GPU-only setting on CPU fails with one line
    # Installed for the whole process: a SIGTERM from torchrun (another rank failed) while this rank reports
    # its error does not cut the report short; the trainer's loop polls the same requests.
    stops = signals.StopRequests(Path(run.train.run_dir))
    stops.install()
    earlier = signals.stopped_by_earlier_attempt(Path(run.train.run_dir))
    if earlier is not None:  # torchrun restarted a run that stopped on request: stay stopped
        return {"stopped": True, "step": int(earlier.split()[0]), "stop_reason": "an earlier attempt's stop"}
    preflight(run, need_data=make_batches is None)
    signals.clear_stopped(Path(run.train.run_dir))
    device = resolve_device(run)
    owns_group = not dist.is_initialized()
    init_distributed(device)
    try:
        trainer = Trainer(run, make_batches or default_batches)
        trainer.stops = stops
        result = trainer.fit()
        if trainer.rank == 0 and result.get("stopped"):
            what = result["stop_reason"]
            if what == "train.stop_after":
                what = f"train.stop_after={run.train.stop_after}"
            print(f"stopped at step {result['step']} ({what}), checkpoint saved", file=sys.stderr)
        return result
    finally:
        if owns_group and dist.is_initialized():
            dist.destroy_process_group()
