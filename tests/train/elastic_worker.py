"""A torchrun worker for test_elastic_restart.py: attempt 0's rank 1 fails after a collective; in attempt 1 the
new rank 0 reaches ``init_distributed`` late, so rank 1 finds the dead attempt's gloo address in torchrun's
shared store first unless the store is private to the attempt."""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist

from mllm.train.setup import init_distributed

attempt, rank = int(os.environ["TORCHELASTIC_RESTART_COUNT"]), int(os.environ["RANK"])
if attempt == 1 and rank == 0:
    time.sleep(3)
init_distributed(torch.device("cpu"), timeout_s=60)
x = torch.ones(1)
dist.all_reduce(x)
print(f"attempt {attempt} rank {rank} all_reduce {x.item():g}", flush=True)
if attempt == 0 and rank == 1:
    sys.exit(1)
dist.destroy_process_group()
