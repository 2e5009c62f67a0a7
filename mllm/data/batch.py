"""The packed micro-batch handed to the model, and its assembly from packed rows."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

IGNORE_INDEX = -100
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SampleTensors:
    """One tokenized sample with its decoded tiles (uint8 [n, 3, tile, tile]; n = 0 for text-only)."""

    key: str
    input_ids: np.ndarray
    targets: np.ndarray  # bool, unshifted: token t is predicted with loss
    tiles: np.ndarray


@dataclass
class PackedBatch:
    """B packed rows of S tokens. labels are already shifted within each sample (see `build_batch`)."""

    input_ids: torch.Tensor  # int64 [B, S]
    labels: torch.Tensor  # int64 [B, S]; -100 = no loss
    segment_ids: torch.Tensor  # int32 [B, S]; 1, 2, ... per sample, 0 = padding
    position_ids: torch.Tensor  # int64 [B, S]; restart at 0 per sample
    pixel_values: torch.Tensor  # uint8 [N_tiles, 3, T, T] in flattened batch order
    image_flags: torch.Tensor  # int64 [N_tiles]; 0 = the dummy tile of a text-only micro-batch
    sample_ids: list[list[str]] = field(default_factory=list)
    sample_tokens: list[list[int]] = field(default_factory=list)
    num_samples: int = 0
    num_tiles: int = 0  # real tiles (the dummy tile is not counted)
    num_loss_tokens: int = 0

    def to(self, device: torch.device | str, non_blocking: bool = True) -> PackedBatch:
        moved = {
            f.name: (v.to(device, non_blocking=non_blocking) if isinstance(v, torch.Tensor) else v)
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }
        return PackedBatch(**moved)

    def pin_memory(self) -> PackedBatch:
        return PackedBatch(
            **{
                f.name: (v.pin_memory() if isinstance(v, torch.Tensor) else v)
                for f in fields(self)
                for v in [getattr(self, f.name)]
            }
        )


def normalize_pixels(tiles: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 [N, 3, H, W] -> ImageNet-normalized `dtype`; same float32 ops as ToTensor + Normalize.

    Meant to run on the device, so only uint8 tiles cross the host-device link.
    """
    mean = torch.tensor(IMAGENET_MEAN, device=tiles.device, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=tiles.device, dtype=torch.float32).view(1, 3, 1, 1)
    x = tiles.to(torch.float32).div_(255.0)
    return x.sub_(mean).div_(std).to(dtype)


def shifted_labels(input_ids: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """labels[t] = input_ids[t + 1] if that token is a target, else -100; the last token never has one."""
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(targets[1:], input_ids[1:], IGNORE_INDEX)
    return labels


def build_batch(rows: list[list[SampleTensors]], seq_len: int, pad_id: int, tile_size: int) -> PackedBatch:
    """Lay rows out as [B, seq_len] with per-sample shifted labels, segment and position ids."""
    b = len(rows)
    input_ids = np.full((b, seq_len), pad_id, dtype=np.int64)
    labels = np.full((b, seq_len), IGNORE_INDEX, dtype=np.int64)
    segment_ids = np.zeros((b, seq_len), dtype=np.int32)
    position_ids = np.zeros((b, seq_len), dtype=np.int64)
    tiles: list[np.ndarray] = []
    sample_ids: list[list[str]] = []
    sample_tokens: list[list[int]] = []
    for r, row in enumerate(rows):
        offset = 0
        for s, sample in enumerate(row):
            n = len(sample.input_ids)
            if offset + n > seq_len:
                raise ValueError(f"row {r} overflows: sample {sample.key} ends at {offset + n} > {seq_len}")
            input_ids[r, offset : offset + n] = sample.input_ids
            labels[r, offset : offset + n] = shifted_labels(sample.input_ids, sample.targets)
            segment_ids[r, offset : offset + n] = s + 1
            position_ids[r, offset : offset + n] = np.arange(n)
            offset += n
            if len(sample.tiles):
                tiles.append(sample.tiles)
        sample_ids.append([s.key for s in row])
        sample_tokens.append([len(s.input_ids) for s in row])
    num_tiles = sum(len(t) for t in tiles)
    if num_tiles:
        pixels = torch.from_numpy(np.concatenate(tiles))
        flags = torch.ones(num_tiles, dtype=torch.int64)
    else:
        # Text-only micro-batch: one dummy tile so that every rank runs (and reduces grads of) the vision tower.
        pixels = torch.zeros((1, 3, tile_size, tile_size), dtype=torch.uint8)
        flags = torch.zeros(1, dtype=torch.int64)
    labels_t = torch.from_numpy(labels)
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        labels=labels_t,
        segment_ids=torch.from_numpy(segment_ids),
        position_ids=torch.from_numpy(position_ids),
        pixel_values=pixels,
        image_flags=flags,
        sample_ids=sample_ids,
        sample_tokens=sample_tokens,
        num_samples=sum(len(r) for r in rows),
        num_tiles=num_tiles,
        num_loss_tokens=int((labels_t != IGNORE_INDEX).sum()),
    )
