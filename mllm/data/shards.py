"""`prepare`: InternVL meta JSON -> webdataset tar shards (JSON record + image bytes) with an index.

Layout: OUT/index.json and OUT/<dataset>/<dataset>-000000.tar ... Each sample is `<key>.json` (the annotation
record) plus `<key>.img<i>.<ext>` per image. Images are copied byte for byte (no re-encoding). A record whose
image file is missing is still written, so the training run counts and reports it (reason missing_image).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from mllm.data.sources import INDEX_FORMAT, INDEX_NAME, image_names, load_meta, parse_line

log = logging.getLogger("mllm.data")


def prepare(
    meta_path: str | os.PathLike, out_dir: str | os.PathLike, shard_size: int = 1000, progress: bool = True
) -> dict:
    """Write shards of at most `shard_size` samples per dataset and OUT/index.json; returns the index."""
    if shard_size < 1:
        raise ValueError(f"shard_size={shard_size}: use a positive number of samples per shard")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    index: dict = {"format": INDEX_FORMAT, "source": str(Path(meta_path).resolve()), "datasets": {}}
    for spec in load_meta(meta_path):
        try:
            with open(spec.annotation, encoding="utf-8") as f:
                raw_lines = f.read().splitlines()
        except OSError as e:
            raise ValueError(
                f"dataset {spec.name!r}: cannot read annotation {spec.annotation} ({e}); fix the meta JSON"
            ) from e
        # (0-based annotation line, text): sample keys are line numbers, so ids match the meta JSON's.
        lines = [(i, ln) for i, ln in enumerate(raw_lines) if ln.strip()]
        (out / spec.name).mkdir(exist_ok=True)
        shards, missing = [], 0
        bar = tqdm(total=len(lines), desc=f"prepare {spec.name}", unit="sample", disable=not progress)
        for start in range(0, len(lines), shard_size):
            rel = f"{spec.name}/{spec.name}-{start // shard_size:06d}.tar"
            chunk = lines[start : start + shard_size]
            missing += _write_shard(out / rel, spec.root, chunk)
            shards.append(
                {
                    "path": rel,
                    "count": len(chunk),
                    "bytes": (out / rel).stat().st_size,
                    "first_line": chunk[0][0],
                    "last_line": chunk[-1][0],
                }
            )
            bar.update(len(chunk))
        bar.close()
        if missing:
            log.warning(
                "dataset %s: %d image files missing; those samples will be rejected in training",
                spec.name,
                missing,
            )
        index["datasets"][spec.name] = {
            "repeat_time": spec.repeat_time,
            "data_augment": spec.data_augment,
            "max_dynamic_patch": spec.max_dynamic_patch,
            "length": len(lines),
            "lines": len(raw_lines),  # annotation lines, blank ones included (repeat_time < 1 cuts these)
            "missing_images": missing,
            "shards": shards,
        }
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1, ensure_ascii=False))
    return index


def _write_shard(path: Path, root: str, lines: list[tuple[int, str]]) -> int:
    """One tar shard of (line number, text); returns the number of missing image files."""
    missing = 0
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for line_no, line in lines:
            sample = {"__key__": f"{line_no:09d}", "json": line.encode("utf-8")}
            record, _ = parse_line(line)
            for j, name in enumerate(image_names(record) if record else []):
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        sample[f"img{j}{os.path.splitext(name)[1].lower()}"] = f.read()
                except OSError:
                    missing += 1
            writer.write(sample)
    return missing
