"""Print an sbatch script that trains a recipe on SLURM: ``srun`` + ``torchrun`` with c10d rendezvous.

    python -m launch.slurm --nodes 2 --gpus-per-node 8 --config-name=internvl1_5_26b_sft \
        train.run_dir=/ckpt/sft data.path=/data/meta.json > job.sbatch && sbatch job.sbatch
    python -m launch.slurm --nodes 2 --gpus-per-node 0 --procs-per-node 2 --config-name=tiny_sft ...  # CPU, gloo

What the script does:
- one ``torchrun`` per node (``srun --ntasks-per-node=1``), rendezvous on the first node's address (its
  ``NodeAddr``, resolved to an IP: node names need not resolve), ``--max-restarts`` (default 2) to recover from a
  crashed rank inside the job, ``checkpoint.resume=auto`` so every start continues from the newest intact
  checkpoint;
- preemption and time limits: SLURM sends SIGTERM to the job steps on preemption and ``scancel``
  (https://slurm.schedmd.com/scancel.html); torchrun forwards it to the trainer, which saves at the next step
  boundary and writes ``RUN_DIR/STOPPED``. ``--signal=B:USR1@SECONDS`` (https://slurm.schedmd.com/sbatch.html)
  signals the batch shell before the time limit; it touches ``RUN_DIR/save_and_exit`` (and a SIGTERM to the
  shell is forwarded to srun). After a stop the script requeues the job (``scontrol requeue``); ``--requeue``
  lets SLURM itself requeue after a node failure. A program that fails after its restarts is not requeued;
- finished means ``RUN_DIR/DONE`` holds the recipe's ``train.steps`` (a stale DONE of a shorter run does not
  count);
- a watchdog fails the job when rank 0's ``RUN_DIR/heartbeat`` (rewritten every step) is older than
  ``--heartbeat-timeout`` seconds, and ``MLLM_COLLECTIVE_TIMEOUT_S`` makes a rank whose peer hangs fail;
- explicit working directory (``--chdir``), ``PYTHONPATH`` (this checkout) and environment; the log directory
  is created now, since SLURM opens ``--output`` before the script runs;
- containers: ``--container-image`` (pyxis, https://github.com/NVIDIA/pyxis) or ``--apptainer IMAGE``
  (``apptainer exec``); ``--setup`` lines (e.g. ``module load cuda``) and ``--sbatch`` lines are added verbatim.
The recipe is composed and validated for the job's world size before the script is printed; data paths only
need to exist on the cluster (a warning when they are not found here).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

SAVE_AND_EXIT_FILE = "save_and_exit"  # mllm.train.signals.STOP_FILE
STOPPED_FILE = "STOPPED"  # mllm.train.signals.STOPPED_FILE
HEARTBEAT_FILE = "heartbeat"  # mllm.train.signals.HEARTBEAT_FILE
DONE_FILE = "DONE"
SOURCE_ROOT = Path(__file__).resolve().parents[1]

DEFAULT_ENV = {
    "PYTHONUNBUFFERED": "1",
}
GPU_ENV = {
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
    p.add_argument(
        "--gpus-per-node", type=int, required=True, help="0: a CPU job (gloo), see --procs-per-node"
    )
    p.add_argument("--procs-per-node", type=int, default=None, help="ranks per node (default: one per GPU)")
    p.add_argument("--config-name", required=True, help="recipe in recipes/ (e.g. internvl1_5_26b_sft)")
    p.add_argument("--job-name", default=None)
    p.add_argument("--time", default="48:00:00", help="SLURM time limit")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument(
        "--cpus-per-task", type=int, default=None, help="CPUs per node's task (default: all of the node's)"
    )
    p.add_argument("--signal-seconds", type=int, default=600, help="checkpoint this long before the limit")
    p.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node")
    p.add_argument("--max-restarts", type=int, default=2, help="torchrun restarts after a failed rank")
    p.add_argument(
        "--heartbeat-timeout", type=int, default=1800, help="fail the job after this long w/o a step"
    )
    p.add_argument(
        "--collective-timeout", type=int, default=600, help="seconds before a hung collective fails"
    )
    p.add_argument("--workdir", default=None, help="the job's working directory (default: the current one)")
    p.add_argument("--venv", default=None, help="activate this virtual environment first")
    p.add_argument(
        "--setup", action="append", default=[], help="a shell line run first, e.g. 'module load x'"
    )
    p.add_argument(
        "--sbatch",
        action="append",
        default=[],
        help="an extra #SBATCH option: --sbatch=--mem=0 or --sbatch mem=0",
    )
    p.add_argument("--container-image", default=None, help="pyxis: run srun's tasks in this image")
    p.add_argument("--container-mounts", default=None, help="pyxis: --container-mounts (default: workdir)")
    p.add_argument("--apptainer", default=None, help="run the trainer with apptainer exec IMAGE")
    p.add_argument("--no-exclusive", action="store_true", help="do not ask for whole nodes")
    p.add_argument("--no-validate", action="store_true", help="skip validating the recipe")
    p.add_argument("--python", default="python", help="python executable for the job")
    args, overrides = p.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("--")]
    if unknown:
        p.error(f"unknown option(s) {' '.join(unknown)}; Hydra overrides look like key=value")
    if args.gpus_per_node < 0 or (args.gpus_per_node == 0 and not args.procs_per_node):
        p.error("--gpus-per-node 0 (a CPU job) needs --procs-per-node N")
    if args.container_image and args.apptainer:
        p.error("choose one of --container-image (pyxis) and --apptainer")
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


def procs_per_node(args: argparse.Namespace) -> int:
    return args.procs_per_node or args.gpus_per_node


def sbatch_lines(args: argparse.Namespace, output: str, workdir: str) -> list[str]:
    job = args.job_name or f"mllm-{args.config_name}"
    lines = [f"--job-name={job}", f"--nodes={args.nodes}", "--ntasks-per-node=1"]
    if args.gpus_per_node:
        lines.append(f"--gpus-per-node={args.gpus_per_node}")
    if args.cpus_per_task:
        lines.append(f"--cpus-per-task={args.cpus_per_task}")
    lines += [f"--time={args.time}"] + ([] if args.no_exclusive else ["--exclusive"])
    lines += [
        "--requeue",
        f"--signal=B:USR1@{args.signal_seconds}",
        "--open-mode=append",
        f"--output={output}",
        f"--chdir={workdir}",
        "--export=ALL",
    ]
    for flag, value in (("partition", args.partition), ("account", args.account), ("qos", args.qos)):
        if value:
            lines.append(f"--{flag}={value}")
    extra = [line if line.startswith("-") else f"--{line}" for line in args.sbatch]
    return [f"#SBATCH {line}" for line in lines + extra]


def launcher_prefix(args: argparse.Namespace, workdir: str, run_dir: str) -> tuple[str, str]:
    """(extra srun options, a command prefix) for the container options."""
    if args.container_image:
        mounts = args.container_mounts or ",".join(dict.fromkeys([workdir, str(Path(run_dir).resolve())]))
        srun = (
            f"--container-image={shlex.quote(args.container_image)} --container-mounts={shlex.quote(mounts)} "
        )
        return srun + f"--container-workdir={shlex.quote(workdir)} ", ""
    if args.apptainer:
        nv = "--nv " if args.gpus_per_node else ""
        return "", f"apptainer exec {nv}--bind {shlex.quote(workdir)} {shlex.quote(args.apptainer)} "
    return "", ""


def render_sbatch(
    args: argparse.Namespace, overrides: list[str], run_dir: str, target_step: int, output: str | None = None
) -> str:
    """The sbatch script text (``output``: SLURM's log file, default ``RUN_DIR/logs/%x-%j.out``)."""
    workdir = args.workdir or str(Path.cwd())
    nproc = procs_per_node(args)
    overrides = with_override(overrides, "train.run_dir", run_dir)
    overrides = with_override(overrides, "checkpoint.resume", "auto")
    if not args.gpus_per_node and override_value(overrides, "train.device") is None:
        overrides = with_override(overrides, "train.device", "cpu")
    train_args = " ".join(shlex.quote(a) for a in [f"--config-name={args.config_name}", *overrides])
    env = {**DEFAULT_ENV, **(GPU_ENV if args.gpus_per_node else {})}
    env["MLLM_COLLECTIVE_TIMEOUT_S"] = str(args.collective_timeout)
    exports = "\n".join(f"export {k}={v}" for k, v in env.items())
    setup = "".join(f"{line}\n" for line in args.setup)
    venv = f"source {shlex.quote(args.venv)}/bin/activate\n" if args.venv else ""
    srun_opts, prefix = launcher_prefix(args, workdir, run_dir)
    q = shlex.quote
    return f"""#!/bin/bash
{chr(10).join(sbatch_lines(args, output or f"{run_dir}/logs/%x-%j.out", workdir))}
# Generated by: python -m launch.slurm {" ".join(q(a) for a in sys.argv[1:])}
set -uo pipefail
cd {q(workdir)}
{setup}{venv}RUN_DIR={q(run_dir)}
TARGET_STEP={target_step}
HEARTBEAT_TIMEOUT={args.heartbeat_timeout}
mkdir -p "$RUN_DIR/logs"
rm -f "$RUN_DIR/{SAVE_AND_EXIT_FILE}" "$RUN_DIR/{STOPPED_FILE}" "$RUN_DIR/{HEARTBEAT_FILE}" "$RUN_DIR/HUNG"

export PYTHONPATH={q(str(SOURCE_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}
{exports}
CPUS=${{SLURM_CPUS_PER_TASK:-${{SLURM_CPUS_ON_NODE:-{nproc}}}}}
export OMP_NUM_THREADS=$(( CPUS / {nproc} > 0 ? CPUS / {nproc} : 1 ))
# The first node's address: its NodeAddr (the name SLURM reaches it by), resolved to an IP if it is a name.
MASTER_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_ADDR=$(scontrol show node "$MASTER_NODE" | sed -n 's/.*NodeAddr=\\([^ ]*\\).*/\\1/p' | head -n 1)
if ! [[ "$MASTER_ADDR" =~ ^[0-9.]+$ || "$MASTER_ADDR" == *:* ]]; then
  MASTER_ADDR=$(getent ahostsv4 "${{MASTER_ADDR:-$MASTER_NODE}}" | awk 'NR == 1 {{print $1}}')
fi
export MASTER_ADDR MASTER_PORT={args.port}
echo "$(date) job $SLURM_JOB_ID (restart ${{SLURM_RESTART_COUNT:-0}}) on $SLURM_JOB_NODELIST, rendezvous $MASTER_ADDR:$MASTER_PORT"

# Before the time limit (USR1) or on a TERM to this shell: ask the trainer to checkpoint and exit.
trap 'echo "$(date) USR1: requesting a checkpoint"; touch "$RUN_DIR/{SAVE_AND_EXIT_FILE}"' USR1
trap 'echo "$(date) TERM: requesting a checkpoint"; touch "$RUN_DIR/{SAVE_AND_EXIT_FILE}"; kill -TERM "$SRUN_PID" 2>/dev/null' TERM

# Slurm 22.05+ srun does not inherit the job's --cpus-per-task: pass it on, or all ranks share one CPU.
srun --kill-on-bad-exit=1 --ntasks-per-node=1 --cpus-per-task="$CPUS" {srun_opts}\\
  --output="$RUN_DIR/logs/%x-%j-node%n.log" \\
  {prefix}{args.python} -m torch.distributed.run \\
    --nnodes="$SLURM_NNODES" --nproc-per-node={nproc} \\
    --rdzv-id="$SLURM_JOB_ID" --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \\
    --max-restarts={args.max_restarts} \\
    -m mllm.train {train_args} &
SRUN_PID=$!

# Watchdog: a hung rank stops rank 0's heartbeat (every step); end the job instead of waiting for the limit.
(
  START=$(date +%s)
  while sleep 5; do
    LAST=$(stat -c %Y "$RUN_DIR/{HEARTBEAT_FILE}" 2>/dev/null || echo "$START")
    if [ $(( $(date +%s) - LAST )) -gt "$HEARTBEAT_TIMEOUT" ]; then
      echo "$(date) no training step for over $HEARTBEAT_TIMEOUT s: ending the job" > "$RUN_DIR/HUNG"
      kill -TERM "$SRUN_PID"; sleep 1; kill -TERM "$SRUN_PID"; exit 0
    fi
  done
) &
WATCHDOG_PID=$!

# `wait` returns early when a trapped signal arrives; keep waiting for srun itself.
RC=0
while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID"; RC=$?; done
kill "$WATCHDOG_PID" 2>/dev/null

if [ -f "$RUN_DIR/{DONE_FILE}" ] && [ "$(cat "$RUN_DIR/{DONE_FILE}")" -ge "$TARGET_STEP" ]; then
  echo "$(date) training finished at step $TARGET_STEP"
  exit 0
fi
if [ -f "$RUN_DIR/HUNG" ]; then
  cat "$RUN_DIR/HUNG"
  exit 1
fi
if [ -f "$RUN_DIR/{STOPPED_FILE}" ]; then
  echo "$(date) checkpointed at step $(cat "$RUN_DIR/{STOPPED_FILE}"): requeueing job $SLURM_JOB_ID"
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
fi
echo "$(date) training failed with exit code $RC (a node failure is requeued by SLURM itself)"
exit "$RC"
"""


def compose_recipe(args: argparse.Namespace, overrides: list[str]):
    """The composed run config, validated for the job's world size unless ``--no-validate`` (exits on error).
    Data paths are checked only for existence here, with a warning: they usually exist only on the cluster."""
    from mllm.config import ConfigError, load_run_config, validate_run_config

    try:
        cfg = load_run_config(args.config_name, overrides)
        if not args.no_validate:
            # The job runs on the cluster's nodes: check the fast-path keys for their device, not this one.
            device = "cuda" if args.gpus_per_node else "cpu"
            validate_run_config(cfg, args.nodes * procs_per_node(args), need_data=False, device_type=device)
    except ConfigError as exc:
        sys.exit(f"error: {exc}")
    for key, value in (("data.path", cfg.data.path), ("data.tokenizer", cfg.data.tokenizer)):
        if value and "://" not in value and not Path(value).exists():
            print(
                f"warning: {key}={value} does not exist here; it must exist on the cluster", file=sys.stderr
            )
    return cfg


def log_output(run_dir: str) -> str:
    """SLURM's ``--output``: ``RUN_DIR/logs`` created now (SLURM opens the file before the script runs), or
    the working directory when the run directory cannot be created on this machine."""
    try:
        Path(run_dir, "logs").mkdir(parents=True, exist_ok=True)
        return f"{run_dir}/logs/%x-%j.out"
    except OSError as exc:
        print(
            f"warning: cannot create {run_dir}/logs here ({exc.strerror}): SLURM logs go to the job's "
            "working directory",
            file=sys.stderr,
        )
        return "%x-%j.out"


def main(argv: list[str] | None = None) -> None:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    run_dir = override_value(overrides, "train.run_dir") or f"runs/{args.config_name}"
    cfg = compose_recipe(args, overrides)
    sys.stdout.write(render_sbatch(args, overrides, run_dir, cfg.train.steps, log_output(run_dir)))


if __name__ == "__main__":
    main()
