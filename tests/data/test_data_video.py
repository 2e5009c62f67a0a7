"""Video records: InternVL's frame sampling, one tile per frame, `Frame-i: <image>` prompts, training end to end."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import av
import internvl_reference
import numpy as np
import pytest
from conftest import small_config
from PIL import Image

from mllm.data import build_loader
from mllm.data.video import (
    Uniforms,
    Video,
    choose_frames,
    frame_count,
    frame_indices,
    frame_range,
    sample_frames,
    video_tiles,
)

ROOT = Path(__file__).resolve().parents[2]
COLOURS = [(200, 30, 30), (30, 170, 60), (30, 60, 220), (235, 210, 20)]


def frame(i: int, w: int = 64, h: int = 48) -> np.ndarray:
    img = np.full((h, w, 3), 240, np.uint8)
    img[:, : (i + 1) * w // 12] = COLOURS[i % len(COLOURS)]  # a bar that grows frame by frame
    return img


def write_mp4(path: Path, n: int = 10) -> None:
    with av.open(str(path), "w", format="mp4") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(n):
            for p in s.encode(av.VideoFrame.from_ndarray(frame(i), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def write_video_dataset(synth_dir, out: Path) -> Path:
    """mp4 (10 frames), GIF (6 frames), a frame folder (5 jpgs), a missing and a broken video."""
    videos = out / "videos"
    (videos / "clip_frames").mkdir(parents=True)
    write_mp4(videos / "clip.mp4")
    gif = [Image.fromarray(frame(i)) for i in range(6)]
    gif[0].save(videos / "anim.gif", save_all=True, append_images=gif[1:], duration=100)
    for i in range(5):  # InternVL orders by the number: frame_10 after frame_2
        Image.fromarray(frame(i)).save(videos / "clip_frames" / f"frame_{[1, 2, 10, 11, 12][i]}.jpg")
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    q = [{"from": "human", "value": "What grows?"}, {"from": "gpt", "value": "A red bar."}]
    good = [
        {"video": "clip.mp4", "conversations": q},
        {"video": "anim.gif", "conversations": [{"from": "human", "value": "<video>\nWhat grows?"}, q[1]]},
        {"video": "clip_frames", "conversations": q},
    ]
    bad = [{"video": "missing.mp4", "conversations": q}, {"video": "broken.mp4", "conversations": q}]
    records = good * 6 + bad
    (out / "video.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    meta = {"clips": {"root": str(videos), "annotation": str(out / "video.jsonl"), "repeat_time": 1}}
    (out / "meta.json").write_text(json.dumps(meta))
    return out / "meta.json"


@pytest.fixture(scope="module")
def video_meta(synth_dir, tmp_path_factory):
    return write_video_dataset(synth_dir, tmp_path_factory.mktemp("video"))


class _Choice:
    """random.choice / np.random.permutation for InternVL's get_frame_indices, drawing from a Uniforms stream."""

    def __init__(self, uniform) -> None:
        self.uniform = uniform

    def choice(self, seq):
        return seq[int(self.uniform() * len(seq))]

    def permutation(self, n):
        return np.argsort([self.uniform() for _ in range(n)], kind="stable")


@pytest.mark.parametrize("num_frames", [1, 4, 8, 32])
@pytest.mark.parametrize("vlen", [1, 3, 8, 9, 40, 301])
def test_frame_indices_equal_internvls_with_the_same_draws(monkeypatch, num_frames, vlen):
    for seed in range(3):
        monkeypatch.setattr(internvl_reference, "random", _Choice(Uniforms(seed)))
        monkeypatch.setattr(internvl_reference.np.random, "permutation", _Choice(Uniforms(seed)).permutation)
        expected = internvl_reference.get_frame_indices(num_frames, vlen, sample="rand")
        assert frame_indices(num_frames, vlen, Uniforms(seed)) == [int(i) for i in expected]


def test_readers_return_what_internvls_return(video_meta):
    videos = video_meta.parent / "videos"
    mp4 = Video.from_path("clip.mp4", str(videos / "clip.mp4"))
    gif = Video.from_path("anim.gif", str(videos / "anim.gif"))
    folder = Video.from_path("clip_frames", str(videos / "clip_frames"))
    assert (mp4.kind, gif.kind, folder.kind) == ("container", "gif", "frames")
    assert [frame_count(v) for v in (mp4, gif, folder)] == [10, 6, 5]
    # frame_10 sorts after frame_2 (InternVL's sort_frames): the folder's 3rd frame is frame(2)
    assert np.abs(np.asarray(Image.open(io.BytesIO(folder.data[2]))).astype(int) - frame(2)).mean() < 4
    for seed in range(20):
        drawn = sample_frames(mp4, 10, 12, 16, Uniforms(seed))  # more drawn than the video has: padded
        assert 12 <= len(drawn) <= 16 and drawn == sorted(drawn) and drawn[-1] == 9
        assert len(sample_frames(gif, 6, 8, 8, Uniforms(seed))) == 6  # distinct frames only
        assert sample_frames(folder, 5, 8, 8, Uniforms(seed)) == list(range(5))  # all, when not more
        few = sample_frames(folder, 5, 2, 3, Uniforms(seed))
        assert len(few) in (2, 3) and len(set(few)) == len(few)
    # InternVL's `clip` (seconds): 4 fps, (1.0, 2.0) -> frames 4..7
    clipped = Video.from_path("clip.mp4", str(videos / "clip.mp4"), clip=(1.0, 2.0))
    assert frame_range(clipped) == (4, 4)
    for seed in range(5):
        indices = choose_frames(clipped, 2, 3, seed, 0)
        assert len(indices) in (2, 3) and all(4 <= i < 8 for i in indices)
        tiles = video_tiles(clipped, indices, 28, fast=False)
        assert tiles.shape == (len(indices), 3, 28, 28)


def test_video_samples_get_one_tile_per_frame_and_frame_prompts(synth_dir, video_meta):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(synth_dir.tokenizer))
    cfg = small_config(video_meta, synth_dir.tokenizer, min_num_frame=2, max_num_frame=4, shuffle_buffer=4)
    loader = build_loader(cfg)
    it = iter(loader)
    batches = [next(it) for _ in range(4)]
    context = tok.convert_tokens_to_ids("<IMG_CONTEXT>")
    n_tiles = sum(int(b.pixel_values.shape[0]) for b in batches)
    n_context = sum(int((b.input_ids == context).sum()) for b in batches)
    assert n_tiles > 0 and n_context == n_tiles * cfg.num_image_token
    text = tok.decode(batches[0].input_ids[0].tolist())
    assert "Frame-1: <img>" in text and "Frame-2: <img>" in text and "<video>" not in text
    counts = loader.bad_samples.counts()
    assert counts.get("missing_video", 0) + counts.get("corrupt_video", 0) >= 1, counts
    loader.close()


def test_a_video_dataset_trains_with_tiles(synth_dir, video_meta, tmp_path):
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "mllm.train", "--config-name=tiny_sft", f"data.path={video_meta}",
        f"data.tokenizer={synth_dir.tokenizer}", "data.min_num_frame=2", "data.max_num_frame=4",
        "train.steps=2", f"train.run_dir={run_dir}", "checkpoint.every=0", "checkpoint.save_final=false",
        "logging.progress=off",
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    steps = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(steps) == 2 and all(s["tiles"] > 0 and np.isfinite(s["loss"]) for s in steps)


def test_data_augment_degrades_video_frames_too(synth_dir, video_meta, tmp_path):
    # InternVL applies the dataset's transform (JPEG degradation with data_augment) to every frame.
    meta = json.loads(video_meta.read_text())
    meta["clips"]["data_augment"] = True
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    cfg = dict(min_num_frame=2, max_num_frame=4, shuffle_buffer=4)
    plain = next(iter(build_loader(small_config(video_meta, synth_dir.tokenizer, **cfg))))
    augmented = next(iter(build_loader(small_config(tmp_path / "meta.json", synth_dir.tokenizer, **cfg))))
    assert np.array_equal(plain.input_ids.numpy(), augmented.input_ids.numpy())
    diff = np.abs(plain.pixel_values.numpy().astype(int) - augmented.pixel_values.numpy().astype(int))
    assert plain.pixel_values.shape == augmented.pixel_values.shape and 0 < diff.mean() < 20
