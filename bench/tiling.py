"""Tiling benchmark: tiles/s per core of the training path vs a straightforward reference pipeline.

Reference (InternVL's load_image): full decode, PIL bicubic resize to the grid, crop each tile, then per tile
InternVL's transform (convert, resize to the tile size, torchvision-style float ToTensor + Normalize). Ours: reduced-size JPEG decode (draft) when the target is
much smaller, one resize, tiles as a uint8 reshape; normalization happens later on the device.
Both run single-threaded on the same images (photos and documents) in the same run. Prints a table and a final
JSON line with `speedup`.

    .venv/bin/python bench/tiling.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mllm.data.tiling import decode_tiles, tile_image  # noqa: E402

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
SIZES = {
    "photo 4032x3024": (4032, 3024),
    "photo 1920x1080": (1920, 1080),
    "photo 1024x768": (1024, 768),
    "photo 640x480": (640, 480),
    "doc A4 300dpi 2480x3508": (2480, 3508),
    "doc letter 1700x2200": (1700, 2200),
    "screenshot 2560x1440": (2560, 1440),
}


def synthetic_jpeg(w: int, h: int, seed: int, document: bool) -> bytes:
    """Smooth photo-like content, or black text-like strokes on white for documents."""
    rng = np.random.default_rng(seed)
    if document:
        arr = np.full((h, w, 3), 250, np.uint8)
        for y in range(40, h - 40, 36):
            x0, x1 = 60, int(rng.integers(w // 2, w - 60))
            arr[y : y + 14, x0:x1] = rng.integers(0, 60, (14, x1 - x0, 1), dtype=np.uint8)
    else:
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        chans = [
            127
            + 100
            * np.sin(xx / w * np.pi * rng.uniform(1, 8) + c)
            * np.cos(yy / h * np.pi * rng.uniform(1, 8))
            for c in range(3)
        ]
        arr = (np.stack(chans, -1) + rng.normal(0, 6, (h, w, 1))).clip(0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def to_tensor(pic: Image.Image) -> torch.Tensor:
    """torchvision.transforms.functional.to_tensor for an RGB PIL image."""
    img = torch.from_numpy(np.array(pic, np.uint8, copy=True))
    img = img.view(pic.size[1], pic.size[0], 3).permute((2, 0, 1)).contiguous()
    return img.to(dtype=torch.get_default_dtype()).div(255)


def normalize(tensor: torch.Tensor) -> torch.Tensor:
    """torchvision.transforms.functional.normalize (not in place)."""
    return tensor.clone().sub_(MEAN).div_(STD)


def reference(data: bytes, max_tiles: int, size: int) -> torch.Tensor:
    """InternVL's load_image: dynamic_preprocess, then per tile build_transform's
    convert('RGB') -> Resize((size, size), BICUBIC) -> ToTensor -> Normalize."""
    image = Image.open(io.BytesIO(data)).convert("RGB")
    tiles = tile_image(image, 1, max_tiles, size, use_thumbnail=True)
    out = []
    for t in tiles:
        t = t.convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
        out.append(normalize(to_tensor(t)))
    return torch.stack(out)


def ours(data: bytes, max_tiles: int, size: int) -> torch.Tensor:
    return torch.from_numpy(decode_tiles(data, 1, max_tiles, size, use_thumbnail=True, fast=True))


def timed(images, repeats, max_tiles, size) -> dict[str, dict[str, list[float]]]:
    """CPU seconds per image of each pipeline (process time: a per-core figure that other load on the
    machine does not inflate), alternating the pipelines image by image so both see the same conditions."""
    times: dict[str, dict[str, list[float]]] = {"reference": {}, "ours": {}}
    tiles = {"reference": 0, "ours": 0}
    for _ in range(repeats):
        for kind, data in images:
            for name, fn in (("reference", reference), ("ours", ours)):
                t0 = time.process_time()
                out = fn(data, max_tiles, size)
                times[name].setdefault(kind, []).append(time.process_time() - t0)
                tiles[name] += out.shape[0]
    return times, tiles


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tiles", type=int, default=12)
    ap.add_argument("--tile-size", type=int, default=448)
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = [
        (k, synthetic_jpeg(w, h, i, k.startswith("doc"))) for i, (k, (w, h)) in enumerate(SIZES.items())
    ]
    # Same tiles up to resampling noise.
    for kind, data in images:
        a = reference(data, args.max_tiles, args.tile_size)
        b = ours(data, args.max_tiles, args.tile_size)
        ref_u8 = (a * STD + MEAN).mul(255).round().clamp(0, 255)
        assert a.shape == b.shape, kind
        err = (ref_u8 - b.float()).abs().mean().item()
        print(f"check {kind:<26} tiles {b.shape[0]:2d}  mean |diff| {err:.2f} / 255")
    times, tiles = timed(images, args.repeats, args.max_tiles, args.tile_size)
    ref_kind = {k: float(np.mean(v)) for k, v in times["reference"].items()}
    our_kind = {k: float(np.mean(v)) for k, v in times["ours"].items()}
    print(f"\n{'image':<26} {'reference ms':>13} {'ours ms':>9} {'speedup':>8}")
    for kind in ref_kind:
        print(
            f"{kind:<26} {1e3 * ref_kind[kind]:13.1f} {1e3 * our_kind[kind]:9.1f} {ref_kind[kind] / our_kind[kind]:8.2f}"
        )
    ref_rate = tiles["reference"] / sum(sum(v) for v in times["reference"].values())
    our_rate = tiles["ours"] / sum(sum(v) for v in times["ours"].values())
    print(f"{'all (tiles/s per core)':<26} {ref_rate:13.1f} {our_rate:9.1f} {our_rate / ref_rate:8.2f}")
    print(
        json.dumps(
            {
                "speedup": round(our_rate / ref_rate, 2),
                "tiles_per_s_ours": round(our_rate, 1),
                "tiles_per_s_reference": round(ref_rate, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
