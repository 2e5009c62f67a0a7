"""Adapter from ``mllm.data``'s ``PackedLoader`` to the trainer's ``BatchSource``.

Every rank builds a loader of the same global stream (``mllm.data.loader``): the ranks of one data-parallel
replica (its tp and pp ranks) get the same rows, split the decoding of their images among themselves and
all-gather the tiles (each image is decoded once per replica), and the global batch of a step does not depend on
the layout. Rejections found while decoding are all-gathered once per step so
every rank counts the same; with ``data.log_samples`` rank 0 writes each step's global batch to
``RUN_DIR/samples.jsonl``.

Pixels leave the loader as uint8 tiles and stay on the host (pinned on GPU): the trainer's
``mllm.train.batches.PixelFeeder`` copies a micro-batch's tiles to the device right before its vision forward
(``non_blocking``, a quarter of the traffic of fp32 tiles) and normalizes them there. The other tensors go to
the device here. The loader prefetches at least one optimizer step's micro-batches, because the trainer takes
all of a step's micro-batches before its first forward.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mllm.data.batch import PackedBatch, normalize_pixels
from mllm.data.loader import DecodeSplit, PackedLoader, Rejection
from mllm.train.config import RunConfig
from mllm.train.fast_path import training_device_type
from parallel.mesh import ParallelMesh

MAX_STEP_PREFETCH = 64  # micro-batches; beyond that, prefetching more only costs host memory
SAMPLES_FILE = "samples.jsonl"


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


def dp_rejections(mesh: ParallelMesh):
    """Shares a step's decode-time rejections among the dp replicas (the peers of a replica already hold the same
    ones: they gather each other's decoded samples), so every rank counts every rejection."""

    def exchange(rejections: list[Rejection]) -> list[Rejection]:
        if mesh.dp == 1:
            return rejections
        gathered: list = [None] * mesh.dp
        dist.all_gather_object(gathered, rejections, group=mesh.dp_group)
        return [tuple(r) for rank_rejections in gathered for r in rank_rejections]

    return exchange


def replica_decode_split(mesh: ParallelMesh) -> DecodeSplit | None:
    """The ranks training the same rows (same dp rank: the replica's tp and pp ranks) share the decoding: each
    decodes every n-th sample and the tiles are all-gathered in a process group per replica. None when a replica
    is one rank. Every rank takes part in creating every replica's group (torch.distributed requires it)."""
    if not dist.is_initialized() or dist.get_world_size() == mesh.dp:
        return None
    dp_ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(dp_ranks, mesh.dp_rank)
    mine = None
    for d in range(mesh.dp):
        peers = [r for r, dp_rank in enumerate(dp_ranks) if dp_rank == d]
        group = dist.new_group(peers)
        if d == mesh.dp_rank:
            mine = (peers, group)
    peers, group = mine

    def gather(decoded: dict) -> list[dict]:
        out: list = [None] * len(peers)
        dist.all_gather_object(out, decoded, group=group)
        return out

    return DecodeSplit(peers.index(dist.get_rank()), len(peers), gather)


class DataLoaderSource:
    def __init__(self, run: RunConfig, mesh: ParallelMesh) -> None:
        cfg = dataclasses.replace(run.data, prefetch_batches=step_prefetch(run, mesh.dp))
        self.loader = PackedLoader(
            cfg,
            mesh.dp_rank,
            mesh.dp,
            rows_per_step=run.train.global_batch_size,
            epochs=run.train.epochs,
            exchange=dp_rejections(mesh),
            decode_split=replica_decode_split(mesh),
        )
        self.dp_rank = mesh.dp_rank
        rank0 = not dist.is_initialized() or dist.get_rank() == 0
        self.samples_file = Path(run.train.run_dir) / SAMPLES_FILE if run.data.log_samples and rank0 else None
        # The trainer has already selected this rank's GPU (``mllm.train.setup.resolve_device``).
        cuda = training_device_type(run) == "cuda"
        self.device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")

    def next_micro_batches(self, n: int) -> list[dict[str, Any]]:
        micro = [batch_to_dict(self._to_device(next(self.loader)), normalize=False) for _ in range(n)]
        if self.samples_file is not None:
            line = {"step": self.loader.steps, "samples": self.loader.last_step_samples}
            with open(self.samples_file, "a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        return micro

    def count_steps(self) -> int:
        """Optimizer steps in ``train.epochs`` epochs of the data as it is packed (a planning pass, no decoding)."""
        return self.loader.count_steps()

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
        """A state saved by any rank of any layout."""
        self.load_all_states([state])

    def load_all_states(self, states: Sequence[dict[str, Any]]) -> None:
        """The states saved by every rank of a checkpoint (any layout): an exact resume; samples.jsonl loses the
        lines of steps after the checkpoint (a crashed run may have written them)."""
        self.loader.load_state_dicts(states)
        if self.samples_file is not None and self.samples_file.exists():
            done = self.loader.steps
            lines = self.samples_file.read_text(encoding="utf-8").splitlines()
            kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= done]
            self.samples_file.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")

    def bad_samples(self) -> int:
        """Rejections so far; the loader's counts are global (the same on every rank), so only dp rank 0 reports
        them to the trainer's sum over dp ranks."""
        return self.loader.bad_samples.num_bad if self.dp_rank == 0 else 0

    def truncated_samples(self) -> int:
        """Samples cut to seq_len so far (data.too_long=truncate); global like bad_samples, so dp rank 0 only."""
        return self.loader.bad_samples.num_truncated if self.dp_rank == 0 else 0
