"""Pixels just in time (``mllm.train.batches.PixelFeeder``): tiles stay on the host until the vision forward
asks for them, at most ``ahead + 1`` micro-batches' tiles are on the device, they arrive normalized exactly as
``normalize_pixels`` does, and ranks without the vision encoder receive none."""

from __future__ import annotations

import torch

from mllm.data.batch import normalize_pixels
from mllm.train.batches import PixelFeeder


def _micro_batches(n: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    return [
        {
            "input_ids": torch.zeros(1, 8, dtype=torch.long),
            "pixel_values": torch.randint(0, 256, (2, 3, 4, 4), generator=gen, dtype=torch.uint8),
            "image_flags": torch.ones(2, dtype=torch.long),
        }
        for _ in range(n)
    ]


def test_tiles_arrive_just_in_time_and_normalized():
    host = _micro_batches(4)
    feeder = PixelFeeder(torch.device("cpu"), ahead=1, runs_vision=True)
    wrapped = feeder.wrap(host)
    assert feeder.on_device() == 0  # nothing copied before the first vision forward
    for i, mb in enumerate(wrapped):
        tiles = mb["pixel_values"]()
        assert torch.equal(tiles, normalize_pixels(host[i]["pixel_values"]))
        assert feeder.on_device() == (1 if i < 3 else 0)  # only the next micro-batch is ahead
        assert torch.equal(mb["image_flags"], host[i]["image_flags"])


def test_ranks_without_the_vision_encoder_get_no_pixels():
    wrapped = PixelFeeder(torch.device("cpu"), ahead=2, runs_vision=False).wrap(_micro_batches(2))
    assert all("pixel_values" not in mb and "image_flags" not in mb for mb in wrapped)
    assert all("input_ids" in mb for mb in wrapped)


def test_already_normalized_tiles_pass_through():
    floats = torch.randn(1, 3, 4, 4)
    feeder = PixelFeeder(torch.device("cpu"), ahead=0, runs_vision=True)
    (mb,) = feeder.wrap([{"pixel_values": floats}])
    assert torch.equal(mb["pixel_values"](), floats)
