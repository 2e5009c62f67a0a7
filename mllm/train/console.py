"""What a person reads while a run trains: rank 0's start banner, one line every ``logging.print_every`` steps,
an end summary, and a rich progress bar on a terminal.

The lines are the same whether stdout is a terminal, a SLURM log or a pipe (``| tee``): the bar is an addition
for terminals, never the only output. Other ranks print nothing here; their warnings and log records carry a
``[rank N]`` prefix (``prefix_rank_output``) so interleaved output from many ranks stays attributable.
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from typing import Any


def format_duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def format_step(record: dict[str, Any], total_steps: int, eta_s: float | None) -> str:
    """``step 10/50 | loss 3.2101 | lr 1.20e-03 | grad 1.234 | 1,234 tok/s | 5.6 tiles/s | MFU 12.3% | ...``"""
    step_time = max(float(record["step_time"]), 1e-9)
    mfu = float(record["mfu"])
    parts = [
        f"step {record['step']}/{total_steps}",
        f"loss {float(record['loss']):.4f}",
        f"lr {float(record['lr']):.2e}",
        f"grad {float(record['grad_norm']):.3f}",
        f"{float(record['tokens_per_s']):,.0f} tok/s",
        f"{record['tiles'] / step_time:,.1f} tiles/s",
        f"MFU {100 * mfu:.1f}%" if mfu > 0 else "MFU n/a",
        f"mem {float(record['peak_mem']):.2f} GiB",
    ]
    if eta_s is not None:
        parts.append(f"ETA {format_duration(eta_s)}")
    return " | ".join(parts)


def mfu_note(peak_tflops: float, device_type: str) -> str | None:
    """Why MFU reads n/a, and the fix (no peak is known for CPUs or unlisted GPUs)."""
    if peak_tflops:
        return None
    return (
        f"MFU n/a: no peak TFLOP/s known for this {device_type} device; set logging.peak_tflops=<per-device "
        "dense peak> to report it (tflops_per_device is logged either way)"
    )


class Console:
    """Rank 0's human-readable output; every method is a no-op when ``enabled`` is false."""

    def __init__(
        self, enabled: bool, total_steps: int, start_step: int, print_every: int, progress: str
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.start_step = start_step
        self.print_every = max(1, print_every)
        self.t0 = time.perf_counter()
        self._progress = None
        self._task = None
        if enabled and (progress == "on" or (progress == "auto" and sys.stderr.isatty())):
            from rich.console import Console as RichConsole
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[status]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=RichConsole(stderr=True),
            )
            self._progress.start()
            self._task = self._progress.add_task("train", total=total_steps, completed=start_step, status="")

    def say(self, text: str) -> None:
        """A line for the user (above the bar when there is one)."""
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            print(text, flush=True)

    def eta(self, step: int) -> float | None:
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.perf_counter() - self.t0) / done * (self.total_steps - step)

    def step(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        step = int(record["step"])
        if self._progress is not None:
            status = f"loss {float(record['loss']):.4f} | {float(record['tokens_per_s']):,.0f} tok/s"
            self._progress.update(self._task, completed=step, status=status)
        if step % self.print_every == 0 or step == self.total_steps:
            self.say(format_step(record, self.total_steps, self.eta(step)))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None


def banner_lines(run: Any, layout: dict[str, int], device: str, dtype: str, resume: str) -> list[str]:
    """The start banner: what runs, on which layout and device, on what data, from where."""
    t, d = run.train, run.data
    accum = t.global_batch_size // (d.micro_batch_size * layout["dp"])
    shape = f"tp{layout['tp']} x pp{layout['pp']} x dp{layout['dp']} = {layout['world']} ranks"
    lines = [
        f"mllm train | {run.logging.run_name or 'run'} | {shape} on {device} ({dtype})",
        f"  steps {t.steps} | global batch {t.global_batch_size} rows of {d.seq_len} tokens "
        f"(micro {d.micro_batch_size} x accumulation {accum} x dp {layout['dp']}) | lr {run.optim.lr:g} "
        f"{run.optim.schedule}",
        f"  data {d.path} | tokenizer {d.tokenizer or '-'} | template {d.template}",
    ]
    if run.eval.data_path:
        lines.append(f"  validation {run.eval.data_path} every {run.eval.every or t.steps} steps")
    lines.append(f"  run dir {t.run_dir} | {resume}")
    return lines


def summary_line(result: dict[str, Any], records: list[dict[str, Any]], seconds: float) -> str:
    """The end summary: where the run ended, how long, loss and throughput of this invocation."""
    head = f"{'stopped' if result.get('stopped') else 'finished'} at step {result['step']}"
    parts = [head, f"{format_duration(seconds)} wall"]
    if records:
        first, last = records[0], records[-1]
        parts.append(f"loss {float(first['loss']):.4f} -> {float(last['loss']):.4f}")
        mean_tps = sum(float(r["tokens_per_s"]) for r in records) / len(records)
        parts.append(f"{mean_tps:,.0f} tok/s mean")
        parts.append(
            f"skipped steps {last.get('skipped_steps', 0)}, bad samples {last.get('bad_samples', 0)}"
        )
    return " | ".join(parts)


def prefix_rank_output(rank: int) -> None:
    """Prefix this process's Python warnings and log records with ``[rank N]`` (ranks other than 0)."""
    if rank == 0:
        return
    tag = f"[rank {rank}] "

    def showwarning(message, category, filename, lineno, file=None, line=None):
        text = warnings.formatwarning(message, category, filename, lineno, line)
        (file or sys.stderr).write(tag + text)

    warnings.showwarning = showwarning
    logging.basicConfig(format=f"{tag}%(levelname)s %(name)s: %(message)s")
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(f"{tag}%(levelname)s %(name)s: %(message)s"))
