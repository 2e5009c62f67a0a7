"""Safe run directories and clean failures for ``python -m mllm.train``.

- A run directory that already holds checkpoints is never silently restarted from scratch: without
  ``checkpoint.resume`` the run refuses with one line naming both ways on (resume, or a new run directory).
- A failure the user can fix (bad config, bad data, an unreadable checkpoint, a diverged run) ends the process
  with exit code 2 and one ``error: ...`` line as its last output, not a traceback; other ranks prefix their
  line with ``[rank N]``.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from mllm.train.checkpoint import list_checkpoints
from mllm.train.signals import EXIT_STOPPED


def checkpoint_root(run: Any) -> Path:
    return Path(run.checkpoint.dir or Path(run.train.run_dir) / "checkpoints")


def check_run_dir(run: Any) -> None:
    """Refuse a fresh start over existing checkpoints (raises ``mllm.config.ConfigError``, one line)."""
    from mllm.config import ConfigError

    if run.checkpoint.resume not in ("none", ""):
        return
    found = list_checkpoints(checkpoint_root(run))
    if found:
        raise ConfigError(
            f"{checkpoint_root(run)} already holds {len(found)} checkpoint(s) (latest {found[-1].name}) and "
            "checkpoint.resume=none: add checkpoint.resume=auto to continue that run, or set a new "
            "train.run_dir to start a new one"
        )


def user_facing_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message says what to fix; they end the run with one line instead of a traceback."""
    from mllm.config import ConfigError
    from mllm.convert.errors import CheckpointError
    from mllm.data.badsamples import DataQualityError
    from mllm.train.checkpoint import CheckpointWriteError
    from mllm.train.fast_path import FastPathError
    from mllm.train.preflight import PreflightError
    from mllm.train.trainer import NonFiniteError

    return (
        ConfigError,
        CheckpointError,
        CheckpointWriteError,
        DataQualityError,
        FastPathError,
        NonFiniteError,
        PreflightError,
    )


def rank_prefix() -> str:
    rank = os.environ.get("RANK", "0")
    return "" if rank == "0" else f"[rank {rank}] "


def one_line_message(exc: BaseException) -> str:
    """The message in one line; for an error re-raised from a DataLoader worker, the original's own line."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if any("Original Traceback" in ln for ln in lines):
        return lines[-1].split(": ", 1)[-1]
    return " ".join(lines)


def run_training_cli(run: Any, run_training: Callable[[Any], dict]) -> int:
    """``run_training(run)``; a user-facing error becomes the process's last line and exit code 2."""
    from mllm.train.console import prefix_rank_output

    prefix_rank_output(int(os.environ.get("RANK", "0")))
    try:
        result = run_training(run)
    except user_facing_errors() as exc:
        from mllm.data.badsamples import DataQualityError
        from mllm.train.checkpoint import CheckpointWriteError
        from mllm.train.preflight import PreflightError
        from mllm.train.trainer import NonFiniteError

        # These are decided on values every rank shares: every rank raises the same one, so rank 0 says it.
        if rank_prefix() and isinstance(
            exc, (DataQualityError, NonFiniteError, PreflightError, CheckpointWriteError)
        ):
            time.sleep(2.0)  # leave rank 0 time to say it before torchrun ends the workers
            return 2
        message = one_line_message(exc)
        print(f"{rank_prefix()}error: {type(exc).__name__}: {message}", file=sys.stderr, flush=True)
        return 2
    # A stop on request (signal, stop file) saved and can resume: EX_TEMPFAIL, unlike train.stop_after.
    stopped = result.get("stopped") and result.get("stop_reason") != "train.stop_after"
    return EXIT_STOPPED if stopped else 0
