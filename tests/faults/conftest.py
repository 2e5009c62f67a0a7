"""Shared by the fault suite: synthetic data and the one uninterrupted reference run, built once per test
session even when pytest-xdist spreads the tests over workers (a file lock in the session's shared directory)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import STEPS, env, final_tensors, run  # noqa: E402


def _shared_dir(tmp_path_factory, name: str) -> Path:
    """A directory every xdist worker of this session sees (the session's base directory is one level up)."""
    base = tmp_path_factory.getbasetemp()
    return (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    out = _shared_dir(tmp_path_factory, "fault_synth")
    with FileLock(f"{out}.lock"):
        if not (out / "meta.json").exists():
            subprocess.run(
                [sys.executable, "-m", "mllm.data", "synth", str(out), "--num-samples", "120"],
                env=env(),
                check=True,
                capture_output=True,
            )
    return out


@pytest.fixture(scope="session")
def reference(synth, tmp_path_factory) -> tuple[Path, dict]:
    """(run dir, final tensors) of the uninterrupted run every fault test is compared with."""
    root = _shared_dir(tmp_path_factory, "fault_reference")
    with FileLock(f"{root}.lock"):
        if not (root / "run" / "DONE").exists():
            rc, output = run(synth, root / "run", root.parent / "fault_reference.log")
            assert rc == 0, output[-4000:]
        assert (root / "run" / "DONE").read_text().strip() == str(STEPS)
        return root / "run", final_tensors(root / "run")
