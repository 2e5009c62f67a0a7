"""Fault injection on real ``torchrun`` runs (2 CPU ranks, dp2): each fault is injected from outside, the steps
lost are counted (the last step rank 0 finished before the fault minus the step the next attempt resumed from),
and the run's final weights and AdamW state must equal the uninterrupted reference run's exactly.

| fault                                   | steps lost            |
| kill -9 of a rank mid-step              | <= checkpoint.every   |
| kill -9 inside a sync save             | <= checkpoint.every   |
| kill -9 inside an async save's commit   | since the last commit |
| SIGTERM to torchrun, SIGUSR1 to 1 rank  | 0                     |
| damaged newest checkpoint               | the damaged interval  |
Full disk and read-only run directories are in ``test_disk_faults.py``.
"""

from __future__ import annotations

import shutil
import signal
import time
from pathlib import Path

from harness import EVERY, STEPS, Launch, assert_same_weights, heartbeat, kill, resumed_steps, run

from mllm.train.checkpoint import PAUSE_BEFORE_COMMIT_ENV, latest_checkpoint, list_checkpoints
from mllm.train.signals import EXIT_STOPPED


def _alive(pid: int) -> bool:
    """Running (a zombie nobody reaped yet is dead)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _no_leftovers(run_dir):
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert not [n for n in names if n.startswith(".tmp_")], names


def _kill_mid_step_then_inside_a_save(tmp_path, synth, reference, *overrides):
    """Attempt 1: rank 1 is killed between checkpoints; attempt 2: rank 0 is killed inside the save of step
    6 (every shard written, not committed); attempt 3 finishes. Returns (steps lost per fault, the log)."""
    run_dir = tmp_path / "run"
    launch = Launch(
        synth, run_dir, tmp_path / "log", *overrides, restarts=2, **{PAUSE_BEFORE_COMMIT_ENV: "6"}
    )
    ckpts = run_dir / "checkpoints"
    launch.wait_for("the step-3 checkpoint", lambda: latest_checkpoint(ckpts) is not None)
    launch.wait_step(4)
    kill(launch.worker(1))
    reached = [heartbeat(run_dir)]
    launch.wait_for("the paused save", (run_dir / "paused_before_commit_00000006").exists)
    assert (ckpts / ".tmp_step_00000006").is_dir() and latest_checkpoint(ckpts).name == "step_00000003"
    reached.append(heartbeat(run_dir))
    kill(launch.worker(0))
    assert launch.finish() == 0, launch.tail()
    resumed = resumed_steps(launch.output())
    assert resumed == [3, 3], launch.tail()
    assert_same_weights(run_dir, reference[1])
    _no_leftovers(run_dir)
    return [r - s for r, s in zip(reached, resumed, strict=True)], launch


def test_kill_mid_step_and_inside_a_sync_save(tmp_path, synth, reference):
    lost, _ = _kill_mid_step_then_inside_a_save(tmp_path, synth, reference)
    assert all(0 < n <= EVERY for n in lost), lost


def test_async_save_committed_when_done_and_kill_inside_it(tmp_path, synth, reference):
    """With checkpoint.async_save the step-3 save is committed at the first step boundary after it finishes,
    so the kill at step >= 4 loses at most the steps since step 3 (it used to wait for the next save, and a
    kill before it restarted from step 0). A kill inside the commit of the step-6 save loses what that save
    held plus the steps it was in flight: the run resumes from the newest committed checkpoint, step 3."""
    lost, _ = _kill_mid_step_then_inside_a_save(tmp_path, synth, reference, "checkpoint.async_save=true")
    assert 0 < lost[0] <= EVERY and lost[1] >= EVERY, lost


def test_sigterm_and_sigusr1_save_the_current_step(tmp_path, synth, reference):
    """SIGTERM to torchrun (what SLURM sends on preemption; torchrun forwards it) and SIGUSR1 to one rank only
    (the other learns it through the step's all-reduce): each run saves the step it reached and exits with
    EXIT_STOPPED; nothing is lost."""
    run_dir, log = tmp_path / "run", tmp_path / "log"
    launch = Launch(synth, run_dir, log)
    launch.wait_step(2)
    kill(launch.proc.pid, signal.SIGTERM)
    launch.finish()
    stopped = int((run_dir / "STOPPED").read_text().split()[0])
    assert "SIGTERM" in (run_dir / "STOPPED").read_text()
    assert stopped == heartbeat(run_dir) and latest_checkpoint(run_dir / "checkpoints").name.endswith(
        f"{stopped:08d}"
    )

    launch = Launch(synth, run_dir, log)
    launch.wait_step(stopped + 1)
    kill(launch.worker(1), signal.SIGUSR1)
    assert launch.finish() != 0  # torchrun reports the workers' EXIT_STOPPED as a failure
    assert f"exitcode  : {EXIT_STOPPED}" in launch.output()
    second = int((run_dir / "STOPPED").read_text().split()[0])
    assert second == heartbeat(run_dir) > stopped and "SIGUSR1" in (run_dir / "STOPPED").read_text()
    assert not (run_dir / "save_and_exit").exists()

    rc, output = run(synth, run_dir, log)
    assert rc == 0, output[-4000:]
    assert resumed_steps(output) == [stopped, second]  # 0 steps lost each time
    assert_same_weights(run_dir, reference[1])


def test_damaged_newest_checkpoint_and_killed_launcher(tmp_path, synth, reference):
    """The newest checkpoint (step 8) loses bytes of a shard: every rank falls back to step 6 with one
    warning line. Before that, the first launch's torchrun agent is killed with SIGKILL: its workers die with
    it (PR_SET_PDEATHSIG) instead of training on and writing checkpoints."""
    run_dir = tmp_path / "run"
    shutil.copytree(reference[0], run_dir)
    for name in ("DONE", "heartbeat"):
        (run_dir / name).unlink()
    newest = list_checkpoints(run_dir / "checkpoints")[-1]
    assert newest.name == f"step_{STEPS:08d}"
    shard = newest / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])  # truncated, as by a full disk or a lost write

    launch = Launch(synth, run_dir, tmp_path / "killed.log")
    workers = [launch.worker(0), launch.worker(1)]
    launch.wait_for("the resume", lambda: resumed_steps(launch.output()))
    kill(launch.proc.pid)
    launch.finish()
    deadline = time.time() + 10
    while any(_alive(pid) for pid in workers) and time.time() < deadline:
        time.sleep(0.05)
    assert not [pid for pid in workers if _alive(pid)], "workers outlived their torchrun"

    rc, output = run(synth, run_dir, tmp_path / "log")
    assert rc == 0, output[-4000:]
    warnings = [line for line in output.splitlines() if "damaged checkpoint" in line]
    assert len(warnings) == 1 and "__1_0.distcp has" in warnings[0] and "step_00000006" in warnings[0], (
        warnings
    )
    assert resumed_steps(output) == [6]
    assert_same_weights(run_dir, reference[1])
