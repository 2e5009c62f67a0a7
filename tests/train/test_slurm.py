"""The sbatch script for a 2 x 8 GPU job: content, shell syntax, and behaviour under fake srun/scontrol."""

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
    ]:
        assert line in text.splitlines(), line
    assert '--nnodes="$SLURM_NNODES" --nproc-per-node=8' in text
    assert '--rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"' in text
    assert 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1' in text
    assert "-m mllm.train --config-name=internvl1_5_26b_sft" in text
    # The user's resume=none is replaced: a requeued job must resume.
    assert "checkpoint.resume=auto" in text and "checkpoint.resume=none" not in text
    assert f"train.run_dir={run_dir}" in text
    for env in ["OMP_NUM_THREADS=12", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "CUDA_DEVICE_MAX_CONNECTIONS=1"]:
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


def _fake_bin(tmp_path, srun_body: str):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [ "$1" = show ]; then echo node001; echo node002; else echo "$@" >> "$LOG/scontrol"; fi\n'
    )
    (bin_dir / "srun").write_text(f'#!/bin/bash\necho "$@" > "$LOG/srun"\n{srun_body}\n')
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def _run_script(capsys, tmp_path, srun_body: str, send_usr1: bool):
    run_dir = tmp_path / "run"
    text = render(
        capsys,
        [
            "--nodes",
            "2",
            "--gpus-per-node",
            "8",
            "--config-name=tiny_sft",
            "--no-validate",
            f"train.run_dir={run_dir}",
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
    body = 'while [ ! -f "$RUN_DIR/save_and_exit" ]; do sleep 0.05; done; exit 0'
    rc, out, run_dir = _run_script(capsys, tmp_path, body.replace("$RUN_DIR", str(tmp_path / "run")), True)
    assert rc == 0, out
    assert (run_dir / "save_and_exit").exists()
    assert (tmp_path / "scontrol").read_text().strip() == "requeue 42"
    srun_args = (tmp_path / "srun").read_text()
    assert "--rdzv-endpoint=node001:29500" in srun_args and "--rdzv-id=42" in srun_args


def test_finished_run_is_not_requeued_and_failure_is_reported(capsys, tmp_path):
    done = f"touch {tmp_path}/run/DONE; exit 0"
    rc, out, _ = _run_script(capsys, tmp_path, done, False)
    assert rc == 0 and "training finished" in out
    assert not (tmp_path / "scontrol").exists()


def test_failing_program_is_not_requeued(capsys, tmp_path):
    rc, out, _ = _run_script(capsys, tmp_path, "exit 3", False)
    assert rc == 3 and "failed with exit code 3" in out
    assert not (tmp_path / "scontrol").exists()
