"""Pre-flight checks on every rank before any process group, model or data worker exists.

A run directory that cannot be written, an annotation file that is not there or a disk without room for a
checkpoint otherwise fails minutes later inside long tracebacks (or, worse, at the first save). Each check
raises ``PreflightError`` with one line naming the path and the fix. Rank 0 also removes the temporary
checkpoint directories a killed save left behind, so a restart never fails on the space they hold.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mllm.train.checkpoint import TMP_PREFIX
from mllm.train.config import RunConfig


class PreflightError(RuntimeError):
    """A run that cannot work on this machine; one line with the path and the fix."""


def checkpoint_root(run: RunConfig) -> Path:
    return Path(run.checkpoint.dir or Path(run.train.run_dir) / "checkpoints")


def check_writable(path: Path, key: str) -> None:
    """``path`` exists (created if needed) as a directory this process can write into."""
    for parent in [path, *path.parents]:
        if parent.exists() and not parent.is_dir():
            raise PreflightError(f"{key}={path}: {parent} is a file, not a directory; choose another {key}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test_{os.getpid()}"
        probe.write_text("ok\n")
        probe.unlink()
    except OSError as exc:
        raise PreflightError(
            f"{key}={path} is not writable ({exc.strerror}); fix its permissions or choose another {key}"
        ) from exc


def check_data_paths(run: RunConfig) -> None:
    """``data.path`` and, for a meta JSON, every dataset's annotation file and image root (local paths only:
    remote URLs are read by the data pipeline)."""
    path = run.data.path
    if "://" in path:
        return
    if not Path(path).exists():
        raise PreflightError(f"data.path={path}: no such file or directory; set it to a meta JSON or shards")
    if not path.endswith(".json"):
        return
    from mllm.data.sources import load_meta

    try:
        specs = load_meta(path)
    except ValueError as exc:
        raise PreflightError(str(exc)) from exc
    for spec in specs:
        for what, p in (("annotation", spec.annotation), ("root", spec.root)):
            if "://" not in p and not Path(p).exists():
                raise PreflightError(
                    f"data.path={path}: dataset {spec.name!r} {what} {p} does not exist; fix the meta JSON"
                )


def checkpoint_bytes(run: RunConfig) -> int:
    """Estimate of one checkpoint: fp32 weights of every parameter plus both fp32 AdamW moments of the trained
    ones (frozen parts, ``parallel.freeze_*``, have no optimizer state)."""
    from mllm.convert.core import expected_shapes

    p = run.parallel
    frozen = {"vision": p.freeze_vision, "projector": p.freeze_projector, "llm": p.freeze_llm}
    frozen["lm_head"] = p.freeze_llm
    total = 0
    for name, shape in expected_shapes(run.model).items():
        numel = 1
        for d in shape:
            numel *= d
        total += numel * (4 if frozen.get(name.split(".")[0], False) else 12)
    return total


def check_free_space(root: Path, needed: int) -> None:
    """Room for one more checkpoint: retention deletes the oldest only after the new one is committed."""
    free = shutil.disk_usage(root).free
    if free < needed:
        raise PreflightError(
            f"checkpoint directory {root} has {free / 2**30:.2f} GiB free but a checkpoint needs about "
            f"{needed / 2**30:.2f} GiB; free space, lower checkpoint.keep_last or set checkpoint.dir elsewhere"
        )


def remove_leftover_tmp(root: Path) -> list[str]:
    """Rank 0: temporary checkpoint directories of a save that never committed (killed, disk full)."""
    removed = []
    for stale in sorted(root.glob(TMP_PREFIX + "*")) if root.is_dir() else ():
        shutil.rmtree(stale, ignore_errors=True)
        removed.append(stale.name)
    return removed


def preflight(run: RunConfig, need_data: bool = True) -> None:
    """Every check, in the order a user would fix them."""
    run_dir = Path(run.train.run_dir)
    check_writable(run_dir, "train.run_dir")
    root = checkpoint_root(run)
    check_writable(root, "checkpoint.dir" if run.checkpoint.dir else "train.run_dir")
    if need_data:
        check_data_paths(run)
    if int(os.environ.get("RANK", "0")) == 0:
        remove_leftover_tmp(root)
    check_free_space(root, checkpoint_bytes(run))
