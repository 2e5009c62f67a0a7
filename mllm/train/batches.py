"""What the trainer needs from a data source, and per-micro-batch statistics for metrics and FLOPs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch


class BatchSource(Protocol):
    """This data-parallel rank's micro-batches, resumable exactly.

    ``next_micro_batches(n)`` returns n dicts with input_ids, labels (shifted), segment_ids, position_ids,
    pixel_values (float, normalized) or None, image_flags, sample_ids. Every rank of one data-parallel replica
    (its tp and pp ranks) must return the same micro-batches.

    Optional: ``load_all_states(states)`` takes the states saved by every rank of a checkpoint (any dp size);
    the trainer prefers it to ``load_state_dict`` when present (``Trainer._resume_data``). With ``train.epochs``
    the source needs ``count_steps()``: the optimizer steps those epochs hold.
    """

    def next_micro_batches(self, n: int) -> list[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def bad_samples(self) -> int: ...

    def truncated_samples(self) -> int: ...


@dataclass
class MicroBatchStats:
    tokens: int = 0  # non-padding tokens
    tiles: int = 0  # real tiles (image_flags == 1)
    samples: int = 0
    sample_lengths: list[int] = field(default_factory=list)
    all_tiles: int = 0  # tiles run through the ViT, dummy tiles included (FLOPs)
    sample_ids: list = field(default_factory=list)

    def __add__(self, other: MicroBatchStats) -> MicroBatchStats:
        return MicroBatchStats(
            self.tokens + other.tokens,
            self.tiles + other.tiles,
            self.samples + other.samples,
            self.sample_lengths + other.sample_lengths,
            self.all_tiles + other.all_tiles,
            self.sample_ids + other.sample_ids,
        )


def micro_batch_stats(mb: dict[str, Any]) -> MicroBatchStats:
    """Token, tile and sample counts of one micro-batch; sample lengths from the packed segment ids."""
    input_ids = mb["input_ids"]
    seg = mb.get("segment_ids")
    if seg is None:
        seg = torch.ones_like(input_ids)
    lengths: list[int] = []
    for row in seg:
        ids, counts = torch.unique_consecutive(row, return_counts=True)
        lengths += [int(c) for i, c in zip(ids.tolist(), counts.tolist()) if i > 0]
    flags = mb.get("image_flags")
    pixels = mb.get("pixel_values")
    all_tiles = 0 if pixels is None else int(pixels.shape[0])
    tiles = all_tiles if flags is None else int(flags.sum())
    ids = mb.get("sample_ids")
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids or [])
    return MicroBatchStats(sum(lengths), tiles, len(lengths), lengths, all_tiles, ids)


def model_inputs(mb: dict[str, Any]) -> dict[str, Any]:
    """The keys ``ParallelModel.forward_backward`` consumes."""
    keys = ("input_ids", "labels", "segment_ids", "position_ids", "pixel_values", "image_flags")
    return {k: mb[k] for k in keys if mb.get(k) is not None}


class DevicePixels:
    """One micro-batch's tiles, handed to the model as a callable: the vision encoder calls it right before
    its forward, and gets them on the device, normalized (uint8 tiles, the loader's form: ImageNet-normalized
    there in fp32; float tiles are taken as already normalized). The device copy is dropped once handed
    over, so a consumed micro-batch's tiles live only as long as the model keeps them; a second call (the
    pipeline's shape inference runs the first micro-batch once more) copies them again."""

    def __init__(self, host: torch.Tensor, device: torch.device, feeder: PixelFeeder, index: int) -> None:
        self.host = host
        self.device_copy: torch.Tensor | None = None
        self.device, self.feeder, self.index = device, feeder, index
        self.shape = host.shape

    def prefetch(self) -> None:
        """Start the host-to-device copy: on CUDA from pinned memory on the feeder's copy stream, so it runs
        under the running micro-batch's kernels."""
        if self.device_copy is not None:
            return
        stream = self.feeder.copy_stream
        if stream is None:
            self.device_copy = self.host.to(self.device)
            return
        with torch.cuda.stream(stream):
            self.device_copy = self.host.to(self.device, non_blocking=self.host.is_pinned())
            self.copied = torch.cuda.Event()
            self.copied.record(stream)

    def __call__(self) -> torch.Tensor:
        from mllm.data.batch import normalize_pixels

        self.feeder.using(self.index)
        self.prefetch()
        tiles, self.device_copy = self.device_copy, None
        if self.feeder.copy_stream is not None:  # the compute stream waits for the copy, then owns the tiles
            current = torch.cuda.current_stream(self.device)
            current.wait_event(self.copied)
            tiles.record_stream(current)
        return normalize_pixels(tiles) if tiles.dtype == torch.uint8 else tiles.float()


class PixelFeeder:
    """Pixels just in time: a step's micro-batches keep their tiles on the host; when micro-batch i's vision
    forward starts, its tiles and those of the next ``ahead`` micro-batches are copied to the device (at most
    ``ahead + 1`` micro-batches' tiles there at once, as ``mllm.train.planner`` counts them). Ranks that do
    not run the vision encoder (pipeline stages after the first) get no pixels at all."""

    def __init__(self, device: torch.device, ahead: int, runs_vision: bool) -> None:
        self.device, self.ahead, self.runs_vision = device, max(0, ahead), runs_vision
        self.handles: list[DevicePixels] = []
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" and runs_vision else None

    def wrap(self, micro_batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        self.handles = []
        out = []
        for mb in micro_batches:
            mb = dict(mb)
            pixels = mb.pop("pixel_values", None)
            if not self.runs_vision:
                mb.pop("image_flags", None)
            elif pixels is not None:
                handle = DevicePixels(pixels, self.device, self, len(self.handles))
                self.handles.append(handle)
                mb["pixel_values"] = handle
            out.append(mb)
        return out

    def using(self, index: int) -> None:
        for handle in self.handles[index + 1 : index + 1 + self.ahead]:
            handle.prefetch()

    def on_device(self) -> int:
        """Micro-batches whose tiles are on the device now (for tests)."""
        return sum(h.device_copy is not None for h in self.handles)
