"""Tiling against an independent transcription of InternVL's dynamic_preprocess."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from mllm.data import normalize_pixels
from mllm.data.tiling import (
    decode_tiles,
    num_tiles,
    per_image_max_tiles,
    select_grid,
    tile_image,
    tiles_uint8,
)


# ---- reference: InternVL's code, written out plainly ------------------------------------------------------
def ref_find_closest_aspect_ratio(aspect_ratio, target_ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in target_ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def ref_target_ratios(min_num, max_num):
    target_ratios = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(target_ratios, key=lambda x: x[0] * x[1])


def ref_dynamic_preprocess(image, min_num=1, max_num=12, image_size=448, use_thumbnail=False):
    orig_width, orig_height = image.size
    aspect_ratio = orig_width / orig_height
    ratio = ref_find_closest_aspect_ratio(
        aspect_ratio, ref_target_ratios(min_num, max_num), orig_width, orig_height, image_size
    )
    target_width = image_size * ratio[0]
    target_height = image_size * ratio[1]
    blocks = ratio[0] * ratio[1]
    resized_img = image.resize((target_width, target_height), Image.Resampling.BICUBIC)
    processed_images = []
    cols = target_width // image_size
    for i in range(blocks):
        box = (
            (i % cols) * image_size,
            (i // cols) * image_size,
            ((i % cols) + 1) * image_size,
            ((i // cols) + 1) * image_size,
        )
        processed_images.append(resized_img.crop(box))
    if use_thumbnail and len(processed_images) != 1:
        processed_images.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return processed_images, ratio


def ref_to_tensor_normalize(img):
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    return (x - mean) / std


def random_image(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- grid selection -----------------------------------------------------------------------------------------
def test_grid_matches_reference_on_thousands_of_sizes():
    rng = random.Random(0)
    ratios = {}
    checked = 0
    for _ in range(4000):
        w = rng.choice([rng.randint(1, 300), rng.randint(1, 5000), rng.randint(200, 1200)])
        h = rng.choice(
            [rng.randint(1, 300), rng.randint(1, 5000), w * rng.randint(1, 4), max(1, w // rng.randint(1, 4))]
        )
        lo = rng.choice([1, 1, 1, 2, 4])
        hi = rng.choice([lo, 6, 12, 12, 24, 40, max(lo, rng.randint(1, 40))])
        size = rng.choice([448, 448, 224, 28])
        if hi < lo:
            continue
        if (lo, hi) not in ratios:
            ratios[lo, hi] = ref_target_ratios(lo, hi)
        expected = ref_find_closest_aspect_ratio(w / h, ratios[lo, hi], w, h, size)
        assert select_grid(w, h, lo, hi, size) == expected, (w, h, lo, hi, size)
        checked += 1
    assert checked > 3500


@pytest.mark.parametrize(
    "w,h,grid",
    [
        (448, 448, (1, 1)),  # square, small: ties with 2x2, 3x3 lose (area too small)
        (896, 896, (2, 2)),  # 802816 > 0.5*448^2*4 = 401408 -> 2x2; 3x3 needs > 903168
        (1344, 1344, (3, 3)),  # ties up to 3x3 win
        (1000, 500, (2, 1)),
        (500, 1000, (1, 2)),
        (4000, 100, (12, 1)),  # extreme panorama -> widest grid within budget
    ],
)
def test_grid_hand_computed(w, h, grid):
    assert select_grid(w, h, 1, 12) == grid


def test_budget_limits_and_multi_image_split():
    assert per_image_max_tiles(12, 1) == 12
    assert per_image_max_tiles(12, 5) == 2
    assert per_image_max_tiles(12, 20) == 1
    assert select_grid(8000, 100, 1, 40) == (40, 1)
    with pytest.raises(ValueError, match="40"):
        select_grid(100, 100, 1, 41)
    assert num_tiles((1, 1)) == 1 and num_tiles((2, 3)) == 7 and num_tiles((2, 3), False) == 6


# ---- pixels -------------------------------------------------------------------------------------------------
def test_tile_image_pixel_exact_vs_reference():
    rng = np.random.default_rng(1)
    for _ in range(60):
        w, h = int(rng.integers(5, 300)), int(rng.integers(5, 300))
        img = random_image(rng, w, h)
        hi = int(rng.integers(1, 13))
        ref, grid = ref_dynamic_preprocess(img, 1, hi, 28, use_thumbnail=True)
        ours = tile_image(img, 1, hi, 28, use_thumbnail=True)
        assert len(ours) == len(ref) == num_tiles(grid)
        for a, b in zip(ours, ref):
            assert np.array_equal(np.asarray(a), np.asarray(b))
        arr = tiles_uint8(img, grid, 28, True)
        expected = np.stack([np.asarray(t).transpose(2, 0, 1) for t in ref])
        assert arr.dtype == np.uint8 and np.array_equal(arr, expected)


def test_448_tiles_and_normalization_match_torchvision_style_reference():
    rng = np.random.default_rng(2)
    img = random_image(rng, 1000, 500)
    ref, grid = ref_dynamic_preprocess(img, 1, 12, 448, use_thumbnail=True)
    arr = tiles_uint8(img, grid, 448, True)
    assert grid == (2, 1) and arr.shape == (3, 3, 448, 448)
    ours = normalize_pixels(torch.from_numpy(arr), torch.float32)
    expected = torch.stack([ref_to_tensor_normalize(t) for t in ref])
    assert torch.equal(ours, expected)


def jpeg_bytes(img, quality=92):
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def smooth_photo(rng, w, h):
    """A photo-like image (smooth gradients + blobs) so JPEG and resampling behave as on real photos."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    chans = []
    for _ in range(3):
        fx, fy, ph = rng.uniform(1, 6, 3)
        chans.append(127 + 100 * np.sin(fx * x / w * np.pi + ph) * np.cos(fy * y / h * np.pi))
    return Image.fromarray(np.stack(chans, -1).clip(0, 255).astype(np.uint8))


def test_fast_decode_is_exact_grid_and_close_pixels():
    rng = np.random.default_rng(3)
    for w, h in [(2400, 1600), (1300, 1900), (900, 700)]:
        data = jpeg_bytes(smooth_photo(rng, w, h))
        exact = decode_tiles(data, 1, 12, 224, True, fast=False)
        fast = decode_tiles(data, 1, 12, 224, True, fast=True)
        ref, _ = ref_dynamic_preprocess(Image.open(io.BytesIO(data)).convert("RGB"), 1, 12, 224, True)
        assert np.array_equal(exact, np.stack([np.asarray(t).transpose(2, 0, 1) for t in ref]))
        assert fast.shape == exact.shape
        diff = np.abs(fast.astype(np.int16) - exact.astype(np.int16))
        assert diff.mean() < 2.0, (w, h, diff.mean())  # resampling noise only


def test_png_and_grayscale_inputs_become_rgb():
    rng = np.random.default_rng(4)
    gray = Image.fromarray(rng.integers(0, 256, (50, 90), dtype=np.uint8))
    buf = io.BytesIO()
    gray.save(buf, format="PNG")
    ref, _ = ref_dynamic_preprocess(gray.convert("RGB"), 1, 12, 28, True)
    expected = np.stack([np.asarray(t).transpose(2, 0, 1) for t in ref])
    assert np.array_equal(decode_tiles(buf.getvalue(), 1, 12, 28, True, fast=False), expected)
    fast = decode_tiles(buf.getvalue(), 1, 12, 28, True, fast=True)
    assert np.abs(fast.astype(int) - expected).max() <= 2  # torch's bicubic: rounding differences only


def test_fast_resize_matches_pil_to_rounding():
    rng = np.random.default_rng(5)
    for w, h, grid in [(1000, 700, (3, 2)), (300, 900, (1, 3)), (64, 64, (2, 2))]:
        img = smooth_photo(rng, w, h)
        exact = tiles_uint8(img, grid, 112, True, fast=False)
        fast = tiles_uint8(img, grid, 112, True, fast=True)
        diff = np.abs(exact.astype(int) - fast)
        assert diff.max() <= 2 and diff.mean() < 0.05, (w, h, diff.max(), diff.mean())
