#!/usr/bin/env bash
# One prepared single-GPU run of the fast path, inside 8 minutes, nothing from the network. Usage:
#   bash bench/gpu.sh                 # on one H100/H200: torch (2.11 on our GPU machines) + Triton; this repo
#   bash bench/gpu.sh --smoke         # the same control flow on CPU with a small model (checks the script)
# torchao comes from the wheel in bench/wheels/ when it is not importable (unpacked into a private folder by
# the benchmark itself, nothing installed). Everything, that set-up included, runs in ONE Python process under
# ONE timeout: SIGTERM at BENCH_TIMEOUT_S (default 450 s) makes it print the table and the summary JSON line of
# what finished; SIGKILL follows 10 s later at the latest, so the script ends within 460 s < 8 min.
# Output: progress lines, a table, and the summary JSON as the last line; a copy in $OUT/gpu_bench.log and
# every finished row, as it finishes, in $OUT/gpu_bench_rows.jsonl ($OUT defaults to bench/out/).
set -uo pipefail  # no -e: a failing step is reported by the benchmark, not fatal
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT_DIR="${OUT:-$REPO/bench/out}"
mkdir -p "$OUT_DIR"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/mllm_inductor}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
BENCH_T0="$(date +%s.%N)"  # the benchmark's time budget counts from here
export BENCH_T0

# Benchmark steps start only in the first 270 s, the trainer smoke only before 330 s (gpu_bench.py --budget-s,
# --trainer-smoke-by-s): that leaves 2-3 minutes for the steps started last (a compiled step of the full-width
# slice and the trainer smoke are expected to take 1-2 minutes each; not measured yet, no GPU so far).
timeout --kill-after=10 "${BENCH_TIMEOUT_S:-450}" "$PY" "$REPO/bench/gpu_bench.py" "$@" 2>&1 |
  tee -a "$OUT_DIR/gpu_bench.log"
exit "${PIPESTATUS[0]}"
