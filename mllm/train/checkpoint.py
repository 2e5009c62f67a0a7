"""Sharded, atomic checkpoints with ``torch.distributed.checkpoint`` (DCP) and keep-last-k retention.

Layout of a checkpoint root (``RUN_DIR/checkpoints``)::

    step_00000050/          a complete checkpoint (only complete ones carry this name)
      .metadata, *.distcp   DCP: model + optimizer tensors, each rank's shards placed in the single-device
                            tensors (``mllm.train.state``), resharded on load into any tp/pp/dp layout
      extra/rank_00003.pt   per-rank Python state: RNG states, data-loader state
      model_config.json     the ModelConfig (``mllm.checkpoint_io`` native config): export needs only this dir
      config.yaml           the resolved run config
      meta.json             step, layout, time; written last
    .tmp_step_00000060/     being written (or left by a crash): never chosen by resume=auto

Atomicity: every rank writes into the ``.tmp_`` directory, all ranks meet at a barrier, then rank 0 writes
``meta.json`` and renames the directory (an atomic ``rename`` on POSIX filesystems). A crash at any point before
the rename leaves only a ``.tmp_`` directory, which ``latest()`` ignores and the next save removes. Deletion
(retention, a re-save of the same step) renames a checkpoint to ``.tmp_discard_*`` before removing it, so a
crash never leaves a partly deleted directory under a ``step_`` name.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from mllm.train.planners import ChunkLoadPlanner, ChunkSavePlanner
from mllm.train.state import Chunk
from mllm.train.verify import agreed_damage, newest_good, record_files

STEP_PREFIX = "step_"
TMP_PREFIX = ".tmp_"
META_FILE = "meta.json"


def step_dir_name(step: int) -> str:
    return f"{STEP_PREFIX}{step:08d}"


def is_complete(path: Path) -> bool:
    return (
        path.name.startswith(STEP_PREFIX) and (path / META_FILE).is_file() and (path / ".metadata").is_file()
    )


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and is_complete(p)]
    return sorted(found, key=lambda p: int(p.name[len(STEP_PREFIX) :]))


def latest_checkpoint(root: Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_resume(resume: str, root: Path, group: dist.ProcessGroup | None = None) -> Path | None:
    """``none`` -> None; ``auto`` -> the newest complete checkpoint whose files match the sizes and checksums
    recorded at commit (None on a fresh run; ``mllm.train.verify``); else that path, verified. Every rank of
    ``group`` calls it together."""
    if resume in ("none", "", None):
        return None
    if resume == "auto":
        return newest_good(list_checkpoints(root), recorded_files, group)
    path = Path(resume)
    if not is_complete(path):
        raise FileNotFoundError(
            f"checkpoint.resume={resume}: not a complete checkpoint (no {META_FILE}/.metadata); "
            f"pass a {STEP_PREFIX}* directory, 'auto' or 'none'"
        )
    problem = agreed_damage(path, recorded_files(path), group)
    if problem is not None:
        raise CheckpointDamagedError(
            f"checkpoint.resume={resume} is damaged: {problem}; pass an older {STEP_PREFIX}* directory or 'auto'"
        )
    return path


def recorded_files(path: Path) -> dict[str, list[int]] | None:
    return read_meta(path).get("files")


class CheckpointDamagedError(RuntimeError):
    """An explicitly named checkpoint does not match what was written."""


class CheckpointWriteError(RuntimeError):
    """A save failed (e.g. a full disk); the previous checkpoints are untouched. One line: what and the fix."""


def read_meta(path: Path) -> dict:
    return json.loads((path / META_FILE).read_text())


# -- RNG state ------------------------------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# -- a test hook for a real kill during a save -------------------------------------------------------------------
PAUSE_BEFORE_COMMIT_ENV = "MLLM_CKPT_PAUSE_BEFORE_COMMIT"
PAUSE_MARKER_PREFIX = "paused_before_commit_"


def pause_before_commit_from_env(
    marker_dir: Path, rank: int, max_pause_s: float = 300.0
) -> Callable[[int], None] | None:
    """``MLLM_CKPT_PAUSE_BEFORE_COMMIT=STEP``: rank 0 stops before committing step STEP's checkpoint (every
    rank's shards are written, nothing is renamed) so that a test can ``kill -9`` a rank deterministically
    inside a save. It pauses once per run: it writes ``marker_dir/paused_before_commit_STEP`` first, and a
    restarted run that finds the marker saves normally. None when the variable is unset."""
    value = os.environ.get(PAUSE_BEFORE_COMMIT_ENV)
    if not value or rank != 0:
        return None
    pause_step = int(value)
    marker = marker_dir / f"{PAUSE_MARKER_PREFIX}{pause_step:08d}"

    def pause(step: int) -> None:
        if step != pause_step or marker.exists():
            return
        marker.write_text(f"{os.getpid()}\n")
        deadline = time.monotonic() + max_pause_s
        while time.monotonic() < deadline:  # killed here by the test; continues if nobody does
            time.sleep(0.1)

    return pause


# -- the manager ----------------------------------------------------------------------------------------------
class CheckpointManager:
    """Saves/loads checkpoints under ``root``; every rank of ``group`` calls ``save``/``load`` together."""

    def __init__(
        self,
        root: str | Path,
        keep_last: int = 3,
        group: dist.ProcessGroup | None = None,
        async_save: bool = False,
    ) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.group = group
        self.async_save = async_save
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self._pending: tuple[Any, Path, Path, dict] | None = None  # (future, tmp dir, final dir, meta)
        # Test hook: called after the shards are written and before the commit (crash-during-save tests).
        self.before_commit: Callable[[int], None] | None = None

    # -- save ---------------------------------------------------------------------------------------------
    def save(
        self,
        step: int,
        tensors: dict[str, Any],
        extra: dict[str, Any],
        meta: dict[str, Any],
        chunks: dict[str, Chunk] | None = None,
        files: dict[str, str] | None = None,
    ) -> Path:
        """Write ``tensors`` (DCP; ``chunks`` places local shards in their full tensors, see
        ``mllm.train.planners``), this rank's ``extra`` and rank 0's text ``files`` (name -> content) for
        ``step``; commit when complete."""
        self.finalize()  # at most one save in flight
        final = self.root / step_dir_name(step)
        tmp = self.root / (TMP_PREFIX + final.name)
        error = None
        if self.rank == 0:
            try:
                self._remove_stale_tmp()
                tmp.mkdir(parents=True, exist_ok=True)
                (tmp / "extra").mkdir(exist_ok=True)
                for name, text in (files or {}).items():
                    _write_text_durably(tmp / name, text)
            except OSError as exc:
                error = exc
        self._raise_if_any(error, step, tmp)
        try:
            torch.save(extra, tmp / "extra" / f"rank_{self.rank:05d}.pt")
        except OSError as exc:
            error = exc
        self._raise_if_any(error, step, tmp)
        meta = {**meta, "step": step, "time": time.time()}
        planner = ChunkSavePlanner(chunks or {})
        try:  # DCP gathers every rank's write errors and raises on all of them
            if self.async_save:
                future = dcp.async_save(
                    tensors, checkpoint_id=str(tmp), process_group=self.group, planner=planner
                )
                self._pending = (future, tmp, final, meta)
                return final
            dcp.save(tensors, checkpoint_id=str(tmp), process_group=self.group, planner=planner)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - a BaseException wrapping OSErrors
            self._raise_if_any(exc, step, tmp, gathered=True)
        self._commit(tmp, final, meta)
        return final

    def save_in_flight(self) -> bool:
        """An asynchronous save is still being written by this rank."""
        return self._pending is not None and not self._pending[0].done()

    def finalize(self) -> None:
        """Wait for an asynchronous save and commit it (all ranks call this)."""
        if self._pending is None:
            return
        future, tmp, final, meta = self._pending
        self._pending = None
        try:
            future.result()
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - see save
            self._raise_if_any(exc, meta["step"], tmp, gathered=True)
        self._commit(tmp, final, meta)

    def _commit(self, tmp: Path, final: Path, meta: dict) -> None:
        self._barrier()  # every rank's shards and extras are on disk
        meta = {**meta, "files": record_files(tmp, {META_FILE}, self.group)}
        if self.before_commit is not None:
            self.before_commit(meta["step"])
        error = None
        if self.rank == 0:
            try:
                _write_json_durably(tmp / META_FILE, meta)
                if final.exists():  # a re-save of the same step (e.g. after a resume): replace it
                    self._discard(final)
                os.rename(tmp, final)
                _fsync_dir(self.root)
                self._apply_retention()
            except OSError as exc:
                error = exc
        self._raise_if_any(error, meta["step"], tmp)  # also the barrier that ends the save

    def _raise_if_any(
        self, error: BaseException | None, step: int, tmp: Path, gathered: bool = False
    ) -> None:
        """Collective: if any rank failed (``gathered``: every rank already has the error), rank 0 removes the
        partial ``tmp`` and every rank raises the same one-line ``CheckpointWriteError``; the previous
        checkpoints are untouched."""
        mine = _one_line(error, self.root) if error is not None else None
        errors = [mine]
        if not gathered and dist.is_initialized() and dist.get_world_size(self.group) > 1:
            errors = [None] * dist.get_world_size(self.group)
            dist.all_gather_object(errors, mine, self.group)
        first = next((e for e in errors if e is not None), None)
        if first is None:
            return
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(self.root)
        kept = f"{previous.name} is intact" if previous else "no earlier checkpoint exists"
        raise CheckpointWriteError(
            f"checkpoint step {step} could not be written under {self.root}: {first}; {kept}. Free space or fix "
            "the directory, then rerun with checkpoint.resume=auto"
        )

    def _apply_retention(self) -> None:
        if self.keep_last <= 0:
            return
        for old in list_checkpoints(self.root)[: -self.keep_last]:
            self._discard(old)

    def _discard(self, path: Path) -> None:
        """Delete a complete checkpoint without ever leaving it half-deleted under its ``step_`` name (a kill
        inside ``rmtree`` could leave meta.json and .metadata but not every shard: resume=auto would pick a
        broken checkpoint). The rename is atomic; a leftover ``.tmp_`` directory is cleaned by the next save."""
        trash = self.root / f"{TMP_PREFIX}discard_{path.name}"
        shutil.rmtree(trash, ignore_errors=True)
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale_tmp(self) -> None:
        for stale in self.root.glob(TMP_PREFIX + "*"):
            shutil.rmtree(stale, ignore_errors=True)

    # -- load ---------------------------------------------------------------------------------------------
    def load(
        self, path: Path, tensors: dict[str, Any], chunks: dict[str, Chunk] | None = None
    ) -> tuple[dict[str, Any] | None, dict]:
        """Load into ``tensors`` in place (the regions ``chunks`` names; whole tensors otherwise), resharding
        from whatever layout saved them; returns (this rank's extra or None when the checkpoint has no file for
        this rank, meta)."""
        meta = read_meta(path)
        dcp.load(
            tensors, checkpoint_id=str(path), process_group=self.group, planner=ChunkLoadPlanner(chunks or {})
        )
        extra_file = path / "extra" / f"rank_{self.rank:05d}.pt"
        extra = torch.load(extra_file, weights_only=False) if extra_file.is_file() else None
        return extra, meta

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier(group=self.group)


def _one_line(exc: BaseException, root: Path) -> str:
    """A save error in one line. A full disk is named as such whatever wrapped it: DCP gathers every rank's
    exception into a CheckpointException, and torch's stream writer reports a short ``write`` without its
    errno ("file write failed", "unexpected pos"), so a failure with (almost) no space left on ``root`` counts
    as one."""
    causes = [e for e, _ in exc.failures.values()] if isinstance(exc, CheckpointException) else [exc]
    for cause in causes:
        enospc = isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)
        if enospc or "No space left on device" in str(cause) or _free_bytes(root) < 2**20:
            return "no space left on device (ENOSPC)"
    cause = causes[0]
    first = next((line.strip() for line in str(cause).splitlines() if line.strip()), "")
    return f"{type(cause).__name__}: {first}"[:300]


def _free_bytes(path: Path) -> int:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def _write_json_durably(path: Path, obj: dict) -> None:
    _write_text_durably(path, json.dumps(obj, indent=1, default=str))


def _write_text_durably(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
