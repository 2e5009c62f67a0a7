"""Bad input is skipped, logged and counted; too much of it fails the run with a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
from conftest import small_config

from mllm.data import BadSampleCounter, DataQualityError, build_loader
from mllm.data.shards import prepare


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def write_bad_dataset(synth_dir, out, n_good=40):
    """A meta JSON whose dataset mixes good samples with one of each kind of bad sample."""
    images = out / "images"
    images.mkdir(parents=True)
    good = [json.loads(x) for x in (synth_dir.out_dir / "synth_en.jsonl").read_text().splitlines()]
    good = [r for r in good if isinstance(r["image"], str)][:n_good]
    for r in good:
        shutil.copy(synth_dir.out_dir / "images" / r["image"], images / r["image"])
    jpeg = (images / next(r["image"] for r in good if r["image"].endswith(".jpg"))).read_bytes()
    (images / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (images / "garbage.jpg").write_bytes(b"not an image at all")
    q = [{"from": "human", "value": "What colour is it?"}, {"from": "gpt", "value": "Red."}]
    bad = [
        {"image": "truncated.jpg", "conversations": q},  # corrupt_image (found when decoding)
        {"image": "garbage.jpg", "conversations": q},  # corrupt_image (found at the header)
        {"image": "does_not_exist.jpg", "conversations": q},  # missing_image
        {"image": good[0]["image"], "conversations": []},  # empty_conversation
        {"image": good[0]["image"], "conversations": [{"from": "human", "value": "<image><image>x"}, q[1]]},
        # too_long: truncation (data.too_long's default) would cut before the image's tokens
        {
            "image": good[0]["image"],
            "conversations": [{"from": "human", "value": "word " * 900 + "<image>"}, q[1]],
        },
    ]
    lines = [json.dumps(r) for r in good + bad] + ["{not json"]
    (out / "bad.jsonl").write_text("\n".join(lines) + "\n")
    meta = {"mixed": {"root": "images", "annotation": "bad.jsonl", "repeat_time": 1}}
    (out / "meta.json").write_text(json.dumps(meta))
    return out / "meta.json", len(good), len(lines) - len(good)


def test_each_kind_of_bad_sample_is_counted(synth_dir, tmp_path):
    meta, n_good, n_bad = write_bad_dataset(synth_dir, tmp_path)
    loader = build_loader(small_config(meta, synth_dir.tokenizer, shuffle_buffer=8, pack_buffer=8))
    batches = take(loader, 20)
    counts = loader.bad_samples.counts()
    for reason in (
        "corrupt_image",
        "missing_image",
        "empty_conversation",
        "placeholder_mismatch",
        "too_long",
        "bad_annotation",
    ):
        assert counts.get(reason, 0) >= 1, (reason, counts)
    assert counts["corrupt_image"] >= 2  # truncated and garbage
    seen = loader.bad_samples.num_seen
    epochs = seen / (n_good + n_bad)
    assert loader.bad_samples.bad_fraction == pytest.approx(n_bad / (n_good + n_bad), abs=1.5 / epochs)
    metrics = loader.metrics()
    assert metrics["data/bad/missing_image"] >= 1 and 0 < metrics["data/bad_fraction"] < 1
    # No bad sample reaches a batch, and no batch row is empty of supervised tokens.
    keys = {k for b in batches for row in b.sample_ids for k in row}
    assert all(int(k.split(":")[1]) <= n_good for k in keys)
    assert all((b.labels != -100).any() for b in batches)


def test_truncated_samples_are_kept_and_counted(synth_dir, tmp_path):
    meta, _, _ = write_bad_dataset(synth_dir, tmp_path, n_good=6)
    records = [json.loads(x) for x in (tmp_path / "bad.jsonl").read_text().splitlines()[:6]]
    q = {"from": "human", "value": "<image>\nDescribe it."}
    records.append(
        {"image": records[0]["image"], "conversations": [q, {"from": "gpt", "value": "word " * 900}]}
    )
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    epochs = 2
    loader = build_loader(
        small_config(meta, synth_dir.tokenizer, shuffle_buffer=4, pack_buffer=4), epochs=epochs
    )
    batches = list(loader)
    long_key = "mixed:6"  # its 0-based annotation line
    rows = [(row, b.input_ids[r]) for b in batches for r, row in enumerate(b.sample_ids)]
    assert sum(row.count(long_key) for row, _ in rows) == epochs  # kept, once per epoch
    assert all(row == [long_key] and (ids != loader.pad_id).all() for row, ids in rows if long_key in row)
    assert loader.metrics()["data/truncated"] == epochs and loader.bad_samples.num_bad == 0


def test_unreadable_shard_is_counted(synth_dir, tmp_path):
    meta, _, _ = write_bad_dataset(synth_dir, tmp_path / "src")
    out = tmp_path / "shards"
    prepare(meta, out, shard_size=10, progress=False)
    (out / "mixed" / "mixed-000001.tar").write_bytes(b"\0garbage" * 100)
    loader = build_loader(small_config(out, synth_dir.tokenizer, shuffle_buffer=8, pack_buffer=8))
    take(loader, 15)
    counts = loader.bad_samples.counts()
    assert counts.get("unreadable_shard", 0) >= 10 and counts.get("missing_image", 0) >= 1


def test_max_bad_fraction_fails_with_one_line_naming_the_dataset(synth_dir, tmp_path):
    meta, _, _ = write_bad_dataset(synth_dir, tmp_path, n_good=8)
    cfg = small_config(meta, synth_dir.tokenizer, shuffle_buffer=8, pack_buffer=4, max_bad_fraction=0.1)
    cfg.min_samples_for_bad_check = 20
    with pytest.raises(DataQualityError) as e:
        take(build_loader(cfg), 50)
    msg = str(e.value)
    assert "\n" not in msg and "'mixed'" in msg and "max_bad_fraction" in msg and "fix" in msg


def test_counter_state_and_check():
    c = BadSampleCounter(max_bad_fraction=0.25, min_samples=4)
    for _ in range(3):
        c.record_ok("a")
    c.record_bad("a", "missing_image", "a:1", "x.jpg")
    c.check()  # 1/4 is not above 0.25
    c.record_bad("a", "too_long", "a:2")
    assert c.bad_fraction == pytest.approx(2 / 5)
    with pytest.raises(DataQualityError, match="'a'"):
        c.check()
    d = BadSampleCounter()
    d.load_state_dict(json.loads(json.dumps(c.state_dict())))
    assert d.counts() == {"missing_image": 1, "too_long": 1} and d.num_seen == 5
    with pytest.raises(ValueError):
        c.record_bad("a", "no_such_reason", "k")


def test_the_rule_judges_a_window_of_recent_samples():
    """Reference: the hand-counted fractions. The cumulative fraction (10/56 = 18%) would pass; the last 20
    samples hold 6 rejections (30% > 25%), so the windowed rule fails, and an early cluster below the limit
    within its window (4/20) passes."""
    c = BadSampleCounter(max_bad_fraction=0.25, min_samples=20, window=20)
    pos = 0
    for good in [False] * 4 + [True] * 46:
        if good:
            c.record_ok("a", pos)
        else:
            c.record_bad("a", "too_long", f"a:{pos}", pos=pos)
        pos += 1
        c.check()
    for _ in range(5):
        c.record_bad("a", "too_long", f"a:{pos}", pos=pos)
        pos += 1
    c.check()  # 5/20
    c.record_ok("a", pos)
    c.record_bad("a", "corrupt_image", f"a:{pos}", count_seen=False, pos=pos)  # found when decoding
    assert c.num_seen == 56 and c.num_bad == 10
    with pytest.raises(DataQualityError, match="6 of its last 20 samples") as e:
        c.check()
    assert "\n" not in str(e.value) and "data.bad_window" in str(e.value)
