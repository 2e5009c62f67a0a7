"""Coordinated stop and liveness: SIGTERM, SIGUSR1 and the stop file end a run with a checkpoint.

Why a coordinated stop: SLURM sends SIGTERM on preemption, ``scancel`` and at the time limit (and, with
``--signal=B:USR1@SECONDS``, USR1 to the batch shell first, which touches the stop file). Ranks see a signal or the
file at slightly different times, so each step boundary all-reduces one small tensor (``agree``); every rank
then saves the same step and exits with ``EXIT_STOPPED``. A handler only records the request: a second signal
arriving while the checkpoint is written changes nothing (the save finishes and is committed atomically).

The same all-reduce carries whether an asynchronous save has finished on this rank, so a finished save is
committed at the first step boundary after it completes on every rank (``CheckpointManager.commit_if_done``).
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

STOP_FILE = "save_and_exit"  # touched by the sbatch script on USR1, or by a user: save and exit
STOPPED_FILE = "STOPPED"  # written by rank 0 after a requested stop: "STEP REASON"
HEARTBEAT_FILE = "heartbeat"  # rank 0 rewrites it every step; the sbatch watchdog fails a job that stops
# EX_TEMPFAIL (sysexits.h): "temporary failure, try again": the run saved and can resume.
EXIT_STOPPED = 75

# Reasons, ordered: the all-reduce keeps the largest any rank saw.
NO_STOP, STOP_FILE_SEEN, SIGUSR1_SEEN, SIGTERM_SEEN = 0, 1, 2, 3
REASONS = {STOP_FILE_SEEN: f"stop file {STOP_FILE}", SIGUSR1_SEEN: "SIGUSR1", SIGTERM_SEEN: "SIGTERM"}
_SIGNAL_REASON = {signal.SIGTERM: SIGTERM_SEEN, signal.SIGUSR1: SIGUSR1_SEEN}


class StopRequests:
    """Records SIGTERM / SIGUSR1 (from ``install``) and looks for ``RUN_DIR/save_and_exit``."""

    def __init__(self, run_dir: Path) -> None:
        self.stop_file = run_dir / STOP_FILE
        self.signalled = NO_STOP
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        """Replace the default handlers (which end the process at once) in the main thread."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in _SIGNAL_REASON:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signalled:
            os.write(2, f"{signal.Signals(signum).name} again: still saving, then exiting\n".encode())
        self.signalled = max(self.signalled, _SIGNAL_REASON[signum])

    def local_reason(self) -> int:
        return max(self.signalled, STOP_FILE_SEEN if self.stop_file.exists() else NO_STOP)

    def acknowledge(self, rank: int, step: int, reason: int) -> None:
        """Rank 0, after the stop's checkpoint is committed: remove the stop file (acted on) and write
        ``STOPPED`` so that the sbatch script requeues and a torchrun restart of this launch exits at once."""
        if rank != 0:
            return
        self.stop_file.unlink(missing_ok=True)
        (self.stop_file.parent / STOPPED_FILE).write_text(f"{step} {REASONS[reason]}\n")


def agree(stop_reason: int, save_in_flight: bool, device) -> tuple[int, bool]:
    """One all-reduce (MAX) at a step boundary: (the largest stop reason any rank saw, whether an asynchronous
    save is still being written on some rank)."""
    import torch
    import torch.distributed as dist

    flags = torch.tensor([float(stop_reason), float(save_in_flight)], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return int(flags[0].item()), bool(flags[1].item())


def beat(run_dir: Path, step: int) -> None:
    """Rank 0's heartbeat: a hung collective stops it, and the sbatch watchdog ends the job."""
    tmp = run_dir / f".{HEARTBEAT_FILE}.tmp"
    tmp.write_text(f"{step} {time.time():.0f}\n")
    os.replace(tmp, run_dir / HEARTBEAT_FILE)


def stopped_by_earlier_attempt(run_dir: Path) -> str | None:
    """Under torchrun's ``--max-restarts``, a stopped run's exit code counts as a failure and the agent
    restarts the workers: the restarted attempt finds ``STOPPED`` and exits at once. None on a first attempt
    (``STOPPED`` is then stale and ``clear_stopped`` removes it)."""
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        return None
    path = run_dir / STOPPED_FILE
    return path.read_text().strip() if path.is_file() else None


def clear_stopped(run_dir: Path) -> None:
    if int(os.environ.get("RANK", "0")) == 0 and int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) == 0:
        (run_dir / STOPPED_FILE).unlink(missing_ok=True)


def die_with_parent() -> None:
    """Under torchrun: the kernel sends SIGKILL to this worker when its agent dies (``PR_SET_PDEATHSIG``), so a
    killed job stops training and writing checkpoints instead of running on in its own process session. Called
    first thing in ``python -m mllm.train`` (before the slow imports)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ or not os.uname().sysname == "Linux":
        return
    import ctypes

    pr_set_pdeathsig = 1
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the agent died before prctl took effect: this worker was re-parented to init
        os._exit(1)
