"""The sbatch script for a 2 x 8 GPU job: content, shell syntax, and behaviour under fake srun/scontrol (the
real SLURM runs it in tests/faults/test_slurm_cluster.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from launch.slurm import main as slurm_main


def render(capsys, argv):
    slurm_main(argv)
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    """The launcher validates the data files and the tokenizer's image token before printing."""
    from mllm.data.synth import synth

    return synth(tmp_path_factory.mktemp("synth"), num_samples=8, progress=False)


def test_sbatch_for_2_nodes_x_8_gpus(capsys, tmp_path, synth_data):
    run_dir = tmp_path / "run"
    text = render(
        capsys,
        [
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--config-name=internvl1_5_26b_sft",
            "--partition",
            "gpu",
            f"train.run_dir={run_dir}",
            f"data.path={synth_data.meta}",
            f"data.tokenizer={synth_data.tokenizer}",
            "model.image_token_id=7",  # <IMG_CONTEXT> of the synthetic tokenizer
            "checkpoint.resume=none",
        ],
    )
    for line in [
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@600",
        "#SBATCH --partition=gpu",
        f"#SBATCH --output={run_dir}/logs/%x-%j.out",
        "#SBATCH --exclusive",
        f"#SBATCH --chdir={os.getcwd()}",
    ]:
        assert line in text.splitlines(), line
    assert '--nnodes="$SLURM_NNODES" --nproc-per-node=8' in text
    assert '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert "--max-restarts=2" in text and "--cpus-per-task" not in "".join(text.splitlines()[:12])
    assert (run_dir / "logs").is_dir()  # SLURM opens --output before the script runs
    assert "-m mllm.train --config-name=internvl1_5_26b_sft" in text
    # The user's resume=none is replaced: a requeued job must resume.
    assert "checkpoint.resume=auto" in text and "checkpoint.resume=none" not in text
    assert f"train.run_dir={run_dir}" in text
    for env in ["TORCH_NCCL_ASYNC_ERROR_HANDLING", "CUDA_DEVICE_MAX_CONNECTIONS=1", "PYTHONPATH="]:
        assert f"export {env}" in text
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)


def test_invalid_layout_fails_before_printing(capsys):
    with pytest.raises(SystemExit, match=r"world size 12 is not divisible by tp\*pp = 8\*2"):
        slurm_main(
            [
                "--nodes",
                "3",
                "--gpus-per-node",
                "4",
                "--config-name=internvl1_5_26b_sft",
                "data.path=/d/meta.json",
            ]
        )
    assert capsys.readouterr().out == ""


def test_cpu_mode_containers_setup_and_missing_data(capsys, tmp_path):
    slurm_main(
        [
            *("--nodes", "2", "--gpus-per-node", "0", "--procs-per-node", "2", "--config-name=tiny_sft"),
            *("--container-image", "nvcr.io/x:1", "--setup", "module load gcc/12", "--sbatch=--mem=0"),
            f"train.run_dir={tmp_path / 'run'}",
            "data.path=/cluster/only/meta.json",
        ]
    )
    text, err = capsys.readouterr()
    lines = text.splitlines()
    assert not any("gpus" in line for line in lines if line.startswith("#SBATCH"))
    assert "#SBATCH --mem=0" in lines and "module load gcc/12" in lines
    assert "--nproc-per-node=2" in text and "train.device=cpu" in text and "NCCL" not in text
    assert "--container-image=nvcr.io/x:1" in text
    assert "data.path=/cluster/only/meta.json does not exist here" in err
    subprocess.run(["bash", "-n"], input=text, text=True, check=True)
    with pytest.raises(SystemExit):
        slurm_main(["--nodes", "1", "--gpus-per-node", "0", "--config-name=tiny_sft"])  # no --procs-per-node


def _fake_bin(tmp_path, srun_body: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        "#!/bin/bash\n"
        'if [ "$1 $2" = "show hostnames" ]; then echo node001; echo node002;\n'
        'elif [ "$1 $2" = "show node" ]; then echo "NodeName=$3 Arch=x86_64"; echo "   NodeAddr=10.1.2.3 NodeHostName=$3";\n'
        'else echo "$@" >> "$LOG/scontrol"; fi\n'
    )
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$@" > "$LOG/srun"\n{srun_body}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _run_script(capsys, tmp_path, srun_body: str, send_usr1: bool, extra_args=()):
    run_dir = tmp_path / "run"
    text = render(
        capsys,
        [
            *("--nodes", "2", "--gpus-per-node", "8", "--config-name=tiny_sft", "--no-validate", *extra_args),
            f"train.run_dir={run_dir}",
            "train.steps=50",
        ],
    )
    script = tmp_path / "job.sbatch"
    script.write_text(text)
    env = {
        **os.environ,
        "PATH": f"{_fake_bin(tmp_path, srun_body)}:{os.environ['PATH']}",
        "LOG": str(tmp_path),
        "SLURM_JOB_NODELIST": "node[001-002]",
        "SLURM_NNODES": "2",
        "SLURM_JOB_ID": "42",
        "SLURM_CPUS_PER_TASK": "96",
    }
    proc = subprocess.Popen(
        ["bash", str(script)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    if send_usr1:
        deadline = time.time() + 10
        while not (tmp_path / "srun").exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.2)
        proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    return proc.returncode, out, run_dir


def test_time_limit_signal_checkpoints_and_requeues(capsys, tmp_path):
    # The fake trainer waits for the save-and-exit request, as the real one polls it every step.
    # It writes STOPPED after saving (and removes the stop file it acted on), as mllm.train.signals does.
    body = 'while [ ! -f "$RUN_DIR/save_and_exit" ]; do sleep 0.05; done; echo "7 SIGUSR1" > "$RUN_DIR/STOPPED"; exit 1'
    rc, out, run_dir = _run_script(capsys, tmp_path, body.replace("$RUN_DIR", str(tmp_path / "run")), True)
    assert rc == 0, out
    assert "checkpointed at step 7 SIGUSR1: requeueing" in out
    assert (tmp_path / "scontrol").read_text().strip() == "requeue 42"
    srun_args = (tmp_path / "srun").read_text()
    assert "--rdzv-endpoint=10.1.2.3:29500" in srun_args and "--rdzv-id=42" in srun_args
    assert "--cpus-per-task=96" in srun_args  # the node's CPUs


def test_finished_run_is_not_requeued_and_failure_is_reported(capsys, tmp_path):
    done = f"echo 50 > {tmp_path}/run/DONE; exit 0"
    rc, out, _ = _run_script(capsys, tmp_path, done, False)
    assert rc == 0 and "training finished" in out
    assert not (tmp_path / "scontrol").exists()


def test_stale_done_of_a_shorter_run_is_not_finished(capsys, tmp_path):
    rc, out, _ = _run_script(capsys, tmp_path, f"echo 20 > {tmp_path}/run/DONE; exit 4", False)
    assert rc == 4 and "failed with exit code 4" in out


def test_watchdog_ends_a_job_whose_heartbeat_stops(capsys, tmp_path):
    t0 = time.time()
    rc, out, _ = _run_script(capsys, tmp_path, "exec sleep 60", False, ("--heartbeat-timeout", "1"))
    assert rc == 1 and "no training step for over 1 s" in out
    assert time.time() - t0 < 30


def test_failing_program_is_not_requeued(capsys, tmp_path):
    rc, out, _ = _run_script(capsys, tmp_path, "exit 3", False)
    assert rc == 3 and "failed with exit code 3" in out
    assert not (tmp_path / "scontrol").exists()
