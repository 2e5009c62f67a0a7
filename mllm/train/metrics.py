"""Per-step metrics from rank 0: ``RUN_DIR/metrics.jsonl``, TensorBoard events and a progress bar with ETA.

One JSON object per step with the fields in ``STEP_FIELDS``. On resume the file is cut back to the resumed
step so it always reads as one run (steps strictly increasing), whatever crashes happened before.
"""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

import torch

STEP_FIELDS = (
    "step",
    "loss",
    "grad_norm",
    "lr",
    "tokens",
    "tiles",
    "samples",
    "bad_samples",
    "truncated_samples",  # kept but cut to data.seq_len (data.too_long=truncate)
    "step_time",
    "tokens_per_s",
    "tflops_per_device",
    "mfu",
    "peak_mem",  # GiB: max allocated on the accelerator, max RSS of the process on CPU
)


def peak_memory_gib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl file, in order."""
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep only the records with ``step <= last_step`` (called on resume)."""
    if not path.is_file():
        return
    kept = [r for r in read_metrics(path) if r.get("step", 0) <= last_step]
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
    tmp.replace(path)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep the record valid
    return value


class MetricsLogger:
    """Writes step records on rank 0; a no-op on other ranks."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool,
        total_steps: int,
        start_step: int = 0,
        tensorboard: bool = True,
        progress: str = "auto",
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._file = None
        self._tb = None
        self._bar = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        truncate_metrics(self.path, start_step)
        self._file = open(self.path, "a")
        if tensorboard:
            self._tb = _open_tensorboard(Path(run_dir) / "tensorboard")
        if progress == "on" or (progress == "auto" and sys.stderr.isatty()):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def log_step(self, record: dict[str, Any], extra: dict[str, float] | None = None) -> None:
        """Append one step record (fields of ``STEP_FIELDS``); ``extra`` goes to TensorBoard only."""
        if not self.enabled:
            return
        loss = record.get("loss", float("nan"))
        record = {k: _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["step"])
        if self._tb is not None:
            for key, value in {**record, **(extra or {})}.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(f"train/{key}" if "/" not in key else key, value, step)
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
            self._bar.update(1)

    def message(self, text: str) -> None:
        """A line for the user, above the progress bar when there is one."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _open_tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
        return None
    return SummaryWriter(log_dir=str(path))
