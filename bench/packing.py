"""Packing benchmark: fill and dp balance of the FLOP-balanced packer vs naive padding and greedy first-fit,
and of the tile-balanced packer (``tiles_per_row=-1``), with the coefficient of variation of tiles per row.

Synthetic SFT-like mix (tiles 1..12 with thumbnail, text 30..4000 tokens, some text-only and multi-image
samples), rows of 8192 tokens packed from one global stream (as the loader does); a step is the next 8 rows, one
per dp rank: dealt by FLOPs (`assign_rows`) for our packers, in order for the baselines.
Prints a table and a final JSON line with `fill`, `dp_imbalance`, `tiles_cv` and the packer's samples/s.

    .venv/bin/python bench/packing.py [--samples-per-rank 3000]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from mllm.data.packing import FlopModel, Packer, assign_rows, row_level  # noqa: E402
from mllm.data.tiling import num_tiles, per_image_max_tiles, select_grid  # noqa: E402

SEQ = 8192
RANKS = 8
MAX_TILES_ROW = 48
IMG_TOKENS = 256


def image_tiles(rng: np.random.Generator, budget: int) -> int:
    if rng.random() < 0.3:  # documents / screenshots: tall or wide, large
        w, h = int(rng.integers(800, 2600)), int(rng.integers(1000, 3600))
        if rng.random() < 0.5:
            w, h = h, w
    else:  # photos
        w = int(rng.integers(200, 4000))
        h = int(w / rng.choice([4 / 3, 3 / 4, 16 / 9, 9 / 16, 1.0, 1.5, 2.0]))
    return num_tiles(select_grid(w, max(h, 1), 1, budget), True)


def make_stream(
    seed: int,
    n: int,
    seq: int = SEQ,
    max_tiles_row: int = MAX_TILES_ROW,
    img_tokens: int = IMG_TOKENS,
    max_patch: int = 12,
) -> list[tuple[int, int]]:
    """(tokens, tiles) of an SFT-like mix; samples longer than a row are dropped (the loader rejects them)."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        text = int(np.exp(rng.uniform(np.log(30), np.log(4000))))
        kind = rng.random()
        n_img = 0 if kind < 0.15 else (int(rng.integers(2, 5)) if kind < 0.25 else 1)
        tiles = [image_tiles(rng, per_image_max_tiles(max_patch, n_img)) for _ in range(n_img)]
        tokens = text + sum(img_tokens * t + 2 for t in tiles)
        if tokens <= seq and sum(tiles) <= max_tiles_row:
            out.append((tokens, sum(tiles)))
    return out


def naive_rows(stream: list[tuple[int, int]]) -> list[list[int]]:
    return [[i] for i in range(len(stream))]


def first_fit_rows(stream: list[tuple[int, int]], window: int = 32) -> list[list[int]]:
    """Classic greedy first-fit over a window of open rows; the oldest row closes when the window is full."""
    rows: list[list[int]] = []
    open_rows: list[tuple[list[int], int, int]] = []
    for i, (tok, til) in enumerate(stream):
        for j, (members, used, used_tiles) in enumerate(open_rows):
            if used + tok <= SEQ and used_tiles + til <= MAX_TILES_ROW:
                members.append(i)
                open_rows[j] = (members, used + tok, used_tiles + til)
                break
        else:
            open_rows.append(([i], tok, til))
            if len(open_rows) > window:
                rows.append(open_rows.pop(0)[0])
    rows.extend(r[0] for r in open_rows)
    return rows


def balanced_rows(
    stream: list[tuple[int, int]], flops: FlopModel, buffer: int = 256, tiles_per_row: int = 0
) -> list[list[int]]:
    packer = Packer(SEQ, MAX_TILES_ROW, flops, buffer_size=buffer, tiles_per_row=tiles_per_row)
    rows = []
    for i, (tok, til) in enumerate(stream):
        packer.add(i, tok, til)
        if packer.ready():
            rows.append(packer.pop_row(row_level(len(rows) // RANKS)))  # one level per step
    return rows  # the tail still buffered is the next rows' material, as in a streaming run


def evaluate(stream, rows, flops: FlopModel, deal: bool) -> dict:
    steps = len(rows) // RANKS
    fill_num = fill_den = 0
    ratios, row_tiles = [], []
    for s in range(steps):
        step_rows = rows[s * RANKS : (s + 1) * RANKS]
        row_flops = []
        for members in step_rows:
            tok = np.array([stream[i][0] for i in members])
            til = np.array([stream[i][1] for i in members])
            fill_num += int(tok.sum())
            fill_den += SEQ
            row_flops.append(float(np.sum(flops.sample(tok, til))))
            row_tiles.append(int(til.sum()))
        order = assign_rows(row_flops, RANKS) if deal else [[r] for r in range(RANKS)]
        step_flops = [sum(row_flops[i] for i in mine) for mine in order]
        ratios.append(max(step_flops) / np.mean(step_flops))
    cv = float(np.std(row_tiles) / np.mean(row_tiles))
    return {
        "fill": fill_num / fill_den,
        "dp_imbalance": float(np.mean(ratios)),
        "steps": steps,
        "tiles_cv": cv,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples-per-rank", type=int, default=2000)
    ap.add_argument("--buffer", type=int, default=256)
    args = ap.parse_args()
    flops = FlopModel()
    stream = make_stream(1000, args.samples_per_rank * RANKS)
    results = {}
    for name, fn in (
        ("naive padding", naive_rows),
        ("greedy first-fit", first_fit_rows),
        ("flop-balanced", lambda s: balanced_rows(s, flops, args.buffer)),
        ("tile-balanced", lambda s: balanced_rows(s, flops, args.buffer, tiles_per_row=-1)),
    ):
        t0 = time.perf_counter()
        rows = fn(stream)
        dt = time.perf_counter() - t0
        res = evaluate(stream, rows, flops, deal=name in ("flop-balanced", "tile-balanced"))
        res["samples_per_s"] = len(stream) / dt
        results[name] = res
    print(f"{'packer':<18} {'fill':>7} {'dp_imbalance':>13} {'tiles_cv':>9} {'steps':>6} {'samples/s':>10}")
    for name, r in results.items():
        print(
            f"{name:<18} {r['fill']:7.4f} {r['dp_imbalance']:13.4f} {r['tiles_cv']:9.4f} {r['steps']:6d} "
            f"{r['samples_per_s']:10.0f}"
        )
    tiled = results["tile-balanced"]
    ours = results["flop-balanced"]
    print(
        json.dumps(
            {
                "fill": round(ours["fill"], 4),
                "dp_imbalance": round(ours["dp_imbalance"], 4),
                "samples_per_s": round(ours["samples_per_s"]),
                "tiles_cv": round(ours["tiles_cv"], 4),
                "tile_balanced_fill": round(tiled["fill"], 4),
                "tile_balanced_dp_imbalance": round(tiled["dp_imbalance"], 4),
                "tile_balanced_tiles_cv": round(tiled["tiles_cv"], 4),
                "first_fit_fill": round(results["greedy first-fit"]["fill"], 4),
                "first_fit_dp_imbalance": round(results["greedy first-fit"]["dp_imbalance"], 4),
                "naive_fill": round(results["naive padding"]["fill"], 4),
                "naive_dp_imbalance": round(results["naive padding"]["dp_imbalance"], 4),
            }
        )
    )


if __name__ == "__main__":
    main()
