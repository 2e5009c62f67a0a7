"""The generated sbatch script under a real SLURM (``slurm_cluster``): the tiny recipe on 2 nodes x 2 CPU ranks
(gloo) is preempted mid-run with ``scancel --signal=TERM`` (what SLURM sends to the job's steps), saves the step
it reached, requeues itself, resumes and finishes with the loss curve and weights of an uninterrupted run of the
same layout.

Without the SLURM binaries the test is skipped, except in CI (``CI=true``), where ``.ci/run`` must have installed
them: there it fails and says so.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from harness import REPO, assert_same_weights, env, final_tensors, heartbeat, losses, run
from slurm_cluster import Cluster, free_port, missing_binaries

STEPS = 12
OVERRIDES = [f"train.steps={STEPS}", "checkpoint.every=4"]
DEADLINE_S = 400


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    problem = None
    if missing:
        problem = (
            f"SLURM binaries missing ({', '.join(missing)}): apt-get install -y slurm-wlm munge (.ci/run)"
        )
    elif os.geteuid() != 0:
        problem = "the test SLURM cluster runs slurmd, which launches jobs, as root"
    if problem:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must run the real-SLURM test: {problem}")
        pytest.skip(problem)
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def _wait(cluster: Cluster, job: str, what: str, cond, deadline: float, log) -> None:
    while not cond():
        state, reason = cluster.job_state(job)
        if (
            state in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY")
            or time.time() > deadline
        ):
            pytest.fail(f"waiting for {what}: job {job} {state} ({reason}):\n{log()}")
        time.sleep(0.2)


def test_sbatch_preempted_requeued_resumes_to_the_same_loss_curve(slurm, synth, tmp_path):
    reference = tmp_path / "reference"
    rc, output = run(synth, reference, tmp_path / "reference.log", *OVERRIDES, nproc=4)
    assert rc == 0, output[-4000:]

    run_dir = tmp_path / "run"
    generated = subprocess.run(
        [
            *(sys.executable, "-m", "launch.slurm", "--nodes", "2", "--gpus-per-node", "0"),
            *("--procs-per-node", "2", "--config-name=tiny_sft", "--time", "20", "--python", sys.executable),
            *("--workdir", str(tmp_path), "--port", str(free_port()), "--heartbeat-timeout", "300"),
            f"data.path={synth / 'meta.json'}",
            f"data.tokenizer={synth / 'tokenizer'}",
            f"train.run_dir={run_dir}",
            "logging.progress=off",
            *OVERRIDES,
        ],
        env=env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    )
    script = tmp_path / "job.sbatch"
    script.write_text(generated.stdout)
    job = slurm.cmd("sbatch", "--parsable", str(script)).strip()
    deadline = time.time() + DEADLINE_S

    def log() -> str:
        logs = sorted((run_dir / "logs").glob("*"))
        return "\n".join(f"== {p.name}\n{p.read_text()[-2500:]}" for p in logs)

    _wait(slurm, job, "step 2", lambda: heartbeat(run_dir) >= 2, deadline, log)
    slurm.cmd("scancel", "--signal=TERM", job)  # the job's steps: torchrun and its workers
    stopped = run_dir / "STOPPED"
    _wait(slurm, job, "the stop's checkpoint", stopped.exists, deadline, log)
    step = int(stopped.read_text().split()[0])
    assert 2 <= step < STEPS and step == heartbeat(run_dir)  # nothing lost: the reached step is saved
    assert (run_dir / "checkpoints" / f"step_{step:08d}").is_dir()
    # The script requeued the job; SLURM holds a requeued job ~2 minutes (BeginTime): let it start now.
    _wait(slurm, job, "the requeue", lambda: slurm.job_state(job)[0] == "PENDING", deadline, log)
    slurm.cmd("scontrol", "update", f"JobId={job}", "StartTime=now")
    done = run_dir / "DONE"
    _wait(slurm, job, "the end of training", lambda: done.exists() and done.read_text().strip() == str(STEPS),
          deadline, log)  # fmt: skip

    out = log()
    assert f"checkpointed at step {step}" in out and "restart 1" in out, out
    assert losses(run_dir) == losses(reference)  # every step, bit for bit
    assert_same_weights(run_dir, final_tensors(reference, STEPS), STEPS)
