#!/usr/bin/env bash
# One prepared single-GPU run of the fast path; no network, <= 8 minutes. Usage: bash bench/gpu.sh
# Needs: Python 3.10+ with torch (2.11 on our GPU machines) and Triton; this repo. torchao comes from the
# wheel in bench/wheels/ when it is not importable (unpacked into a private folder, nothing installed).
# Output: progress lines, a table, and a final JSON line (also written to $OUT/gpu_bench.log when $OUT is set).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
SITE="${TMPDIR:-/tmp}/mllm_gpu_site"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-${TMPDIR:-/tmp}/mllm_inductor}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

if ! "$PY" -c "import torchao.float8" 2>/dev/null; then
  WHEEL="$(ls "$REPO"/bench/wheels/torchao-*-py3-none-any.whl | sort -V | tail -1)"
  echo "# torchao not importable: using $(basename "$WHEEL") from bench/wheels (offline, unpacked to $SITE)"
  rm -rf "$SITE" && mkdir -p "$SITE"
  "$PY" -m zipfile -e "$WHEEL" "$SITE"
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi
"$PY" -c "import torch, torchao; print('# torch', torch.__version__, 'torchao', torchao.__version__, \
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name() if torch.cuda.is_available() else '')"

LOG="${OUT:-${TMPDIR:-/tmp}}/gpu_bench.log"
# --budget-s: no configuration starts after 300 s (one compiled config takes ~1.5 min), so the run ends inside 8 minutes.
timeout 475 "$PY" "$REPO/bench/gpu_bench.py" --budget-s "${BUDGET_S:-300}" "$@" 2>&1 | tee "$LOG"
