"""End to end from the command line: ``parallel.dp_shard=2`` under torchrun trains tiny_sft on the synthetic
data, stops with a checkpoint, resumes from it, finishes, and its checkpoint exports to the transformers
format with the trained weights. ``parallel.layout=auto`` picks the planner's layout and refuses, in one line
naming the smallest world size that fits, when none does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[2]

STEPS = 4


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def _torchrun(tmp_path, synth_dir, run_dir, *extra: str) -> str:  # noqa: F811
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "mllm.train", "--config-name=tiny_sft", f"data.path={synth_dir / 'meta.json'}",
           f"data.tokenizer={synth_dir / 'tokenizer'}", "parallel.dp_shard=2", f"train.run_dir={run_dir}",
           f"train.steps={STEPS}", "checkpoint.every=2", "logging.progress=off", *extra]  # fmt: skip
    done = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


def test_dp_shard_trains_checkpoints_resumes_and_exports(tmp_path, synth):  # noqa: F811
    run_dir = tmp_path / "run"
    _torchrun(tmp_path, synth, run_dir, "train.stop_after=2")
    output = _torchrun(tmp_path, synth, run_dir, "checkpoint.resume=auto")
    assert "resumed from" in output and "step_00000002" in output, output[-2000:]
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all(r["loss"] == r["loss"] for r in records)  # finite
    step_dir = run_dir / "checkpoints" / f"step_{STEPS:08d}"
    assert json.loads((step_dir / "meta.json").read_text())["layout"]["dp_shard"] == 2
    out = tmp_path / "hf"
    import mllm.hf
    from mllm.convert import core
    from mllm.convert.__main__ import main as convert

    assert convert(["export-hf", str(step_dir), str(out), "--format", "transformers"]) in (0, None)
    exported = mllm.hf.load(out).state_dict()
    trained, _ = core.read_checkpoint(step_dir)
    for name, tensor in trained.items():
        assert torch.equal(exported[name], tensor), name


def _dry_run(monkeypatch, capsys, *args: str, world: int) -> SimpleNamespace:
    """``python -m mllm.train --config-name=tiny_sft --dry-run --json ARGS`` in this process."""
    from mllm.train.__main__ import main

    monkeypatch.setenv("WORLD_SIZE", str(world))
    code = main(["--config-name=tiny_sft", "--dry-run", "--json", *args])
    out = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out.out, stderr=out.err)


def test_layout_auto_picks_the_planners_best_layout(monkeypatch, capsys):
    from mllm.config import load_run_config
    from mllm.train.planner_search import plan_layout

    args = ("parallel.layout=auto", "parallel.gpu_memory_gib=2.4", "train.global_batch_size=8")
    done = _dry_run(monkeypatch, capsys, *args, world=4)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    best = plan_layout(load_run_config("tiny_sft", ["train.global_batch_size=8"]), 4, 2.4)
    assert report["layout"] == best.layout()
    assert "parallel.layout=auto: tp" in done.stdout
    assert report["max_rank_gib"] <= 2.4


def test_layout_auto_names_the_smallest_world_size_that_fits(monkeypatch, capsys):
    from mllm.config import load_run_config
    from mllm.train.plan_report import AUTO_HEADROOM
    from mllm.train.planner_search import plan_layout

    budget = 2.6  # GiB, 2 of them the CUDA/NCCL allowance: one rank cannot hold tiny_sft's 32k-token rows
    overrides = ["data.seq_len=32768", "train.global_batch_size=8"]
    args = ("parallel.layout=auto", f"parallel.gpu_memory_gib={budget}", *overrides)
    done = _dry_run(monkeypatch, capsys, *args, world=1)
    assert done.returncode == 2
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith("error: parallel.layout=auto: no layout") and "smallest world size" in line, line
    smallest = int(line.split("smallest world size that fits is ")[1].split()[0])
    run = load_run_config("tiny_sft", overrides)
    usable = budget * AUTO_HEADROOM  # layout=auto keeps a margin for the estimate's error
    assert plan_layout(run, smallest, usable) is not None
    assert all(plan_layout(run, w, usable) is None for w in range(1, smallest))


def test_search_json_lists_fitting_layouts_fastest_first(monkeypatch, capsys):
    done = _dry_run(monkeypatch, capsys, "--search", "--gpu-memory", "80", world=8)
    assert done.returncode == 0, done.stderr
    layouts = json.loads(done.stdout.strip().splitlines()[-1])["layouts"]
    assert layouts and all(x["max_rank_gib"] <= 80 for x in layouts)
    times = [x["est_step_s"] for x in layouts]
    assert times == sorted(times)
    for key in ("layout", "max_rank_gib", "ranks", "flops_per_step", "est_step_s"):
        assert key in layouts[0]
    assert all("total_gib" in r for r in layouts[0]["ranks"])
