"""InternVL's data_augment (per-tile random JPEG degradation) against a plain PIL reference."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pytest
import torch
from conftest import small_config
from PIL import Image
from test_data_loader import assert_same, take
from test_data_tiling import ref_dynamic_preprocess

from mllm.data import build_loader
from mllm.data.augment import JPEG_QUALITIES, jpeg_quality
from mllm.data.pipeline import SampleProcessor
from mllm.data.shards import prepare
from mllm.data.sources import open_sources

SEED = 7


# ---- reference: InternVL's simulate_jpeg_degradation, written out plainly ----------------------------------
def ref_jpeg_degrade(img: Image.Image, quality: int) -> Image.Image:
    with io.BytesIO() as output:
        img.convert("RGB").save(output, format="JPEG", quality=quality)
        output.seek(0)
        return Image.open(output).copy()


def chw(img: Image.Image) -> np.ndarray:
    return np.asarray(img).transpose(2, 0, 1)


@pytest.fixture(scope="module")
def mixed_meta(synth_dir, tmp_path_factory):
    """synth_en with data_augment true, synth_zh (and text) false; absolute paths so it can live anywhere."""
    meta = json.loads(synth_dir.meta.read_text())
    for entry in meta.values():
        for key in ("root", "annotation"):
            entry[key] = str(synth_dir.out_dir / entry[key])
    meta["synth_en"]["data_augment"] = True
    path = tmp_path_factory.mktemp("augment") / "meta.json"
    path.write_text(json.dumps(meta))
    return path


def reference_tiles(synth_dir, record: dict, budget_total: int) -> list[list[Image.Image]]:
    """Undegraded InternVL tiles (PIL) of each image of a record, 28 px, thumbnail on."""
    names = record.get("image") or []
    names = [names] if isinstance(names, str) else names
    budget = max(1, budget_total // max(1, len(names)))
    out = []
    for name in names:
        img = Image.open(synth_dir.out_dir / "images" / name).convert("RGB")
        out.append(ref_dynamic_preprocess(img, 1, budget, 28, use_thumbnail=True)[0])
    return out


def processed_samples(cfg, meta, dataset: str, limit: int):
    """(position, raw record, tiles from stage 2) for the first samples of one dataset."""
    sources = open_sources(meta)
    proc = SampleProcessor(cfg, sources)
    src = next(s for s in sources if s.name == dataset)
    out = []
    for i, (_, raw) in enumerate(src.read_unit(0)):
        if len(out) == limit:
            break
        pos = 1000 + 37 * i  # any positions: the quality depends on them, not on the read order
        item = proc.stage1(raw, pos)
        assert item.reason is None, item.detail
        if item.images:
            out.append((pos, raw.record, proc.stage2(item)))
    return out


# ---- (1) data_augment true: tiles == PIL reference degraded at the expected quality --------------------------
def test_augmented_tiles_equal_reference(synth_dir, mixed_meta):
    cfg = small_config(mixed_meta, synth_dir.tokenizer, seed=SEED, fast_decode=False)
    changed = total = 0
    for pos, record, tiles in processed_samples(cfg, mixed_meta, "synth_en", 25):
        expected, plain = [], []
        for i, image_tiles in enumerate(reference_tiles(synth_dir, record, 12)):
            for t, tile in enumerate(image_tiles):
                q = jpeg_quality(SEED, pos, i, t)
                expected.append(chw(ref_jpeg_degrade(tile, q)))
                plain.append(chw(tile))
        assert np.array_equal(tiles, np.stack(expected)), pos
        changed += int((tiles != np.stack(plain)).any(axis=(1, 2, 3)).sum())
        total += len(plain)
    # the degradation really happened (flat synthetic tiles can survive a JPEG round trip unchanged)
    assert total > 25 and changed > total // 3


def test_augmented_fast_decode_stays_close_to_reference(synth_dir, mixed_meta):
    cfg = small_config(mixed_meta, synth_dir.tokenizer, seed=SEED, fast_decode=True)
    for pos, record, tiles in processed_samples(cfg, mixed_meta, "synth_en", 10):
        expected = [
            chw(ref_jpeg_degrade(tile, jpeg_quality(SEED, pos, i, t)))
            for i, image_tiles in enumerate(reference_tiles(synth_dir, record, 12))
            for t, tile in enumerate(image_tiles)
        ]
        # draft decode + torch bicubic before the JPEG round trip: resampling noise only
        diff = np.abs(tiles.astype(int) - np.stack(expected).astype(int))
        assert diff.mean() < 3, (pos, diff.mean())


# ---- (2) data_augment false: tiles unchanged -----------------------------------------------------------------
def test_without_data_augment_tiles_are_plain_tiles(synth_dir, mixed_meta):
    cfg = small_config(mixed_meta, synth_dir.tokenizer, seed=SEED, fast_decode=False)
    samples = processed_samples(cfg, mixed_meta, "synth_zh", 20)
    assert samples
    for _, record, tiles in samples:
        plain = [chw(t) for image_tiles in reference_tiles(synth_dir, record, 6) for t in image_tiles]
        assert np.array_equal(tiles, np.stack(plain))


def test_loader_augments_only_flagged_datasets(synth_dir, mixed_meta):
    plain = take(build_loader(small_config(synth_dir.meta, synth_dir.tokenizer, seed=SEED)), 3)
    loader = build_loader(small_config(mixed_meta, synth_dir.tokenizer, seed=SEED))
    aug, ctx_id = take(loader, 3), loader.processor.conv.context_id
    saw_en = saw_zh = False
    for a, b in zip(plain, aug):
        # the augmentation changes pixels only: same order, tokens and tile counts
        assert a.sample_ids == b.sample_ids and torch.equal(a.input_ids, b.input_ids)
        assert a.pixel_values.shape == b.pixel_values.shape
        start = 0
        for key, n in zip([k for row in a.sample_ids for k in row], _tiles_per_sample(a, ctx_id)):
            pa, pb = a.pixel_values[start : start + n], b.pixel_values[start : start + n]
            start += n
            if n == 0:
                continue
            if key.startswith("synth_en"):
                saw_en = True
                assert not torch.equal(pa, pb)
                # degraded, not replaced: a quality-75 JPEG of a 28 px tile moves pixels by a few levels on average
                assert (pa.int() - pb.int()).abs().float().mean() < 8
            else:
                saw_zh = True
                assert torch.equal(pa, pb)
    assert saw_en and saw_zh


def _tiles_per_sample(batch, ctx_id: int, tokens_per_tile: int = 4) -> list[int]:
    """Tiles of each sample of a batch, in order, from its image-context token count."""
    counts = []
    for r, row in enumerate(batch.sample_ids):
        for s in range(1, len(row) + 1):
            ctx = batch.input_ids[r][batch.segment_ids[r] == s] == ctx_id
            counts.append(int(ctx.sum()) // tokens_per_tile)
    return counts


# ---- (3) worker / decode-thread invariance and exact resume ----------------------------------------------------
def test_same_augmented_batches_with_0_or_2_workers_and_on_resume(synth_dir, mixed_meta, tmp_path):
    shards = tmp_path / "shards"
    prepare(mixed_meta, shards, shard_size=40, progress=False)
    assert {s.name: s.data_augment for s in open_sources(shards)}["synth_en"] is True
    cfg0 = small_config(shards, synth_dir.tokenizer, seed=SEED, num_workers=0, decode_threads=0)
    cfg2 = small_config(shards, synth_dir.tokenizer, seed=SEED, num_workers=2, decode_threads=2)
    ref = take(build_loader(cfg0), 7)
    loader2 = build_loader(cfg2)
    for a, b in zip(ref[:4], take(loader2, 4)):
        assert_same(a, b)
    state = json.loads(json.dumps(loader2.state_dict()))
    loader2.close()
    for a, b in zip(ref[4:], take(build_loader(cfg0, state=state), 3)):
        assert_same(a, b)


# ---- (4) qualities vary within 75..100 -------------------------------------------------------------------------
def test_qualities_are_uniform_over_75_to_100():
    draws = Counter(jpeg_quality(SEED, pos, 0, 0) for pos in range(5200))
    assert set(draws) == set(JPEG_QUALITIES) == set(range(75, 101))
    assert max(draws.values()) < 2 * min(draws.values())  # ~200 each
    per_tile = {jpeg_quality(SEED, 5, i, t) for i in range(3) for t in range(13)}
    assert len(per_tile) > 10  # tiles of one sample draw independently, as in InternVL's per-tile transform
    other_seed = [jpeg_quality(SEED + 1, pos, 0, 0) for pos in range(200)]
    assert other_seed != [jpeg_quality(SEED, pos, 0, 0) for pos in range(200)]  # seeds draw apart


def test_loader_tiles_reveal_varying_qualities(synth_dir, mixed_meta):
    """Pixel level: every loader tile is the reference degraded at a quality in 75..100, and they vary."""
    cfg = small_config(mixed_meta, synth_dir.tokenizer, seed=SEED, fast_decode=False)
    records = {
        f"synth_en:{i}": json.loads(line)
        for i, line in enumerate((synth_dir.out_dir / "synth_en.jsonl").read_text().splitlines())
    }
    found = []
    loader = build_loader(cfg)
    for batch in take(loader, 4):
        start = 0
        for key, n in zip(
            [k for row in batch.sample_ids for k in row],
            _tiles_per_sample(batch, loader.processor.conv.context_id),
        ):
            tiles = batch.pixel_values[start : start + n].numpy()
            start += n
            if not key.startswith("synth_en"):
                continue
            ref = [t for image_tiles in reference_tiles(synth_dir, records[key], 12) for t in image_tiles]
            for ours, tile in zip(tiles, ref):
                matches = [q for q in range(50, 101) if np.array_equal(ours, chw(ref_jpeg_degrade(tile, q)))]
                assert any(75 <= q <= 100 for q in matches), (key, matches)
                if len(matches) == 1:  # flat tiles match many qualities; textured ones pin theirs down
                    found.append(matches[0])
    assert len(found) > 20 and min(found) >= 75 and len(set(found)) > 8, Counter(found)
