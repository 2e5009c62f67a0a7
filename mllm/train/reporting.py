"""The trainer's reporting hooks: open the metric sinks and print the start banner, log validation, print the
end summary. Kept out of ``trainer.py`` so the loop reads as a loop."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch.distributed as dist

from mllm.train.console import banner_lines, mfu_note, summary_line
from mllm.train.metrics import MetricsLogger
from mllm.train.validation import Validator


def open_wandb(run: Any, enabled: bool) -> Any:
    """A W&B run on rank 0 when ``logging.wandb`` is on (``logging.wandb_mode=offline`` needs no network)."""
    if not (enabled and run.logging.wandb):
        return None
    import wandb  # presence checked by validate_run_config (logging.wandb=true without the package)
    from omegaconf import OmegaConf

    return wandb.init(
        project=run.logging.wandb_project,
        name=run.logging.run_name or None,
        dir=str(Path(run.train.run_dir)),
        mode=run.logging.wandb_mode,
        config=OmegaConf.to_container(OmegaConf.structured(run)),
    )


def dataset_bad_counts(trainer: Any) -> dict[str, dict[str, int]]:
    """{dataset: {"seen": n, "bad": n}} summed over data-parallel replicas (a collective on every rank);
    empty for batch sources without a ``PackedLoader``."""
    loader = getattr(trainer.batches, "loader", None)
    counter = getattr(loader, "bad_samples", None)
    mine = (
        {}
        if counter is None
        else {
            d: {"seen": int(counter.seen[d]), "bad": int(sum(counter.bad.get(d, {}).values()))}
            for d in counter.seen
        }
    )
    if trainer.mesh.dp == 1:
        return mine
    gathered: list = [None] * trainer.mesh.dp
    dist.all_gather_object(gathered, mine, group=trainer.mesh.dp_group)
    total: dict[str, dict[str, int]] = {}
    for part in gathered:
        for d, c in part.items():
            entry = total.setdefault(d, {"seen": 0, "bad": 0})
            entry["seen"] += c["seen"]
            entry["bad"] += c["bad"]
    return total


class RunReporter:
    """Everything the loop reports: banner, step records (+ per-dataset bad-sample counts), validation, the
    end summary. Every rank calls every method (some are collectives); only rank 0 writes."""

    def __init__(self, trainer: Any, resume_from: Path | None) -> None:
        run = trainer.run
        rank0 = trainer.rank == 0
        self.trainer = trainer
        self.logger = MetricsLogger(
            trainer.run_dir,
            rank0,
            run.train.steps,
            trainer.step,
            run.logging.tensorboard,
            run.logging.progress,
            run.logging.print_every,
            open_wandb(run, rank0),
        )
        self.validator = Validator(trainer)
        resume = (
            f"resumed from {resume_from} at step {trainer.step}" if resume_from else "fresh start at step 0"
        )
        dtype = str(trainer.dtype).replace("torch.", "")
        for line in banner_lines(run, trainer.layout(), trainer.device.type, dtype, resume):
            self.message(line)
        note = mfu_note(trainer.peak_tflops, trainer.device.type)
        if note:
            self.message("  " + note)

    def message(self, text: str) -> None:
        self.logger.message(text)

    def log_step(self, record: dict[str, Any]) -> None:
        counts = dataset_bad_counts(self.trainer)
        if counts:
            record = {**record, "bad_samples_per_dataset": {d: c["bad"] for d, c in counts.items()}}
        extra = {f"data/{d}/{k}": float(v) for d, c in counts.items() for k, v in c.items()}
        self.logger.log_step(record, extra)

    def after_step(self, step: int) -> None:
        """Validation when due (``eval.every``, and after the last step)."""
        if not self.validator.due(step):
            return
        values = self.validator.run()
        self.logger.write({"step": step, **values}, "")
        shown = " | ".join(f"{k} {v:.4f}" for k, v in values.items())
        self.message(f"step {step}/{self.trainer.run.train.steps} | {shown}")

    def finish(self, result: dict[str, Any]) -> None:
        self.message(summary_line(result, self.logger.records, time.perf_counter() - self.logger.console.t0))

    def close(self) -> None:
        self.logger.close()
