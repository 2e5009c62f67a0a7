"""Shared by the fault suite: synthetic data and the one uninterrupted reference run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import STEPS, env, final_tensors, run  # noqa: E402


@pytest.fixture(scope="session")
def synth(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault_synth")
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
    root = tmp_path_factory.mktemp("fault_reference")
    rc, output = run(synth, root / "run", root / "torchrun.log")
    assert rc == 0, output[-4000:]
    assert (root / "run" / "DONE").read_text().strip() == str(STEPS)
    return root / "run", final_tensors(root / "run")
