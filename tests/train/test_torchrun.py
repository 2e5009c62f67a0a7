"""End to end under torchrun on the synthetic data: tiny_sft learns, and ``kill -9`` of one rank mid-training
is recovered by ``--max-restarts=1`` + ``checkpoint.resume=auto`` (the run finishes with every step logged)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = 12


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(x) for x in path.read_text().split()] if path.exists() else []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(metrics: Path) -> list[int]:
    if not metrics.exists():
        return []
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "mllm.data", "synth", str(out), "--num-samples", "300"],
        env=env,
        check=True,
        capture_output=True,
    )
    return out


def test_kill_one_rank_resumes_and_finishes(tmp_path, synth):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node=2",
        "--max-restarts=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "-m",
        "mllm.train",
        "--config-name=tiny_sft",
        f"data.path={synth / 'meta.json'}",
        f"data.tokenizer={synth / 'tokenizer'}",
        "parallel.tp=2",
        f"train.run_dir={run_dir}",
        f"train.steps={STEPS}",
        "checkpoint.every=3",
        "checkpoint.resume=auto",
        "logging.progress=off",
    ]
    proc = subprocess.Popen(
        cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.time() + 240
        while max(_steps(run_dir / "metrics.jsonl"), default=0) < 5 and time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        workers = _children(proc.pid)
        assert len(workers) == 2, workers
        os.kill(workers[1], signal.SIGKILL)  # rank 1 dies between checkpoints (saved at step 3)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    assert "resumed from" in out, out[-3000:]
    steps = _steps(run_dir / "metrics.jsonl")
    assert steps == list(range(1, STEPS + 1))  # cut back to the checkpoint and continued: one clean run
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.5, (first, last)  # tiny_sft learns the synthetic data
    assert (run_dir / "DONE").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000009", "step_00000012"]
