"""Adapter from ``mllm.data``'s ``PackedLoader`` to the trainer's ``BatchSource``.

Every rank of a data-parallel replica (its tp and pp ranks) builds the same loader (same dp rank), which is
deterministic, so they all see identical micro-batches without a broadcast.
"""

from __future__ import annotations

import logging
from typing import Any

from mllm.data.batch import PackedBatch, normalize_pixels
from mllm.data.loader import PackedLoader
from mllm.train.config import RunConfig
from parallel.mesh import ParallelMesh

log = logging.getLogger("mllm.train")


def batch_to_dict(batch: PackedBatch) -> dict[str, Any]:
    """Model inputs with pixels normalized to fp32 (autocast lowers them on GPU) and flat sample ids."""
    pixels = batch.pixel_values
    return {
        "input_ids": batch.input_ids,
        "labels": batch.labels,
        "segment_ids": batch.segment_ids,
        "position_ids": batch.position_ids,
        "pixel_values": normalize_pixels(pixels) if pixels is not None and pixels.numel() else None,
        "image_flags": batch.image_flags if pixels is not None and pixels.numel() else None,
        "sample_ids": [i for row in batch.sample_ids for i in row],
    }


class DataLoaderSource:
    def __init__(self, run: RunConfig, mesh: ParallelMesh) -> None:
        self.loader = PackedLoader(run.data, mesh.dp_rank, mesh.dp)

    def next_micro_batches(self, n: int) -> list[dict[str, Any]]:
        return [batch_to_dict(next(self.loader)) for _ in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "resume_global_step" in state:
            # The loader's state is per dp rank; after a dp change there is no exact mapping.
            log.warning(
                "data-parallel size changed since the checkpoint (%s): the data stream restarts from its "
                "beginning with the new dp layout",
                state.get("layout"),
            )
            return
        self.loader.load_state_dict(state)

    def bad_samples(self) -> int:
        return self.loader.bad_samples.num_bad
