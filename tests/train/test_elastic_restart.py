"""Regression test for the flaky torchrun restart: torch >= 2.5's torchrun shares one TCPStore across restart
attempts without a per-attempt prefix, so a restarted rank could read the dead attempt's gloo address and fail
with "Connection refused" (or hang) in ``init_process_group``. ``init_distributed`` now uses a store private to
the attempt. The worker makes the race deterministic (the new rank 0 arrives 3 s late); with a plain
``init_process_group`` this run fails every time (torch 2.13)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_restarted_attempt_does_not_use_the_dead_attempts_addresses():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node=2",
        "--max-restarts=1",
        str(Path(__file__).with_name("elastic_worker.py")),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    for rank in (0, 1):
        assert f"attempt 1 rank {rank} all_reduce 2" in out, out[-3000:]
