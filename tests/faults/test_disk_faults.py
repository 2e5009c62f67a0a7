"""A read-only and then a full run directory, on a real small filesystem: a tmpfs mounted for the test (root
with mount permission, as in CI's container and here; skipped otherwise). Nothing is injected: the kernel
answers EROFS and ENOSPC.

1. read-only: pre-flight ends the run with one line before any process group (0 steps run, none lost);
2. room for one checkpoint, not two: the step-6 save fails with ENOSPC on some rank, every rank stops with one
   line, the partial ``.tmp_`` directory is removed and step 3 stays loadable (steps lost <= the interval);
3. room again: the run resumes from step 3 and ends with the reference run's weights.
"""

from __future__ import annotations

import subprocess

import pytest
from harness import EVERY, assert_same_weights, heartbeat, resumed_steps, run

from mllm.train.checkpoint import latest_checkpoint

ONE_CHECKPOINT = "7500k"  # a tiny_sft checkpoint is ~4.8 MB (fp32 weights + AdamW moments)


def _mount(path, options: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = _mount(disk, f"size={ONE_CHECKPOINT}")
    if mounted.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({mounted.stderr.decode().strip()}): needs root with mount rights"
        )
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _remount(disk, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(disk)], check=True)


def _error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("error: ")]


def test_read_only_then_full_run_dir(small_disk, tmp_path, synth, reference):
    run_dir, log = small_disk / "run", tmp_path / "log"
    _remount(small_disk, "ro")
    rc, output = run(synth, run_dir, log)
    assert rc != 0
    errors = _error_lines(output)
    assert len(errors) == 1 and "train.run_dir" in errors[0] and "Read-only file system" in errors[0], output
    assert "Traceback" not in output.split(errors[0])[0]  # pre-flight: before any rank started training

    _remount(small_disk, "rw")
    rc, output = run(synth, run_dir, log)
    assert rc != 0
    errors = [line for line in _error_lines(output) if "no space left" in line]
    assert len(errors) == 1 and "checkpoint step 6" in errors[0] and "step_00000003 is intact" in errors[0], (
        output
    )
    reached = heartbeat(run_dir)
    assert latest_checkpoint(run_dir / "checkpoints").name == "step_00000003"
    assert not list((run_dir / "checkpoints").glob(".tmp_*"))

    _remount(small_disk, "size=64m")
    rc, output = run(synth, run_dir, log)
    assert rc == 0, output[-4000:]
    assert resumed_steps(output)[-1] == 3 and reached - 3 <= EVERY
    assert_same_weights(run_dir, reference[1])
