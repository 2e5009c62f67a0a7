"""Per-step metrics from rank 0: ``RUN_DIR/metrics.jsonl``, TensorBoard events, optionally Weights & Biases,
and the console (``mllm.train.console``: banner, a line every N steps, a progress bar on a terminal).

One JSON object per step with the fields in ``STEP_FIELDS`` (plus ``val_loss`` records from validation). The
file is only ever appended: after a resume from an earlier checkpoint the steps after it appear again, and the
last record of a step is the one that counts (``latest_per_step``).
"""

from __future__ import annotations

import json
import math
import resource
from pathlib import Path
from typing import Any

import torch

from mllm.train.console import Console

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


def latest_per_step(records: list[dict[str, Any]], key: str = "loss") -> list[dict[str, Any]]:
    """The records that carry ``key``, one per step (the last one written wins), in step order."""
    by_step = {int(r["step"]): r for r in records if key in r}
    return [by_step[s] for s in sorted(by_step)]


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
        print_every: int = 10,
        wandb_run: Any = None,
    ) -> None:
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.console = Console(enabled, total_steps, start_step, print_every, progress)
        self.records: list[dict[str, Any]] = []  # this invocation's step records (for the summary)
        self._file = None
        self._tb = None
        self._wandb = wandb_run
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a")  # appended, never truncated: nothing written before is lost
        if tensorboard:
            self._tb = _open_tensorboard(Path(run_dir) / "tensorboard")

    def log_step(self, record: dict[str, Any], extra: dict[str, float] | None = None) -> None:
        """Append one step record (fields of ``STEP_FIELDS``); ``extra`` goes to TensorBoard/W&B only."""
        if not self.enabled:
            return
        self.records.append(record)
        self.write(record, "train", extra)
        self.console.step(record)

    def write(self, record: dict[str, Any], section: str, extra: dict[str, float] | None = None) -> None:
        """One record to metrics.jsonl, and its numbers to TensorBoard/W&B under ``section/``."""
        if not self.enabled:
            return
        record = {k: _jsonable(v) for k, v in record.items()}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["step"])
        scalars = {
            (f"{section}/{k}" if section and "/" not in k else k): v
            for k, v in {**record, **(extra or {})}.items()
            if k != "step" and isinstance(v, (int, float))
        }
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def message(self, text: str) -> None:
        """A line for the user, above the progress bar when there is one."""
        self.console.say(text)

    def close(self) -> None:
        self.console.close()
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _open_tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard not installed: metrics.jsonl still has everything
        return None
    return SummaryWriter(log_dir=str(path))
