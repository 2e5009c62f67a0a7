"""``bench/gpu.sh`` in its CPU smoke mode: the control flow of the one-shot GPU run (a failing step, a SIGTERM
mid-run, the trainer smoke) and its summary arithmetic. Speed is not checked here (no GPU)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

from gpu_report import add_rates, speedups_and_mfu  # noqa: E402


def _smoke(tmp_path: Path, *args: str, script: str = "gpu.sh") -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    cmd = ["--smoke", "--warmup", "1", "--iters", "1", *args]
    if script == "gpu.sh":
        cmd = ["bash", str(REPO / "bench" / "gpu.sh"), *cmd]
    else:
        cmd = [sys.executable, str(REPO / "bench" / script), *cmd]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)


def _rows_file(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "gpu_bench_rows.jsonl").read_text().splitlines()]


def test_failed_step_and_sigterm_still_give_rows_table_and_json(tmp_path: Path) -> None:
    """fp8 compiled fails, parity gets SIGTERM (as from ``timeout``) mid-step: the finished rows, the table and
    the summary JSON (last line) still come out, and the rows are on disk as they finished."""
    done = _smoke(
        tmp_path,
        "--steps", "bf16+compile,fp8_tensorwise+compile,bf16,parity",
        "--inject", "fp8_tensorwise+compile=error",
        "--inject", "parity=sigterm",
        "--trainer-steps", "4",
    )  # fmt: skip
    assert done.returncode == 128 + signal.SIGTERM, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert summary["interrupted"] == "SIGTERM"
    rows = {r["name"]: r for r in summary["rows"]}
    assert list(rows) == ["bf16+compile", "fp8_tensorwise+compile", "bf16"]
    assert rows["bf16+compile"]["fwd_bwd_s"] > 0 and rows["bf16"]["fwd_bwd_s"] > 0
    assert (
        rows["fp8_tensorwise+compile"]["error"] == "RuntimeError: injected failure in fp8_tensorwise+compile"
    )
    assert summary["parity"]["error"].startswith("interrupted by SIGTERM")
    assert summary["not_run"] == ["trainer_smoke"]
    # No compiled FP8 row: no headline speedup (and never eager FP8 against compiled BF16).
    assert summary["fp8_speedup_vs_bf16"] is None and summary["fp8_speedup_vs_bf16_eager"] is None
    table = "\n".join(lines[:-1])
    assert "config" in table and "fwd+bwd ms" in table
    assert "fp8_tensorwise+compile     RuntimeError: injected failure" in table
    assert "FP8 speedup over BF16 (fwd+bwd): compiled null" in table

    on_disk = _rows_file(tmp_path)
    assert [(r["kind"], r.get("name")) for r in on_disk] == [
        ("row", "bf16+compile"),
        ("row", "fp8_tensorwise+compile"),
        ("row", "bf16"),
        ("parity", None),
        ("summary", None),
    ]
    assert on_disk[-1]["interrupted"] == "SIGTERM"
    assert (tmp_path / "gpu_bench.log").read_text().strip().splitlines()[-1] == lines[-1]


def test_trainer_smoke_saves_resumes_and_tracks_cpu_fp32(tmp_path: Path) -> None:
    """The trainer part on CPU: bf16 + emulated FP8 + fused AdamW, async save at step 2, stop, resume to 4;
    its losses against the fp32 run of the same steps."""
    done = _smoke(tmp_path, "--steps", "", "--trainer-steps", "4", script="gpu_bench.py")
    assert done.returncode == 0, done.stderr[-2000:]
    smoke = json.loads(done.stdout.strip().splitlines()[-1])["trainer_smoke"]
    assert smoke["async_save_complete"] and smoke["resumed_at"] == 2
    assert len(smoke["device_losses"]) == len(smoke["cpu_fp32_losses"]) == 4
    assert smoke["device_losses"] != smoke["cpu_fp32_losses"]  # bf16/FP8 really ran
    assert smoke["pass"], smoke


def _row(name: str, precision: str, compile_: bool, fwd_bwd_s: float) -> dict:
    return {"name": name, "precision": precision, "compile": compile_, "fwd_bwd_s": fwd_bwd_s, "optim_s": 0.5}


def test_speedup_compares_only_rows_of_one_compile_mode() -> None:
    rows = [_row("bf16+compile", "bf16", True, 2.0), _row("fp8_tensorwise", "fp8_tensorwise", False, 1.0)]
    for r in rows:
        add_rates(r, 1e15, 1000.0)
    s = speedups_and_mfu(rows)
    assert s["fp8_speedup_vs_bf16"] is None and s["fp8_speedup_vs_bf16_eager"] is None
    rows.append(add_rates(_row("fp8_rowwise+compile", "fp8_rowwise", True, 1.6), 1e15, 1000.0))
    rows.append(add_rates(_row("fp8_tensorwise+compile", "fp8_tensorwise", True, 1.25), 1e15, 1000.0))
    s = speedups_and_mfu(rows)
    assert s["fp8_speedup_vs_bf16"] == pytest.approx(2.0 / 1.25)
    assert s["fp8_speedup_compiled_rows"] == ["fp8_tensorwise+compile", "bf16+compile"]
    # 1 PFLOP in 2 s = 500 TFLOP/s = 50% of a 1000 TFLOP/s peak; with the 0.5 s AdamW step: 1e15 / 2.5 s = 40%.
    assert s["bf16_mfu_fwd_bwd_compiled"] == pytest.approx(0.5)
    assert s["bf16_mfu_step_compiled"] == pytest.approx(0.4)
    assert rows[-1]["mfu_peak"] == "dense BF16 1000 TFLOP/s"
