"""`prepare`: InternVL meta JSON -> webdataset tar shards (JSON record + image bytes) with an index.

Layout: OUT/index.json and OUT/<dataset>/<dataset>-000000.tar ... Each sample is `<key>.json` (the annotation
record) plus `<key>.img<i>.<ext>` per image, `<key>.video.<ext>` for a video file or `<key>.vfr<k>.jpg` per frame
of a frame folder. Files are copied byte for byte (no re-encoding). A record whose file is missing is still
written, so the training run counts and reports it (missing_image / missing_video). OUT may be a URL (s3://).
"""

from __future__ import annotations

import json
import logging
import os

import webdataset as wds
from tqdm import tqdm

from mllm.data import storage
from mllm.data.sources import INDEX_FORMAT, INDEX_NAME, image_names, load_meta, media_kind, parse_line
from mllm.data.video import Video

log = logging.getLogger("mllm.data")


def prepare(
    meta_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    shard_size: int = 1000,
    progress: bool = True,
    check: bool = False,
) -> dict:
    """Write shards of at most `shard_size` samples per dataset and OUT/index.json; returns the index.

    `meta_path` and `out_dir` may be URLs (s3://...). `check=True` also decodes every image and video once and
    records what could not be read in the index (`unreadable`: count and up to 20 examples per dataset).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: use a positive number of samples per shard")
    out = str(out_dir)
    storage.makedirs(out)
    source = str(meta_path) if storage.is_url(str(meta_path)) else os.path.abspath(meta_path)
    index: dict = {"format": INDEX_FORMAT, "source": source, "datasets": {}}
    for spec in load_meta(meta_path):
        try:
            raw_lines = storage.read_text(spec.annotation).splitlines()
        except OSError as e:
            raise ValueError(
                f"dataset {spec.name!r}: cannot read annotation {spec.annotation} ({e}); fix the meta JSON"
            ) from e
        # (0-based annotation line, text): sample keys are line numbers, so ids match the meta JSON's.
        lines = [(i, ln) for i, ln in enumerate(raw_lines) if ln.strip()]
        storage.makedirs(storage.join(out, spec.name))
        shards, report = [], _Report(check)
        bar = tqdm(total=len(lines), desc=f"prepare {spec.name}", unit="sample", disable=not progress)
        for start in range(0, len(lines), shard_size):
            rel = f"{spec.name}/{spec.name}-{start // shard_size:06d}.tar"
            chunk = lines[start : start + shard_size]
            _write_shard(storage.join(out, rel), spec.root, chunk, report)
            shards.append(
                {
                    "path": rel,
                    "count": len(chunk),
                    "bytes": storage.size(storage.join(out, rel)),
                    "first_line": chunk[0][0],
                    "last_line": chunk[-1][0],
                }
            )
            bar.update(len(chunk))
        bar.close()
        if report.missing:
            log.warning(
                "dataset %s: %d image/video files missing; those samples will be rejected in training",
                spec.name,
                report.missing,
            )
        index["datasets"][spec.name] = {
            "repeat_time": spec.repeat_time,
            "data_augment": spec.data_augment,
            "max_dynamic_patch": spec.max_dynamic_patch,
            "length": len(lines),
            "lines": len(raw_lines),  # annotation lines, blank ones included (repeat_time < 1 cuts these)
            "missing_images": report.missing,
            "shards": shards,
        }
        if check:
            index["datasets"][spec.name]["unreadable"] = {"count": report.bad, "examples": report.examples}
    with storage.open_binary(storage.join(out, INDEX_NAME), "wb") as f:
        f.write(json.dumps(index, indent=1, ensure_ascii=False).encode("utf-8"))
    return index


class _Report:
    """Missing files, and (with check) files that do not decode."""

    def __init__(self, check: bool) -> None:
        self.check, self.missing, self.bad, self.examples = check, 0, 0, []

    def unreadable(self, line: int, name: str, error: Exception) -> None:
        self.bad += 1
        if len(self.examples) < 20:
            self.examples.append(f"line {line + 1}: {name}: {type(error).__name__}: {error}")

    def check_image(self, line: int, name: str, data: bytes) -> None:
        if self.check:
            from mllm.data.tiling import open_image

            try:
                open_image(data).convert("RGB")
            except Exception as e:  # noqa: BLE001 - whatever PIL raises, the image is unusable
                self.unreadable(line, name, e)

    def check_video(self, line: int, video: Video) -> None:
        if self.check:
            from mllm.data.video import decode_frames, frame_count

            try:
                decode_frames(video, list(range(frame_count(video))))
            except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the video is unusable
                self.unreadable(line, video.name, e)


def _write_shard(path: str, root: str, lines: list[tuple[int, str]], report: _Report) -> None:
    """One tar shard of (line number, text): each record with its image bytes, video file or video frames."""
    with storage.open_binary(path, "wb") as f, wds.TarWriter(f, encoder=False, mtime=0) as writer:
        for line_no, line in lines:
            sample = {"__key__": f"{line_no:09d}", "json": line.encode("utf-8")}
            record, _ = parse_line(line)
            kind = media_kind(record) if record else None
            if kind == "video":
                _add_video(sample, root, str(record["video"]), line_no, report)
            for j, name in enumerate(image_names(record) if kind in ("image", "images") else []):
                try:
                    data = storage.read_bytes(storage.join(root, name))
                except Exception:  # noqa: BLE001 - missing or unreachable: counted, rejected in training
                    report.missing += 1
                    continue
                sample[f"img{j}{os.path.splitext(name)[1].lower()}"] = data
                report.check_image(line_no, name, data)
            writer.write(sample)


def _add_video(sample: dict, root: str, name: str, line: int, report: _Report) -> None:
    try:
        video = Video.from_path(name, storage.join(root, name))
    except Exception:  # noqa: BLE001 - missing or unreachable: counted, rejected in training
        report.missing += 1
        return
    if video.kind == "frames":
        for k, data in enumerate(video.data):
            sample[f"vfr{k:05d}.jpg"] = data
    else:
        sample[f"video{os.path.splitext(name)[1].lower() or '.mp4'}"] = video.data[0]
    report.check_video(line, video)
