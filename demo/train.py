"""``make demo`` steps 1-3: synthetic data, a tp2 x pp2 torchrun training run, and a resumed run.

torchrun runs as a subprocess exactly as a user would start it; its output is streamed (indented) and the loss
is printed from ``RUN_DIR/metrics.jsonl`` as the run writes it.
"""

from __future__ import annotations

import math
import os
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mllm.train.checkpoint import latest_checkpoint, read_meta
from mllm.train.metrics import read_metrics

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPE = "tiny_sft"
RESUMED_RE = re.compile(r"resumed from (\S+) at step (\d+)")


class DemoError(RuntimeError):
    """A demo step failed; the message is one line saying which and why."""


@dataclass
class RunResult:
    """One torchrun invocation: its new metrics records, the step it resumed from, its last checkpoint."""

    records: list[dict] = field(default_factory=list)
    resumed_from_step: int | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0

    @property
    def losses(self) -> list[float]:
        return [float(r["loss"]) for r in self.records]


def child_env() -> dict[str, str]:
    """The environment for subprocesses: this checkout importable, one thread per rank (4 ranks share the
    CPU cores; more threads only oversubscribe)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_synth(out_dir: Path, num_samples: int) -> None:
    """``python -m mllm.data synth OUT`` (its progress bar goes to the terminal)."""
    cmd = [sys.executable, "-m", "mllm.data", "synth", str(out_dir), "--num-samples", str(num_samples)]
    done = subprocess.run(cmd, env=child_env(), stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise DemoError(f"synthetic data: `{' '.join(cmd[1:])}` failed: {last_error_line(done.stderr)}")


def recipe_overrides(data_dir: Path, run_dir: Path, tp: int, pp: int) -> list[str]:
    """The overrides shared by the training runs and the export (which composes the same recipe)."""
    return [
        f"parallel.tp={tp}",
        f"parallel.pp={pp}",
        f"data.path={data_dir / 'meta.json'}",
        f"data.tokenizer={data_dir / 'tokenizer'}",
        f"train.run_dir={run_dir}",
    ]


def torchrun_command(nproc: int, overrides: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "-m",
        "mllm.train",
        f"--config-name={RECIPE}",
        *overrides,
    ]


def run_torchrun(
    cmd: list[str],
    run_dir: Path,
    total_steps: int,
    say: Callable[[str], None],
    loss_every: int,
    start_step: int = 0,
) -> RunResult:
    """Run ``cmd`` (a torchrun training invocation), echo its output and the loss of steps after
    ``start_step`` as it goes; the records it added to ``metrics.jsonl``, the step it resumed from (its
    "resumed from" line) and the last checkpoint."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1
    )
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True)
    reader.start()
    output: list[str] = []
    shown_step, resumed = start_step, None
    metrics = run_dir / "metrics.jsonl"
    while True:
        finished = proc.poll() is not None
        output += _drain(lines, say)
        if resumed is None:
            resumed = _resumed_step(output)
        shown_step = _show_losses(metrics, shown_step, start_step, total_steps, say, loss_every)
        if finished and not reader.is_alive():
            output += _drain(lines, say)
            break
        time.sleep(0.25)
    if proc.returncode != 0:
        raise DemoError(f"torchrun exited with {proc.returncode}: {last_error_line(''.join(output))}")
    first = resumed if resumed is not None else start_step
    records = [r for r in read_metrics(metrics) if r["step"] > first] if metrics.is_file() else []
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    return RunResult(records, resumed, ckpt, time.perf_counter() - start)


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _drain(lines: queue.Queue, say: Callable[[str], None]) -> list[str]:
    out = []
    while True:
        try:
            line = lines.get_nowait()
        except queue.Empty:
            return out
        if line is None:
            continue
        out.append(line)
        say("    | " + line.rstrip())


def _resumed_step(output: list[str]) -> int | None:
    for line in output:
        match = RESUMED_RE.search(line)
        if match:
            return int(match.group(2))
    return None


def _show_losses(
    metrics: Path, shown: int, floor: int, total: int, say: Callable[[str], None], every: int
) -> int:
    """Print the loss of every ``every``-th new step (and the last) written since step ``shown``."""
    if not metrics.is_file():
        return shown
    try:
        records = read_metrics(metrics)
    except ValueError:  # a line being written right now
        return shown
    for r in records:
        step = r["step"]
        if step <= max(shown, floor):
            continue
        if step % every == 0 or step == total or step == floor + 1:
            say(
                f"  step {step:>3}/{total}  loss {float(r['loss']):.4f}  lr {r['lr']:.2e}  "
                f"{r['step_time']:.2f} s/step  {r['samples']} samples"
            )
        shown = step
    return shown


ERROR_LINE_RE = re.compile(r"^(error: |([\w.]*(Error|Exception)): )")


def last_error_line(text: str) -> str:
    """The most telling line of a failed subprocess's output: the first error a worker printed (``error: ...``
    or an exception line; torchrun's own ChildFailedError only says that a worker failed), else the last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for line in lines:
        if ERROR_LINE_RE.match(line) and "ChildFailedError" not in line:
            return line[:300]
    return lines[-1][:300] if lines else "(no output)"


def checkpoint_step(ckpt: Path) -> int:
    return int(read_meta(ckpt)["step"])


def check_losses(losses: list[float], what: str) -> None:
    if not losses:
        raise DemoError(f"{what}: no metrics were written")
    bad = [i for i, x in enumerate(losses) if not math.isfinite(x)]
    if bad:
        raise DemoError(f"{what}: non-finite loss at record {bad[0]} ({losses[bad[0]]})")
