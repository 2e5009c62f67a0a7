"""Rows, table and summary of ``bench/gpu_bench.py``, written so that a run cut short still reports.

- Every finished row is appended at once as one JSON line to ``$OUT/gpu_bench_rows.jsonl`` (``bench/out/`` when
  ``$OUT`` is unset), flushed and fsynced: whatever kills the process later, the rows done are on disk.
- ``Report.install_signal_handlers()``: on SIGTERM (``timeout``) or SIGINT the handler marks the row in flight
  as interrupted, prints the table and the summary JSON line and exits (status 128 + signal).
- The summary is honest about what it compares: FP8 speedups only between rows of the same compile mode
  (``null`` when either row is missing), MFU of forward+backward and of the whole step (with the AdamW step),
  each row naming the peak its MFU is measured against.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ROWS_FILE = "gpu_bench_rows.jsonl"


def out_dir() -> Path:
    """``$OUT`` when set (the device machine's return folder), else ``bench/out/``."""
    path = Path(os.environ["OUT"]) if os.environ.get("OUT") else REPO / "bench" / "out"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _write_stdout(text: str) -> None:
    """Write to fd 1 directly: safe inside a signal handler that may interrupt a ``print`` (a buffered write
    would raise "reentrant call")."""
    data = text.encode()
    while data:
        data = data[os.write(1, data) :]


class Report:
    """The run's rows and sections (parity, trainer smoke); the JSON-lines file; the final table and summary."""

    def __init__(
        self, meta: dict, slice_desc: str, rows_path: Path | None = None, start: float | None = None
    ) -> None:
        self.start = time.time() if start is None else start  # wall-clock start (gpu.sh's, preamble included)
        self.meta = meta  # card, date, versions, peak_bf16_tflops, slice_tflop_per_step, ...
        self.slice_desc = slice_desc
        self.rows: list[dict] = []
        self.sections: dict[str, dict] = {}
        self.current: tuple[str, bool] | None = None  # (step in flight, is a section), for the signal handler
        self.interrupted: str | None = None
        self.planned: list[str] = []  # every step's name, in run order (for "not_run" when interrupted)
        self.rows_path = rows_path or out_dir() / ROWS_FILE
        self.run_id = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())

    def elapsed(self) -> float:
        return time.time() - self.start

    # -- recording ---------------------------------------------------------------------------------------
    def _append_line(self, record: dict) -> None:
        with open(self.rows_path, "a") as f:
            f.write(json.dumps({"run": self.run_id, **record}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_row(self, row: dict) -> None:
        """A throughput row (``fwd_bwd_s`` etc., or ``error``/``skipped``): kept, logged to disk, printed."""
        self.rows.append(row)
        self._append_line({"kind": "row", **row})
        print(f"# {json.dumps(row)}", flush=True)

    def add_section(self, name: str, result: dict) -> None:
        """A non-throughput step (``parity``, ``trainer_smoke``)."""
        self.sections[name] = result
        self._append_line({"kind": name, **result})
        print(f"# {name}: {json.dumps(result)}", flush=True)

    # -- the end -----------------------------------------------------------------------------------------
    def summary(self) -> dict:
        return {
            **self.meta,
            "rows": self.rows,
            **self.sections,
            **speedups_and_mfu(self.rows),
            "interrupted": self.interrupted,
            "not_run": self.not_run() if self.interrupted else [],
            "elapsed_s": round(self.elapsed(), 1),
        }

    def not_run(self) -> list[str]:
        done = {r["name"] for r in self.rows} | set(self.sections)
        return [name for name in self.planned if name not in done]

    def final_text(self) -> str:
        return table(self.rows, self.meta, self.slice_desc) + "\n" + json.dumps(self.summary()) + "\n"

    def finish(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_IGN)  # the report is being written: no second one
        text = self.final_text()
        self._append_line({"kind": "summary", **self.summary()})
        sys.stdout.flush()
        _write_stdout(text)

    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        self.interrupted = name
        if self.current is not None:  # the step in flight is reported as interrupted, not silently lost
            step, section = self.current
            error = {"error": f"interrupted by {name} after {self.elapsed():.0f} s"}
            if section:
                self.sections[step] = error
                self._append_line({"kind": step, **error})
            else:
                self.rows.append({"name": step, **error})
                self._append_line({"kind": "row", "name": step, **error})
        try:
            sys.stdout.flush()
        except Exception:  # noqa: BLE001 - interrupted mid-print: the report goes out through fd 1 anyway
            pass
        _write_stdout(f"\n# {name} after {self.elapsed():.0f} s: reporting what finished\n")
        self.finish()
        os._exit(128 + signum)


# -- summary ----------------------------------------------------------------------------------------------
def _measured(rows: list[dict], fp8: bool, compiled: bool) -> list[dict]:
    """Measured torch-backend rows of one precision family and compile mode (TE rows are not compared)."""
    return [
        r
        for r in rows
        if "fwd_bwd_s" in r
        and r.get("backend", "torch") == "torch"
        and r["precision"].startswith("fp8") == fp8
        and r["compile"] == compiled
    ]


def speedups_and_mfu(rows: list[dict]) -> dict:
    """FP8 over BF16 (forward+backward time) within each compile mode, and the BF16 MFU of each mode.

    The headline ``fp8_speedup_vs_bf16`` is the compiled one (FP8 needs compilation to be fast): null when the
    compiled BF16 or every compiled FP8 row is missing; it never mixes an eager row with a compiled one.
    """
    out: dict = {}
    for mode, compiled in (("compiled", True), ("eager", False)):
        bf16, fp8 = _measured(rows, False, compiled), _measured(rows, True, compiled)
        best_bf16 = min(bf16, key=lambda r: r["fwd_bwd_s"]) if bf16 else None
        best_fp8 = min(fp8, key=lambda r: r["fwd_bwd_s"]) if fp8 else None
        ratio = best_bf16["fwd_bwd_s"] / best_fp8["fwd_bwd_s"] if best_bf16 and best_fp8 else None
        out[f"fp8_speedup_vs_bf16_{mode}"] = ratio
        out[f"fp8_speedup_{mode}_rows"] = [best_fp8["name"], best_bf16["name"]] if ratio else None
        out[f"bf16_mfu_fwd_bwd_{mode}"] = best_bf16["mfu_fwd_bwd"] if best_bf16 else None
        out[f"bf16_mfu_step_{mode}"] = best_bf16["mfu_step"] if best_bf16 else None
    out["fp8_speedup_vs_bf16"] = out["fp8_speedup_vs_bf16_compiled"]
    return out


def add_rates(row: dict, flops: float, peak_tflops: float) -> dict:
    """TFLOP/s and MFU of a measured row. ``flops``: model FLOPs of one forward+backward (causal attention as
    the triangle computed). ``mfu_step`` divides by forward+backward+AdamW time. Every row, FP8 included, is
    measured against the dense BF16 peak, and says so (``mfu_peak``)."""
    row["tflops"] = flops / row["fwd_bwd_s"] / 1e12
    row["mfu_fwd_bwd"] = row["tflops"] / peak_tflops if peak_tflops else None
    step_s = row["fwd_bwd_s"] + row["optim_s"]
    row["mfu_step"] = flops / step_s / 1e12 / peak_tflops if peak_tflops else None
    row["mfu_peak"] = f"dense BF16 {peak_tflops:g} TFLOP/s" if peak_tflops else "unknown card: no MFU"
    return row


# -- table ------------------------------------------------------------------------------------------------
def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x * 100:.1f}%"


def table(rows: list[dict], meta: dict, slice_desc: str) -> str:
    lines = [
        f"\nslice: {slice_desc} on {meta['card']}; {meta['slice_tflop_per_step']:.2f} TFLOP per fwd+bwd "
        f"(causal attention as computed); MFU against the dense BF16 peak ({meta['peak_bf16_tflops']:g} "
        "TFLOP/s), FP8 rows included",
        f"{'config':<26}{'fwd+bwd ms':>11}{'TFLOP/s':>9}{'MFU fb':>8}{'MFU step':>9}{'AdamW ms':>9}"
        f"{'mem GiB':>8}{'setup s':>8}",
    ]
    for r in rows:
        if "fwd_bwd_s" not in r:
            lines.append(f"{r['name']:<26} {r.get('error') or r.get('skipped')}")
            continue
        lines.append(
            f"{r['name']:<26}{r['fwd_bwd_s'] * 1e3:>11.1f}{r['tflops']:>9.1f}{_pct(r['mfu_fwd_bwd']):>8}"
            f"{_pct(r['mfu_step']):>9}{r['optim_s'] * 1e3:>9.1f}{r['peak_mem_gib']:>8.1f}{r['setup_s']:>8.1f}"
        )
    s = speedups_and_mfu(rows)
    fmt = lambda x: "null (a row is missing)" if x is None else f"{x:.2f}x"  # noqa: E731
    lines.append(
        f"FP8 speedup over BF16 (fwd+bwd): compiled {fmt(s['fp8_speedup_vs_bf16_compiled'])}, "
        f"eager {fmt(s['fp8_speedup_vs_bf16_eager'])}"
    )
    return "\n".join(lines)
