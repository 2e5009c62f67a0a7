"""Video records as InternVL trains them: frames sampled at random, one tile per frame, `Frame-i: <image>` prompts.

InternVL (`internvl_chat_finetune.py` `video_get_item`, `dataset.py` `read_frames_*`) draws a frame count
uniformly from [min_num_frame, max_num_frame], splits the video into that many equal intervals and takes one
random frame of each (`get_frame_indices(sample="rand")`), then resizes every frame to one tile. Containers
(mp4, mkv, webm, avi, ...) are decoded with PyAV (FFmpeg) where InternVL uses decord; GIFs with PIL where it uses
imageio; a folder of frame images is read in InternVL's order (the number in `*_<n>.jpg`). What each reader
returns is InternVL's too: a container always yields the drawn count (short videos repeat their last frame), a
GIF its distinct sampled frames, a folder all its frames when it has no more than the drawn count.

Randomness is a hash of (seed, sample position in the stream), so frames are the same for any number of workers
and on resume, and differ between epochs.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image

from mllm.data import storage
from mllm.data.tiling import tiles_uint8

GIF_EXT = ".gif"


@dataclass
class Video:
    name: str
    kind: str  # "container", "gif" or "frames"
    data: list[bytes]  # the encoded file, or each frame's encoded image in order
    clip: tuple[float, float] | None = (
        None  # (start, end) seconds of a container to sample from (InternVL's `clip`)
    )

    @classmethod
    def from_path(cls, name: str, path: str, clip: tuple[float, float] | None = None) -> Video:
        """A video file, or a folder of frames (a path that is a directory or ends with '/'); local or URL."""
        if path.endswith("/") or storage.is_dir(path):
            frames = sort_frames(storage.listdir(path))
            return cls(name, "frames", [storage.read_bytes(storage.join(path, f)) for f in frames])
        kind = "gif" if path.lower().endswith(GIF_EXT) else "container"
        return cls(name, kind, [storage.read_bytes(path)], clip if kind == "container" else None)


def sort_frames(names: list[str]) -> list[str]:
    """InternVL's `sort_frames`: by the number in `*_<n>.jpg` (others first, as -1), stable."""

    def number(name: str) -> int:
        match = re.search(r"_(\d+).jpg$", os.path.basename(name))
        return int(match.group(1)) if match else -1

    return sorted((os.path.basename(n.rstrip("/")) for n in names), key=number)


def frame_count(video: Video) -> int:
    """Frames in the video (container header, GIF frame count, or files in the folder)."""
    return frame_range(video)[1]


def frame_range(video: Video) -> tuple[int, int]:
    """(first frame, frame count) to sample from: the whole video, or a container's `clip` as InternVL's
    read_frames_decord computes it (start = int(start_s * fps), count = int((end_s - start_s) * fps))."""
    if video.kind == "frames":
        return 0, len(video.data)
    if video.kind == "gif":
        return 0, int(getattr(Image.open(io.BytesIO(video.data[0])), "n_frames", 1))
    import av

    with av.open(io.BytesIO(video.data[0])) as container:
        stream = container.streams.video[0]
        if video.clip is not None:
            fps = float(stream.average_rate)
            start, end = (float(t) for t in video.clip)
            return int(start * fps), int((end - start) * fps)
        if stream.frames:
            return 0, int(stream.frames)
        return 0, sum(1 for p in container.demux(stream) if p.size)  # no count in the header: count packets


class Uniforms:
    """A stream of deterministic uniforms [0, 1) for one sample."""

    def __init__(self, *keys: int) -> None:
        # Imported here: sampling imports sources, which imports this module.
        from mllm.data.sampling import hash_uniform

        self.hash, self.keys, self.n = hash_uniform, keys, 0

    def __call__(self) -> float:
        self.n += 1
        return self.hash(*self.keys, self.n)


def frame_indices(num_frames: int, vlen: int, uniform) -> list[int]:
    """InternVL's `get_frame_indices(num_frames, vlen, sample="rand")` with `uniform()` as its randomness."""
    acc = min(num_frames, vlen)
    intervals = np.linspace(start=0, stop=vlen, num=acc + 1).astype(int)
    ranges = [(int(intervals[i]), int(intervals[i + 1]) - 1) for i in range(acc)]
    if all(hi > lo for lo, hi in ranges):  # random.choice(range(lo, hi)) for every interval
        indices = [lo + int(uniform() * (hi - lo)) for lo, hi in ranges]
    else:  # an empty range makes InternVL fall back to a sorted random subset
        order = np.argsort([uniform() for _ in range(vlen)], kind="stable")
        indices = sorted(int(i) for i in order[:acc])
    if len(indices) < num_frames:  # padded with the last frame
        indices = indices + [indices[-1]] * (num_frames - len(indices))
    return indices


def sample_frames(video: Video, vlen: int, min_frames: int, max_frames: int, uniform) -> list[int]:
    """The frames InternVL's reader for this kind returns, as indices (see the module docstring)."""
    drawn = min_frames + int(uniform() * (max_frames - min_frames + 1))  # np.random.randint(min, max + 1)
    if video.kind == "frames":
        return frame_indices(drawn, vlen, uniform) if vlen > drawn else list(range(vlen))
    indices = frame_indices(drawn, vlen, uniform)
    return sorted(set(indices)) if video.kind == "gif" else indices


def decode_frames(video: Video, indices: list[int]) -> list[Image.Image]:
    """The RGB frames at `indices` (repeats allowed), decoded once each."""
    wanted = set(indices)
    frames: dict[int, Image.Image] = {}
    if video.kind == "frames":
        frames = {i: Image.open(io.BytesIO(video.data[i])).convert("RGB") for i in wanted}
    elif video.kind == "gif":
        gif = Image.open(io.BytesIO(video.data[0]))
        for i in sorted(wanted):
            gif.seek(i)
            frames[i] = gif.convert("RGB")
    else:
        import av

        with av.open(io.BytesIO(video.data[0])) as container:
            for i, frame in enumerate(container.decode(video=0)):
                if i in wanted:
                    frames[i] = frame.to_image()
                if len(frames) == len(wanted):
                    break
    missing = wanted - frames.keys()
    if missing:
        raise ValueError(f"{video.name}: frames {sorted(missing)[:3]} not decodable ({len(frames)} decoded)")
    return [frames[i] for i in indices]


def video_tiles(video: Video, indices: list[int], tile_size: int, fast: bool) -> np.ndarray:
    """One tile per frame (the whole frame resized, as InternVL's transform does): uint8 [n, 3, T, T]."""
    return np.concatenate(
        [tiles_uint8(f, (1, 1), tile_size, False, fast) for f in decode_frames(video, indices)]
    )


def choose_frames(video: Video, min_frames: int, max_frames: int, seed: int, pos: int) -> list[int]:
    """This sample's frame indices; raises on an unreadable video."""
    first, vlen = frame_range(video)
    if vlen < 1:
        raise ValueError(f"{video.name}: no frames" + (f" in clip {video.clip}" if video.clip else ""))
    drawn = sample_frames(video, vlen, min_frames, max_frames, Uniforms(seed, pos, 0x766964))
    return [first + i for i in drawn]
