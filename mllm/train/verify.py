"""Verified checkpoints: every file's size and CRC-32 recorded at commit, checked by ``resume=auto``.

At commit each rank of the saving group checksums a slice of the checkpoint's files (so the cost is divided
over the ranks, as the writing was); rank 0 records ``{relative path: [bytes, crc32]}`` under ``files`` in
``meta.json``. On resume every rank checks its slice of the newest checkpoint, one all-reduce tells all ranks
whether some file is missing, truncated or changed, and they fall back together to the newest good one (one
warning line names what was wrong). A missing per-rank file under ``extra/`` is not damage: that rank's RNG
and data state is re-seeded (``Trainer.resume`` warns), everything else is still exact.
"""

from __future__ import annotations

import sys
import zlib
from pathlib import Path

import torch.distributed as dist

EXTRA_DIR = "extra"
_CHUNK = 1 << 22


def file_record(path: Path) -> list[int]:
    """[size in bytes, CRC-32 of the content]."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return [path.stat().st_size, crc]


def _group_rank_world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def record_files(directory: Path, exclude: set[str], group: dist.ProcessGroup | None) -> dict[str, list[int]]:
    """Records of every file under ``directory`` (relative paths), computed by slices over ``group``; every
    rank calls it after all files are written and gets the whole dict."""
    names = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())
    names = [n for n in names if n not in exclude]
    rank, world = _group_rank_world(group)
    mine = {n: file_record(directory / n) for n in names[rank::world]}
    if world == 1:
        return mine
    parts: list = [None] * world
    dist.all_gather_object(parts, mine, group=group)
    return {k: v for part in parts for k, v in part.items()}


def damage(path: Path, files: dict[str, list[int]], rank: int, world: int) -> str | None:
    """The first problem in this rank's slice of ``files`` (missing, size or checksum mismatch), or None."""
    for name in sorted(files)[rank::world]:
        f = path / name
        if not f.is_file():
            if name.startswith(EXTRA_DIR + "/"):
                continue  # re-seeded on resume, with a warning
            return f"{name} is missing"
        size, crc = files[name]
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written"
        if file_record(f)[1] != crc:
            return f"{name} does not match the checksum recorded at commit"
    return None


def agreed_damage(
    path: Path, files: dict[str, list[int]] | None, group: dist.ProcessGroup | None
) -> str | None:
    """Checked by every rank of ``group`` together; all ranks get the same answer (a problem, or None)."""
    if not files:  # saved before checksums were recorded: nothing to check against
        return None
    rank, world = _group_rank_world(group)
    problem = damage(path, files, rank, world)
    if world == 1:
        return problem
    found: list = [None] * world
    dist.all_gather_object(found, problem, group=group)
    return next((p for p in found if p is not None), None)


def newest_good(candidates: list[Path], read_files, group: dist.ProcessGroup | None) -> Path | None:
    """The newest of ``candidates`` (oldest first) without damage; rank 0 prints one warning line when it
    skips any. ``read_files(path)`` gives a checkpoint's recorded files."""
    skipped: list[str] = []
    chosen = None
    for path in reversed(candidates):
        problem = agreed_damage(path, read_files(path), group)
        if problem is None:
            chosen = path
            break
        skipped.append(f"{path.name} ({problem})")
    rank, _ = _group_rank_world(group)
    if skipped and rank == 0:
        target = chosen.name if chosen is not None else "the start (no intact checkpoint)"
        print(f"warning: damaged checkpoint(s) {'; '.join(skipped)}: resuming from {target}", file=sys.stderr)
    return chosen
