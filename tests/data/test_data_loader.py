"""The loader: batch layout, exact resume, worker-count invariance, layout-invariant dp split, shards == meta JSON."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from conftest import small_config
from PIL import Image

from mllm.data import IGNORE_INDEX, build_loader
from mllm.data.pipeline import SampleProcessor
from mllm.data.shards import prepare
from mllm.data.sources import open_sources
from mllm.data.tiling import tile_image


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def assert_same(a, b):
    for name in ("input_ids", "labels", "segment_ids", "position_ids", "pixel_values", "image_flags"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert a.sample_ids == b.sample_ids


@pytest.fixture(scope="module")
def shards(synth_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    prepare(synth_dir.meta, out, shard_size=40, progress=False)
    return out


def test_batch_layout(synth_dir):
    cfg = small_config(synth_dir.meta, synth_dir.tokenizer)
    loader = build_loader(cfg)
    records = {}
    for name in ("synth_en", "synth_zh", "synth_text"):
        for i, line in enumerate((synth_dir.out_dir / f"{name}.jsonl").read_text().splitlines()):
            records[f"{name}:{i}"] = json.loads(line)
    ctx_id = loader.processor.conv.context_id
    for batch in take(loader, 4):
        assert batch.input_ids.shape == (2, 512) and batch.labels.dtype == torch.int64
        assert batch.pixel_values.dtype == torch.uint8 and batch.pixel_values.shape[1:] == (3, 28, 28)
        assert int((batch.input_ids == ctx_id).sum()) == 4 * batch.num_tiles
        expected_tiles = []
        for r in range(2):
            seg, pos, ids, lab = (
                batch.segment_ids[r],
                batch.position_ids[r],
                batch.input_ids[r],
                batch.labels[r],
            )
            n = int(seg.max())
            assert n == len(batch.sample_ids[r])
            for s in range(1, n + 1):
                where = torch.nonzero(seg == s).flatten()
                assert torch.equal(where, torch.arange(where[0], where[-1] + 1))  # contiguous, in order
                assert torch.equal(pos[where], torch.arange(len(where)))
                assert lab[where[-1]] == IGNORE_INDEX  # no target crosses into the next sample
                inner = where[:-1][lab[where[:-1]] != IGNORE_INDEX]
                assert torch.equal(lab[inner], ids[inner + 1])
            assert (seg[seg == 0] == 0).all() and (lab[seg == 0] == IGNORE_INDEX).all()
            for key in batch.sample_ids[r]:
                names = records[key].get("image") or []
                names = [names] if isinstance(names, str) else names
                budget = max(1, (6 if key.startswith("synth_zh") else 12) // max(1, len(names)))
                for nm in names:
                    img = Image.open(synth_dir.out_dir / "images" / nm).convert("RGB")
                    expected_tiles += [
                        np.asarray(t).transpose(2, 0, 1) for t in tile_image(img, 1, budget, 28)
                    ]
        if expected_tiles:
            # 28 px targets from <= 700 px images: fast decode may use draft mode, so compare loosely.
            diff = (batch.pixel_values.numpy().astype(int) - np.stack(expected_tiles).astype(int)).__abs__()
            assert diff.mean() < 3 and batch.image_flags.all()


def test_text_only_batch_has_one_dummy_tile(synth_dir, tmp_path):
    meta = json.loads(synth_dir.meta.read_text())
    text_meta = {"synth_text": meta["synth_text"]}
    for key in ("root", "annotation"):
        text_meta["synth_text"][key] = str(synth_dir.out_dir / text_meta["synth_text"][key])
    (tmp_path / "meta.json").write_text(json.dumps(text_meta))
    batch = take(build_loader(small_config(tmp_path / "meta.json", synth_dir.tokenizer)), 1)[0]
    assert batch.pixel_values.shape == (1, 3, 28, 28) and not batch.pixel_values.any()
    assert batch.image_flags.tolist() == [0] and batch.num_tiles == 0


@pytest.mark.parametrize("source", ["meta", "shards"])
def test_resume_is_bit_identical(synth_dir, shards, source):
    path = synth_dir.meta if source == "meta" else shards
    cfg = small_config(path, synth_dir.tokenizer, decode_threads=2)
    full = take(build_loader(cfg), 14)
    first = build_loader(cfg)
    take(first, 6)
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round trip
    first.close()
    resumed = build_loader(cfg, state=state)
    for a, b in zip(full[6:], take(resumed, 8)):
        assert_same(a, b)
    assert resumed.bad_samples.num_seen > first.bad_samples.num_seen


def test_same_batches_whatever_the_number_of_workers(synth_dir, shards):
    cfg0 = small_config(shards, synth_dir.tokenizer, num_workers=0)
    cfg2 = small_config(shards, synth_dir.tokenizer, num_workers=2, decode_threads=2)
    loader2 = build_loader(cfg2)
    for a, b in zip(take(build_loader(cfg0), 6), take(loader2, 6)):
        assert_same(a, b)
    # resume into a different worker count
    state = loader2.state_dict()
    loader2.close()
    ref = take(build_loader(cfg0), 9)[6:]
    for a, b in zip(ref, take(build_loader(cfg0, state=state), 3)):
        assert_same(a, b)


def test_shards_give_the_same_samples_as_the_meta_json(synth_dir, shards):
    cfg = small_config(synth_dir.meta, synth_dir.tokenizer)

    def processed(path):
        sources = open_sources(path)
        proc = SampleProcessor(cfg, sources)
        out = {}
        for src in sources:
            for unit in range(len(src.unit_counts)):
                for i, (_, raw) in enumerate(src.read_unit(unit)):
                    r = proc.stage1(raw, i)
                    out[r.key] = r  # both: "<dataset>:<0-based annotation line>"
        return out

    direct, sharded = processed(synth_dir.meta), processed(shards)
    # synth_text has repeat_time 0.5: both keep its first half of the lines
    n_text = len((synth_dir.out_dir / "synth_text.jsonl").read_text().splitlines())
    assert len(direct) == len(sharded) == synth_dir.num_samples - (n_text - int(n_text * 0.5))
    assert set(direct) == set(sharded)
    for key, r in direct.items():
        other = sharded[key]
        assert r.reason is None and other.reason is None
        assert (
            np.array_equal(r.input_ids, other.input_ids)
            and r.images == other.images
            and r.tiles == other.tiles
        )


def test_dp_ranks_split_the_same_global_batch(synth_dir, shards):
    """Reference: the dp1 loader's step. At dp2 the two ranks' rows are disjoint and together hold exactly the
    samples of that step, and last_step_samples names the same global batch."""
    cfg = small_config(shards, synth_dir.tokenizer)
    single = build_loader(cfg, rows_per_step=4)
    reference = [[k for b in take(single, 2) for row in b.sample_ids for k in row] for _ in range(2)]
    assert single.last_step_samples and sorted(single.last_step_samples) == sorted(reference[1])
    ranks = [build_loader(cfg, dp_rank=r, dp_size=2, rows_per_step=4) for r in range(2)]
    for step in range(2):
        seen = [[k for row in next(loader).sample_ids for k in row] for loader in ranks]
        assert seen[0] and seen[1] and not set(seen[0]) & set(seen[1])
        assert sorted(seen[0] + seen[1]) == sorted(reference[step])
        assert ranks[0].last_step_samples == ranks[1].last_step_samples
    # a state saved at dp2 resumes the dp1 loader exactly (and the other way round)
    resumed = build_loader(cfg, rows_per_step=4, state=ranks[1].state_dict())
    for a, b in zip(take(resumed, 2), take(single, 2)):
        assert_same(a, b)
    back = build_loader(cfg, dp_rank=1, dp_size=2, rows_per_step=4, state=single.state_dict())
    next(ranks[1])  # step 3, which single has taken too
    assert [k for row in next(back).sample_ids for k in row] == [
        k for row in next(ranks[1]).sample_ids for k in row
    ]


def test_state_mismatch_is_a_clear_error(synth_dir):
    state = build_loader(small_config(synth_dir.meta, synth_dir.tokenizer)).state_dict()
    with pytest.raises(ValueError, match="seed"):
        build_loader(small_config(synth_dir.meta, synth_dir.tokenizer, seed=5), state=state)


def test_png_bytes_roundtrip_in_shards(shards):
    src = [s for s in open_sources(shards) if s.name == "synth_en"][0]
    _, sample = next(iter(src.read_unit(0)))
    assert sample.record["conversations"] and all(Image.open(io.BytesIO(b)).size for b in sample.images)


def test_a_replica_decodes_each_image_once(synth_dir):
    """Two peers of one replica (threads standing in for tp ranks, a barrier for the all-gather) each decode
    half of the samples and assemble the same batches as a loader that decodes everything (the reference)."""
    import threading

    from mllm.data.loader import DecodeSplit

    cfg = small_config(synth_dir.meta, synth_dir.tokenizer)
    single = build_loader(cfg)
    single_calls = [0]
    single_stage2 = single.processor.stage2

    def count_single(item):
        single_calls[0] += 1
        return single_stage2(item)

    single.processor.stage2 = count_single
    reference = take(single, 3)
    slots: list = [None, None]
    barrier = threading.Barrier(2)

    def gather_as(index):
        def gather(mine):
            slots[index] = mine
            barrier.wait()
            out = list(slots)
            barrier.wait()
            return out

        return gather

    peers = [build_loader(cfg) for _ in range(2)]
    calls = [0, 0]
    for index, loader in enumerate(peers):
        loader.decode_split = DecodeSplit(index, 2, gather_as(index))
        stage2 = loader.processor.stage2

        def counted(item, index=index, stage2=stage2):
            calls[index] += 1
            return stage2(item)

        loader.processor.stage2 = counted
    results: list = [None, None]
    threads = [
        threading.Thread(target=lambda i=i: results.__setitem__(i, take(peers[i], 3))) for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    # together once what the single loader decoded (prefetched micro-batches included), each about half
    assert calls[0] + calls[1] == single_calls[0] and abs(calls[0] - calls[1]) <= 5
    for batches in results:
        for a, b in zip(reference, batches):
            assert_same(a, b)
