"""Datasets as lists of units (shards) of samples: InternVL meta JSON read directly, or prepared tar shards.

A unit is a webdataset tar shard, or (for a meta JSON read directly) a chunk of annotation lines. Units are
what dp ranks split; `read_unit` streams one unit's samples in order.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import webdataset as wds

from mllm.data import storage
from mllm.data.video import Video

log = logging.getLogger("mllm.data")

JSONL_UNIT = 1024  # annotation lines per unit when a meta JSON is read directly
INDEX_NAME = "index.json"
INDEX_FORMAT = "mllm-wds-v1"


@dataclass
class RawSample:
    dataset: str
    key: str
    record: dict | None = None  # the annotation record (conversations, image names)
    images: list[bytes | None] = field(default_factory=list)  # encoded bytes, None if missing
    image_errors: list[str] = field(default_factory=list)
    error: tuple[str, str] | None = None  # (reason, detail) when the whole sample is unusable
    video: Video | None = None
    video_error: str = ""


@dataclass
class DatasetSpec:
    """One entry of InternVL's meta JSON."""

    name: str
    root: str
    annotation: str
    repeat_time: float = 1.0
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    length: int | None = None


def resolve(value: str, meta_path: str) -> tuple[str | None, list[str]]:
    """A meta entry's `root`/`annotation` -> (the first existing candidate or None, every candidate looked at).

    URLs and absolute paths are used as they are. A relative path is looked up in the working directory first
    (InternVL's rule: its metas are written for the folder training starts in), then in the meta file's folder.
    """
    if storage.is_url(value) or os.path.isabs(value):
        return value, [value]
    candidates = [os.path.abspath(value), storage.join(storage.parent(str(meta_path)), value)]
    candidates = list(dict.fromkeys(candidates))
    return next((c for c in candidates if storage.exists(c)), None), candidates


# Keys of a meta JSON entry we read; InternVL's own training ignores `length` too.
KNOWN_KEYS = {"root", "annotation", "repeat_time", "data_augment", "max_dynamic_patch", "length"}


def repeat_parts(repeat: float, where: str) -> tuple[float, int]:
    """InternVL's repeat_time: (fraction of lines kept, repeats). r < 1 keeps the first int(n * r) lines, an integer
    r >= 1 repeats them r times; a fractional r > 1 is an error, as in InternVL (`assert isinstance(r, int)`)."""
    if repeat <= 0:
        raise ValueError(f"{where} repeat_time={repeat}; use a positive number")
    if repeat < 1:
        return repeat, 1
    if repeat != int(repeat):
        raise ValueError(
            f"{where} repeat_time={repeat}: above 1 it must be a whole number (InternVL repeats the list); "
            "use an integer, or a value below 1 for a subset"
        )
    return 1.0, int(repeat)


def subset_size(num_lines: int, fraction: float) -> int:
    """InternVL's `raw_data[:int(len(raw_data) * repeat_time)]` for repeat_time < 1."""
    return num_lines if fraction >= 1 else int(num_lines * fraction)


def load_meta(path: str | os.PathLike) -> list[DatasetSpec]:
    """Read InternVL's meta JSON (a local path or a URL); relative paths as `resolve` says."""
    path = str(path)
    try:
        meta = json.loads(storage.read_text(path))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read meta JSON ({e}); give a valid InternVL meta file") from e
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{path}: meta JSON must be a non-empty object {{name: {{root, annotation, ...}}}}")
    specs = []
    for name, entry in meta.items():
        for key in ("root", "annotation"):
            if not isinstance(entry, dict) or key not in entry:
                raise ValueError(f"{path}: dataset {name!r} has no {key!r}; add it (InternVL meta format)")
        unknown = sorted(set(entry) - KNOWN_KEYS)
        if unknown:
            log.warning(
                "%s: dataset %r: unknown keys %s are ignored (known: %s)",
                path,
                name,
                unknown,
                sorted(KNOWN_KEYS),
            )
        repeat = float(entry.get("repeat_time", 1.0))
        repeat_parts(repeat, f"{path}: dataset {name!r}")
        mdp = entry.get("max_dynamic_patch")
        annotation, looked = resolve(entry["annotation"], path)
        if annotation is None:
            raise ValueError(
                f"{path}: dataset {name!r}: annotation {entry['annotation']!r} not found; looked at "
                f"{' and '.join(looked)} (relative paths: working directory first, as InternVL, then the meta "
                "file's folder)"
            )
        root, looked = resolve(entry["root"], path)
        specs.append(
            DatasetSpec(
                name=name,
                root=root if root is not None else looked[0],
                annotation=annotation,
                repeat_time=repeat,
                data_augment=bool(entry.get("data_augment", False)),
                max_dynamic_patch=int(mdp) if mdp is not None else None,
                length=entry.get("length"),
            )
        )
    return specs


def image_names(record: dict) -> list[str]:
    """The record's image paths: `image` may be a string, a list, or absent/empty (text-only, as InternVL)."""
    image = record.get("image")
    if isinstance(image, str):
        return [image] if image else []
    return [str(i) for i in image] if isinstance(image, list) else []


def media_kind(record: dict) -> str | None:
    """How the record carries pixels, in InternVL's __getitem__ order: "image" (one, as a string), "images" (a
    list), "video", None (text), or "invalid" (an `image`/`video` value of another type, rejected)."""
    image, video = record.get("image"), record.get("video")
    if image:
        return "image" if isinstance(image, str) else "images" if isinstance(image, list) else "invalid"
    if video:
        return "video" if isinstance(video, str) else "invalid"
    return None


def load_video(sample: RawSample, root: str, record: dict) -> None:
    name = str(record["video"])
    try:
        sample.video = Video.from_path(name, storage.join(root, name), video_clip(record))
    except Exception as e:  # noqa: BLE001 - missing file, permission, remote error: the sample is rejected
        sample.video_error = f"{name}: {getattr(e, 'strerror', None) or e}"


def video_clip(record: dict) -> tuple[float, float] | None:
    clip = record.get("clip")
    return (float(clip[0]), float(clip[1])) if clip else None


def parse_line(line: str) -> tuple[dict | None, tuple[str, str] | None]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return None, ("bad_annotation", f"invalid JSON ({e.msg})")
    if not isinstance(record, dict):
        return None, ("bad_annotation", "record is not an object")
    return record, None


class Source:
    """A dataset: names, per-unit sample counts, mixing weight, and unit reading."""

    name: str
    unit_counts: list[int]  # samples per unit, after the repeat_time < 1 subset
    repeat_time: float
    max_dynamic_patch: int | None
    data_augment: bool = False  # InternVL's random JPEG degradation of training tiles (augment.py)

    @property
    def length(self) -> int:
        return sum(self.unit_counts)

    @property
    def repeats(self) -> int:
        """Passes over the (subset) lines per epoch of the concatenation (sampling.py)."""
        return repeat_parts(self.repeat_time, f"dataset {self.name!r}")[1]

    def read_unit(self, unit: int) -> Iterator[tuple[int, RawSample]]:
        raise NotImplementedError


class JsonlSource(Source):
    """A meta JSON entry read directly: annotation lines in memory, images from files under root."""

    def __init__(self, spec: DatasetSpec) -> None:
        self.spec = spec
        self.name = spec.name
        self.repeat_time = spec.repeat_time
        self.max_dynamic_patch = spec.max_dynamic_patch
        self.data_augment = spec.data_augment
        try:
            lines = storage.read_text(spec.annotation).splitlines()
        except OSError as e:
            raise ValueError(f"dataset {spec.name!r}: cannot read annotation {spec.annotation} ({e})") from e
        lines = lines[: subset_size(len(lines), repeat_parts(spec.repeat_time, spec.name)[0])]
        # (0-based line number in the annotation file, text): blank lines are skipped, numbers are kept.
        self.lines = [(i, ln) for i, ln in enumerate(lines) if ln.strip()]
        n = len(self.lines)
        self.unit_counts = [min(JSONL_UNIT, n - i) for i in range(0, n, JSONL_UNIT)]

    def read_unit(self, unit: int) -> Iterator[tuple[int, RawSample]]:
        base = unit * JSONL_UNIT
        for idx in range(self.unit_counts[unit]):
            line_no, text = self.lines[base + idx]
            key = sample_key(self.name, line_no)
            record, error = parse_line(text)
            sample = RawSample(self.name, key, record, error=error)
            if record is not None:
                self._load_images(sample, record)
            yield idx, sample

    def _load_images(self, sample: RawSample, record: dict) -> None:
        if media_kind(record) == "video":
            load_video(sample, self.spec.root, record)
            return
        for name in image_names(record):
            try:
                sample.images.append(storage.read_bytes(storage.join(self.spec.root, name)))
                sample.image_errors.append("")
            except Exception as e:  # noqa: BLE001 - missing file, permission, remote error: rejected later
                sample.images.append(None)
                sample.image_errors.append(f"{name}: {getattr(e, 'strerror', None) or e}")


def sample_key(dataset: str, line: int) -> str:
    """A sample's id in logs, metrics and samples.jsonl: `<dataset>:<0-based line of its annotation file>`."""
    return f"{dataset}:{line}"


def _raise(exc: Exception) -> bool:
    raise exc


class ShardSource(Source):
    """A dataset prepared as webdataset tar shards (see shards.prepare); streamed with webdataset."""

    def __init__(self, root: str, name: str, entry: dict) -> None:
        self.root = root
        self.name = name
        self.repeat_time = float(entry.get("repeat_time", 1.0))
        self.max_dynamic_patch = entry.get("max_dynamic_patch")
        self.data_augment = bool(entry.get("data_augment", False))
        self.shards = [s["path"] for s in entry["shards"]]
        self.unit_counts = [int(s["count"]) for s in entry["shards"]]
        fraction = repeat_parts(self.repeat_time, f"{storage.join(root, INDEX_NAME)}: dataset {name!r}")[0]
        if fraction < 1:
            if "lines" not in entry:
                raise ValueError(
                    f"{storage.join(root, INDEX_NAME)}: shards predate repeat_time < 1 support; re-run prepare"
                )
            self._keep_first_lines(entry["shards"], subset_size(int(entry["lines"]), fraction))

    def _keep_first_lines(self, shards: list[dict], cut: int) -> None:
        """repeat_time < 1: only samples of annotation lines < cut (shards hold lines in order); only the shard
        the cut falls in is read, for its keys."""
        kept = []
        for unit, shard in enumerate(shards):
            if shard["first_line"] >= cut:
                break
            if shard["last_line"] < cut:
                kept.append(self.unit_counts[unit])
                continue
            kept.append(sum(1 for _, s in self.read_unit(unit) if int(s.key.rsplit(":", 1)[1]) < cut))
            break
        self.unit_counts = kept

    def read_unit(self, unit: int) -> Iterator[tuple[int, RawSample]]:
        path = storage.join(self.root, self.shards[unit])
        try:
            with storage.open_binary(path) as f:
                files = wds.tariterators.tar_file_expander([{"url": path, "stream": f}], handler=_raise)
                samples = wds.tariterators.group_by_keys(files, handler=_raise)
                for idx, item in zip(range(self.unit_counts[unit]), samples):
                    yield idx, self._to_sample(item)
        except Exception as e:  # noqa: BLE001 - any failure of a shard is counted, never fatal
            log.warning("shard %s unreadable after some samples: %s", path, e)

    def _to_sample(self, item: dict[str, Any]) -> RawSample:
        key = sample_key(self.name, int(item["__key__"]))
        record, error = parse_line(item.get("json", b"").decode("utf-8", "replace"))
        sample = RawSample(self.name, key, record, error=error)
        if record is not None and media_kind(record) == "video":
            frames = sorted(k for k in item if k.startswith("vfr"))
            data = [item[k] for k in frames] or [v for k, v in item.items() if k.startswith("video.")]
            name = str(record["video"])
            kind = "frames" if frames else "gif" if name.lower().endswith(".gif") else "container"
            sample.video = Video(name, kind, data, video_clip(record)) if data else None
            sample.video_error = "" if data else f"{name}: not in shard"
        elif record is not None:
            for i, name in enumerate(image_names(record)):
                data = item.get(f"img{i}{os.path.splitext(name)[1].lower()}")
                sample.images.append(data)
                sample.image_errors.append("" if data is not None else f"{name}: not in shard")
        return sample


def open_sources(path: str | os.PathLike) -> list[Source]:
    """Open a meta JSON (read directly) or a prepared shard directory (index.json); local or URL."""
    path = str(path)
    if storage.is_dir(path):
        index_path = storage.join(path, INDEX_NAME)
        if not storage.exists(index_path):
            raise ValueError(f"{path}: no {INDEX_NAME}; run `python -m mllm.data prepare META.json {path}`")
        index = json.loads(storage.read_text(index_path))
        if index.get("format") != INDEX_FORMAT:
            raise ValueError(
                f"{index_path}: format {index.get('format')!r} != {INDEX_FORMAT}; re-run prepare"
            )
        sources: list[Source] = [ShardSource(path, n, e) for n, e in index["datasets"].items()]
    else:
        sources = [JsonlSource(spec) for spec in load_meta(path)]
    for s in sources:
        if s.length == 0:
            log.warning("dataset %s has no samples; it is left out", s.name)
    sources = [s for s in sources if s.length > 0]
    if not sources:
        raise ValueError(f"{path}: no samples in any dataset; check the annotation files")
    return sources
