#!/bin/bash
# Plain multi-node torchrun (no SLURM). Run the same command on every node:
#   MASTER_ADDR=node0 NNODES=2 GPUS_PER_NODE=8 launch/torchrun_multinode.sh internvl1_5_26b_sft data.path=... train.run_dir=...
# The first node hosts the c10d rendezvous; a failed worker group restarts up to 3 times and resumes from the
# latest complete checkpoint.
set -euo pipefail
RECIPE=${1:?usage: $0 RECIPE [key=value ...]}
shift
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export TORCH_NCCL_ASYNC_ERROR_HANDLING=3 CUDA_DEVICE_MAX_CONNECTIONS=1 PYTHONUNBUFFERED=1
exec python -m torch.distributed.run \
  --nnodes="${NNODES:?set NNODES}" --nproc-per-node="${GPUS_PER_NODE:-8}" \
  --rdzv-id="${RDZV_ID:-mllm}" --rdzv-backend=c10d --rdzv-endpoint="${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  --max-restarts="${MAX_RESTARTS:-3}" \
  -m mllm.train --config-name="$RECIPE" checkpoint.resume=auto "$@"
