"""Print an sbatch script that trains a recipe on SLURM: ``srun`` + ``torchrun`` with c10d rendezvous.

    python -m launch.slurm --nodes 2 --gpus-per-node 8 --config-name=internvl1_5_26b_sft \
        train.run_dir=/ckpt/sft data.path=/data/meta.json > job.sbatch && sbatch job.sbatch

What the script does:
- one ``torchrun`` per node (``srun --ntasks-per-node=1``), rendezvous on the first node of the allocation;
- ``--requeue`` plus ``checkpoint.resume=auto``: a requeued job (node failure, preemption, time limit) continues
  from the latest complete checkpoint;
- ``--signal=B:USR1@SECONDS``: before the time limit SLURM signals the batch shell, which creates
  ``RUN_DIR/save_and_exit``; the trainer sees it at the next step (all ranks agree through an all-reduce), saves a
  checkpoint and exits, and the script requeues the job (which resumes) unless the run wrote ``RUN_DIR/DONE``;
  a failing program is not requeued (it would fail again), a failed node is (SLURM's ``--requeue``);
- logs per job under ``RUN_DIR/logs/`` (one file per node).
The recipe is composed and validated for ``nodes * gpus_per_node`` ranks before the script is printed.
"""

from __future__ import annotations

import argparse
import shlex
import sys

SAVE_AND_EXIT_FILE = "save_and_exit"
DONE_FILE = "DONE"

DEFAULT_ENV = {
    "OMP_NUM_THREADS": "{omp_threads}",
    "PYTHONUNBUFFERED": "1",
    # Fail fast on a hung collective instead of hanging until the time limit.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "3",
    "TORCH_NCCL_AVOID_RECORD_STREAMS": "1",
    # Tensor-parallel communication overlaps GEMMs only with a single hardware queue.
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    "NCCL_DEBUG": "WARN",
    "NCCL_IB_TIMEOUT": "22",
    "NCCL_ASYNC_ERROR_HANDLING": "1",
}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m launch.slurm", description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--config-name", required=True, help="recipe in recipes/ (e.g. internvl1_5_26b_sft)")
    p.add_argument("--job-name", default=None)
    p.add_argument("--time", default="48:00:00", help="SLURM time limit")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--cpus-per-node", type=int, default=None, help="default: 12 per GPU")
    p.add_argument("--signal-seconds", type=int, default=600, help="checkpoint this long before the limit")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    p.add_argument("--venv", default=None, help="activate this virtual environment first")
    p.add_argument("--no-validate", action="store_true", help="skip composing/validating the recipe")
    p.add_argument("--python", default="python", help="python executable for the job")
    args, overrides = p.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        p.error(f"unknown option(s) {' '.join(unknown)}; Hydra overrides look like key=value")
    return args, overrides


def override_value(overrides: list[str], key: str) -> str | None:
    for item in overrides:
        k, sep, value = item.lstrip("+").partition("=")
        if sep and k == key:
            return value
    return None


def with_override(overrides: list[str], key: str, value: str) -> list[str]:
    """``overrides`` with ``key=value`` set (replacing a user value)."""
    kept = [o for o in overrides if o.lstrip("+").partition("=")[0] != key]
    return kept + [f"{key}={value}"]


def render_sbatch(args: argparse.Namespace, overrides: list[str], run_dir: str) -> str:
    """The sbatch script text."""
    job = args.job_name or f"mllm-{args.config_name}"
    cpus = args.cpus_per_node or 12 * args.gpus_per_node
    log_dir = f"{run_dir}/logs"
    overrides = with_override(overrides, "train.run_dir", run_dir)
    overrides = with_override(overrides, "checkpoint.resume", "auto")
    train_args = " ".join(shlex.quote(a) for a in [f"--config-name={args.config_name}", *overrides])
    sbatch = [
        f"#SBATCH --job-name={job}",
        f"#SBATCH --nodes={args.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={args.gpus_per_node}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={args.time}",
        "#SBATCH --exclusive",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{args.signal_seconds}",
        "#SBATCH --open-mode=append",
        f"#SBATCH --output={log_dir}/%x-%j.out",
    ]
    for flag, value in (("partition", args.partition), ("account", args.account), ("qos", args.qos)):
        if value:
            sbatch.append(f"#SBATCH --{flag}={value}")
    env = "\n".join(
        f"export {k}={v.format(omp_threads=max(1, cpus // args.gpus_per_node))}"
        for k, v in DEFAULT_ENV.items()
    )
    venv = f"source {shlex.quote(args.venv)}/bin/activate\n" if args.venv else ""
    q_run_dir = shlex.quote(run_dir)
    return f"""#!/bin/bash
{chr(10).join(sbatch)}
# Generated by: python -m launch.slurm {" ".join(shlex.quote(a) for a in sys.argv[1:])}
set -uo pipefail
{venv}RUN_DIR={q_run_dir}
mkdir -p "$RUN_DIR/logs"
rm -f "$RUN_DIR/{SAVE_AND_EXIT_FILE}"

{env}
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT={args.port}

# Before the time limit: ask the trainer to checkpoint and exit (it polls this file every step).
trap 'echo "$(date) USR1: requesting checkpoint"; touch "$RUN_DIR/{SAVE_AND_EXIT_FILE}"' USR1

# Slurm 22.05+ srun does not inherit the job's --cpus-per-task: pass it on, or all ranks share one CPU.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="$SLURM_CPUS_PER_TASK" \\
  --output="$RUN_DIR/logs/%x-%j-node%n.log" \\
  {args.python} -m torch.distributed.run \\
    --nnodes="$SLURM_NNODES" --nproc-per-node={args.gpus_per_node} \\
    --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \\
    --max-restarts=0 \\
    -m mllm.train {train_args} &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; RC=$?; done
wait "$SRUN_PID" 2>/dev/null; RC=${{RC:-$?}}

if [ -f "$RUN_DIR/{DONE_FILE}" ]; then
  echo "$(date) training finished"
  exit 0
fi
if [ -f "$RUN_DIR/{SAVE_AND_EXIT_FILE}" ]; then
  echo "$(date) checkpointed before the time limit: requeueing job $SLURM_JOB_ID (resumes from it)"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "$(date) training failed with exit code $RC (a node failure is requeued by SLURM itself)"
exit "$RC"
"""


def validate_recipe(config_name: str, overrides: list[str], world_size: int) -> None:
    """Compose the recipe and run every consistency check for ``world_size`` ranks (exits on error)."""
    from mllm.config import ConfigError, load_run_config, validate_run_config

    try:
        cfg = load_run_config(config_name, overrides)
        # The job runs on GPU nodes: check the fast-path keys for CUDA, not for this (login) node.
        validate_run_config(cfg, world_size, device_type="cuda")
    except ConfigError as exc:
        sys.exit(f"error: {exc}")


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = override_value(overrides, "train.run_dir") or f"runs/{args.config_name}"
    if not args.no_validate:
        validate_recipe(args.config_name, overrides, args.nodes * args.gpus_per_node)
    sys.stdout.write(render_sbatch(args, overrides, run_dir))


if __name__ == "__main__":
    main()
