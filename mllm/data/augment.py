"""InternVL's `data_augment`: random JPEG degradation of training tiles, made deterministic.

InternVL (internvl_chat `build_transform(is_train=True)`) prepends to its per-tile transform
`RandomChoice([jpeg_degrade(q) for q in range(75, 101)])`, and that transform runs on each tile that
`dynamic_preprocess` returned (thumbnail included). So the order is: decode -> dynamic tiling -> every tile
re-encoded as JPEG at its own uniformly drawn quality (PIL defaults otherwise) and decoded again -> tensor.
Its `T.Resize((size, size))` that follows is a no-op on a tile that already has that size.

Instead of torchvision's global RNG, a tile's quality is a counter-based hash of (seed, sample position in
the global order, image index, tile index): no RNG state to save, identical for any layout, number of loader
workers or decode threads, and replayed exactly on resume (positions are replayed).
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from mllm.data.sampling import hash_uniform

JPEG_QUALITIES = tuple(range(75, 101))  # InternVL's `qualities = list(range(75, 101))`
_STREAM = 3  # hash stream tag; sampling.py uses 1 (dataset mixing) and 2 (shuffle buffer)


def jpeg_quality(seed: int, pos: int, image_index: int, tile_index: int) -> int:
    """The JPEG quality (uniform over 75..100) of one tile of one image of the sample at `pos`."""
    u = hash_uniform(seed, pos, image_index, tile_index, _STREAM)
    return JPEG_QUALITIES[int(u * len(JPEG_QUALITIES))]


def jpeg_degrade(tile: np.ndarray, quality: int) -> np.ndarray:
    """InternVL's simulate_jpeg_degradation on a uint8 [3, H, W] tile: save as JPEG at `quality`, reopen."""
    with io.BytesIO() as buf:
        Image.fromarray(np.ascontiguousarray(tile.transpose(1, 2, 0))).save(
            buf, format="JPEG", quality=quality
        )
        buf.seek(0)
        decoded = np.asarray(Image.open(buf).convert("RGB"))
    return decoded.transpose(2, 0, 1)


def degrade_tiles(tiles: np.ndarray, seed: int, pos: int, image_index: int) -> np.ndarray:
    """Every tile of one image ([n, 3, T, T] uint8), degraded in place with its own quality; returns `tiles`."""
    for t in range(len(tiles)):
        tiles[t] = jpeg_degrade(tiles[t], jpeg_quality(seed, pos, image_index, t))
    return tiles
