"""Real ``torchrun`` runs of the tiny recipe on synthetic data, with faults injected from outside.

Every fault test trains the same run (``STEPS`` steps, dp2 on 2 CPU ranks, a checkpoint every ``EVERY`` steps)
and compares its final checkpoint, tensor by tensor, with one uninterrupted run shared by the suite
(``conftest.reference``): fp32 on CPU with the same layout resumes bit for bit, so equality is exact.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
EVERY = 3
DEADLINE_S = 300  # one launch; ~15 s alone, several times that on a loaded 2-core machine


def env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def train_args(synth: Path, run_dir: Path, *overrides: str) -> list[str]:
    return [
        "-m",
        "mllm.train",
        "--config-name=tiny_sft",
        f"data.path={synth / 'meta.json'}",
        f"data.tokenizer={synth / 'tokenizer'}",
        f"train.run_dir={run_dir}",
        f"train.steps={STEPS}",
        f"checkpoint.every={EVERY}",
        "checkpoint.keep_last=3",
        "checkpoint.resume=auto",
        "logging.progress=off",
        *overrides,
    ]


class Launch:
    """``torchrun --nproc-per-node=2`` in the background, its output in ``log``."""

    def __init__(
        self, synth, run_dir, log: Path, *overrides: str, restarts: int = 0, nproc: int = 2, **extra_env: str
    ) -> None:
        self.log = log
        self.run_dir = Path(run_dir)
        self.deadline = time.time() + DEADLINE_S
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # the agent picks a free port: no races with other tests
            f"--nproc-per-node={nproc}",
            f"--max-restarts={restarts}",
            "--monitor-interval=0.5",
            *train_args(synth, run_dir, *overrides),
        ]
        with open(log, "a") as out:
            self.proc = subprocess.Popen(
                cmd, env=env(**extra_env), cwd=REPO, stdout=out, stderr=subprocess.STDOUT
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait_for(self, what: str, cond) -> None:
        while not cond():
            if self.proc.poll() is not None:
                pytest.fail(
                    f"torchrun exited ({self.proc.returncode}) while waiting for {what}:\n{self.tail()}"
                )
            if time.time() > self.deadline:
                self.proc.kill()
                pytest.fail(f"timed out waiting for {what}:\n{self.tail()}")
            time.sleep(0.05)

    def wait_step(self, step: int) -> None:
        self.wait_for(f"step {step}", lambda: heartbeat(self.run_dir) >= step)

    def worker(self, local_rank: int) -> int:
        self.wait_for(f"worker {local_rank}", lambda: local_rank in local_ranks(self.proc.pid))
        return local_ranks(self.proc.pid)[local_rank]

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, self.deadline - time.time()))
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def tail(self) -> str:
        return self.output()[-4000:]


def run(
    synth, run_dir, log, *overrides: str, restarts: int = 0, nproc: int = 2, **extra_env: str
) -> tuple[int, str]:
    """A launch to its end: (torchrun's exit code, the whole log)."""
    launch = Launch(synth, run_dir, log, *overrides, restarts=restarts, nproc=nproc, **extra_env)
    return launch.finish(), launch.output()


def local_ranks(agent_pid: int) -> dict[int, int]:
    """LOCAL_RANK -> pid of the torchrun agent's live workers."""
    path = Path(f"/proc/{agent_pid}/task/{agent_pid}/children")
    ranks = {}
    for pid in (int(x) for x in path.read_text().split()) if path.exists() else ():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):  # exited meanwhile
            continue
        for item in environ:
            if item.startswith(b"LOCAL_RANK="):
                ranks[int(item.split(b"=")[1])] = pid
    return ranks


def kill(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)


def heartbeat(run_dir: Path) -> int:
    """The last step rank 0 finished (``mllm.train.signals.beat``); 0 before the first."""
    try:
        return int((Path(run_dir) / "heartbeat").read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


def resumed_steps(output: str) -> list[int]:
    return [int(s) for s in re.findall(r"resumed from \S*step_(\d+)", output)]


def losses(run_dir: Path) -> dict[int, float]:
    """step -> loss from ``metrics.jsonl`` (a step logged again after a resume: the last record)."""
    from mllm.train.metrics import read_metrics

    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def final_tensors(run_dir: Path, step: int = STEPS) -> dict[str, torch.Tensor]:
    """Every tensor (weights and AdamW state) of the run's checkpoint at ``step``, read without a process
    group."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    ckpt = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    out = ckpt.parent.parent / f"flat_{step}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return torch.load(out, weights_only=False)


def assert_same_weights(run_dir: Path, reference: dict[str, torch.Tensor], step: int = STEPS) -> None:
    got = final_tensors(run_dir, step)
    assert sorted(got) == sorted(reference)
    for name, tensor in reference.items():
        if isinstance(tensor, torch.Tensor):
            assert torch.equal(got[name], tensor), f"{name} differs from the uninterrupted run"
        else:
            assert got[name] == tensor, name
