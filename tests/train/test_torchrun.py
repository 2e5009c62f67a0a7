"""End to end under torchrun on the synthetic data, with real ``kill -9``s and ``--max-restarts=2`` +
``checkpoint.resume=auto``:

1. rank 1 dies between checkpoints: the restarted run resumes from the last checkpoint;
2. rank 0 dies *inside* a save (every shard written, before the commit, held there by the trainer's
   ``MLLM_CKPT_PAUSE_BEFORE_COMMIT`` hook): the half-written checkpoint is never chosen, the previous one
   is loaded, and the run finishes with every step logged once and tiny_sft's loss falling.

Each restart also exercises ``init_distributed``'s per-attempt store (torchrun's shared store keeps the dead
attempt's gloo addresses; see ``mllm.train.setup.elastic_attempt_store``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from mllm.train.checkpoint import PAUSE_BEFORE_COMMIT_ENV, PAUSE_MARKER_PREFIX, latest_checkpoint
from mllm.train.metrics import latest_per_step, read_metrics

REPO = Path(__file__).resolve().parents[2]
STEPS = 12
PAUSE_STEP = 9  # the save that rank 0 is killed in
DEADLINE_S = 420  # the whole run; ~40 s alone, several times that on a loaded 2-core machine


def _local_ranks(agent_pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the torchrun agent's live workers."""
    path = Path(f"/proc/{agent_pid}/task/{agent_pid}/children")
    ranks = {}
    for pid in (int(x) for x in path.read_text().split()) if path.exists() else ():
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except FileNotFoundError:  # exited meanwhile
            continue
        for item in env:
            if item.startswith(b"LOCAL_RANK="):
                ranks[int(item.split(b"=")[1])] = pid
    return ranks


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


def _wait_for(proc: subprocess.Popen, log: Path, what: str, cond, deadline: float) -> None:
    while not cond():
        if proc.poll() is not None:
            pytest.fail(
                f"torchrun exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}"
            )
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


def _kill(proc: subprocess.Popen, local_rank: int, log: Path, deadline: float) -> None:
    _wait_for(proc, log, f"worker {local_rank}", lambda: local_rank in _local_ranks(proc.pid), deadline)
    os.kill(_local_ranks(proc.pid)[local_rank], signal.SIGKILL)


def test_kill_between_and_during_saves_resumes_and_finishes(tmp_path, synth):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    log = tmp_path / "torchrun.log"
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
        PAUSE_BEFORE_COMMIT_ENV: str(PAUSE_STEP),
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # c10d rendezvous on a port the agent picks itself: no port race with other tests
        "--nproc-per-node=2",
        "--max-restarts=2",
        "-m",
        "mllm.train",
        "--config-name=tiny_sft",
        f"data.path={synth / 'meta.json'}",
        f"data.tokenizer={synth / 'tokenizer'}",
        "parallel.tp=2",
        f"train.run_dir={run_dir}",
        f"train.steps={STEPS}",
        "checkpoint.every=3",
        "checkpoint.keep_last=2",
        "checkpoint.resume=auto",
        "logging.progress=off",
    ]
    deadline = time.time() + DEADLINE_S
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
    try:
        # 1. A kill between checkpoints: after step 4 (step 3 saved), well before the paused save.
        _wait_for(
            proc, log, "step 4", lambda: max(_steps(run_dir / "metrics.jsonl"), default=0) >= 4, deadline
        )
        _kill(proc, 1, log, deadline)
        # 2. A kill inside the save of PAUSE_STEP, in the restarted attempt.
        marker = run_dir / f"{PAUSE_MARKER_PREFIX}{PAUSE_STEP:08d}"
        _wait_for(proc, log, "the paused save", marker.exists, deadline)
        assert (ckpts / f".tmp_step_{PAUSE_STEP:08d}").is_dir()  # shards being committed ...
        assert (
            latest_checkpoint(ckpts).name == f"step_{PAUSE_STEP - 3:08d}"
        )  # ... the previous one is complete
        _kill(proc, 0, log, deadline)
        proc.wait(timeout=max(1.0, deadline - time.time()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = log.read_text()
    assert proc.returncode == 0, output[-3000:]
    resumed = [int(s) for s in re.findall(r"resumed from \S*step_(\d+)", output)]
    assert len(resumed) == 2 and resumed[0] in (3, 6) and resumed[1] == PAUSE_STEP - 3, (
        resumed,
        output[-3000:],
    )
    # Appended across restarts: steps after a checkpoint appear again, the last record of a step counts.
    records = latest_per_step(read_metrics(run_dir / "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert last < first - 0.5, (first, last)  # tiny_sft learns the synthetic data
    assert (run_dir / "DONE").exists()
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000009", "step_00000012"]  # no stale .tmp_
