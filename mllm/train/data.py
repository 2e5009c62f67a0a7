"""Adapter from ``mllm.data``'s ``PackedLoader`` to the trainer's ``BatchSource``.

Every rank of a data-parallel replica (its tp and pp ranks) builds the same loader (same dp rank), which is
deterministic, so they all see identical micro-batches without a broadcast.

Pixels leave the loader as uint8 tiles and stay on the host (pinned on GPU): the trainer's
``mllm.train.batches.PixelFeeder`` copies a micro-batch's tiles to the device right before its vision forward
(``non_blocking``, a quarter of the traffic of fp32 tiles) and normalizes them there. The other tensors go to
the device here. The loader prefetches at least one optimizer step's micro-batches, because the trainer takes
all of a step's micro-batches before its first forward.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch

from mllm.data.batch import PackedBatch, normalize_pixels
from mllm.data.loader import PackedLoader
from mllm.train.config import RunConfig
from mllm.train.fast_path import training_device_type
from parallel.mesh import ParallelMesh

MAX_STEP_PREFETCH = 64  # micro-batches; beyond that, prefetching more only costs host memory


def batch_to_dict(batch: PackedBatch, normalize: bool = True) -> dict[str, Any]:
    """Model inputs and flat sample ids; tiles normalized to fp32 on the batch's device, or left uint8 with
    ``normalize=False`` (the trainer's ``PixelFeeder`` normalizes them on the device just in time)."""
    pixels = batch.pixel_values
    if pixels is not None and pixels.numel() and normalize:
        pixels = normalize_pixels(pixels)
    return {
        "input_ids": batch.input_ids,
        "labels": batch.labels,
        "segment_ids": batch.segment_ids,
        "position_ids": batch.position_ids,
        "pixel_values": pixels if pixels is not None and pixels.numel() else None,
        "image_flags": batch.image_flags if pixels is not None and pixels.numel() else None,
        "sample_ids": [i for row in batch.sample_ids for i in row],
    }


def step_prefetch(run: RunConfig, dp: int) -> int:
    """``data.prefetch_batches``, raised to one optimizer step's micro-batches (grad accumulation, at most
    ``MAX_STEP_PREFETCH``) so that the next step's batches are decoded while this one trains."""
    grad_accum = max(1, run.train.global_batch_size // (run.data.micro_batch_size * dp))
    return max(run.data.prefetch_batches, min(grad_accum, MAX_STEP_PREFETCH))


class DataLoaderSource:
    def __init__(self, run: RunConfig, mesh: ParallelMesh) -> None:
        cfg = dataclasses.replace(run.data, prefetch_batches=step_prefetch(run, mesh.dp))
        self.loader = PackedLoader(cfg, mesh.dp_rank, mesh.dp)
        # The trainer has already selected this rank's GPU (``mllm.train.setup.resolve_device``).
        cuda = training_device_type(run) == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def next_micro_batches(self, n: int) -> list[dict[str, Any]]:
        return [batch_to_dict(self._to_device(next(self.loader)), normalize=False) for _ in range(n)]

    def _to_device(self, batch: PackedBatch) -> PackedBatch:
        """Everything but the tiles to the device; the tiles pinned for the trainer's asynchronous copy."""
        if self.device.type != "cuda":
            return batch
        pixels = batch.pixel_values
        moved = dataclasses.replace(batch, pixel_values=None).pin_memory().to(self.device, non_blocking=True)
        return dataclasses.replace(moved, pixel_values=None if pixels is None else pixels.pin_memory())

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This dp rank's saved state (same dp size only)."""
        self.loader.load_state_dict(state)

    def load_all_states(self, states: Sequence[dict[str, Any]]) -> None:
        """The states saved by every rank of a checkpoint (any order, tp/pp duplicates included): an exact
        resume at the same dp size, an elastic one after a dp change (``PackedLoader.load_state_dicts``)."""
        self.loader.load_state_dicts(states)

    @property
    def elastic_summary(self) -> Any:
        """What an elastic resume did (``mllm.data.elastic``), None after an exact one."""
        return self.loader.elastic_summary

    def bad_samples(self) -> int:
        return self.loader.bad_samples.num_bad
