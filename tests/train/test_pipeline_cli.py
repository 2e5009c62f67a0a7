"""End to end from the CLI: ``parallel.pp=4`` with the ViT over stages 0 and 1 (and tile-balanced packing)
trains on 4 CPU ranks and checkpoints; the run resumes into pp 2 (ViT back on stage 0) on 2 ranks; the last
checkpoint exports to transformers and reloads with the weights the checkpoint holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import mllm.hf
from mllm.convert.trainer_checkpoint import read_trainer_checkpoint

REPO = Path(__file__).resolve().parents[2]


def _torchrun(nproc: int, overrides: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += ["-m", "mllm.train", "--config-name=tiny_sft", "logging.progress=off", *overrides]
    with open(log, "w") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=600)
    assert proc.returncode == 0, log.read_text()[-3000:]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_pp4_vit_over_stages_trains_resumes_into_pp2_and_exports(synth, tmp_path) -> None:  # noqa: F811
    run_dir = tmp_path / "run"
    common = [
        f"data.path={synth / 'meta.json'}",
        f"data.tokenizer={synth / 'tokenizer'}",
        f"train.run_dir={run_dir}",
        "checkpoint.every=2",
    ]
    pp4 = [
        "parallel.pp=4",
        "parallel.vision_layers_per_stage=[1,1,0,0]",
        "parallel.layers_per_stage=[0,1,2,1]",
        "data.tiles_per_row=-1",  # tile-balanced packing through the real loader
    ]
    _torchrun(4, [*common, *pp4, "train.steps=2"], tmp_path / "pp4.log")
    first = _records(run_dir)
    assert [r["step"] for r in first] == [1, 2]
    assert all(0.0 <= r["vision_pad"] < 1.0 for r in first)  # tiles padded between the two ViT stages
    assert (run_dir / "checkpoints" / "step_00000002").is_dir()

    _torchrun(2, [*common, "parallel.pp=2", "train.steps=4", "checkpoint.resume=auto"], tmp_path / "pp2.log")
    records = _records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)

    step = run_dir / "checkpoints" / "step_00000004"
    out = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "mllm.convert", "export-hf", str(step), str(out), "--format", "transformers"]
    subprocess.run(cmd, env=env, check=True, capture_output=True, timeout=300)
    stored, _ = read_trainer_checkpoint(step)
    exported = mllm.hf.load(out).state_dict()
    assert set(stored) <= set(exported)
    for name, tensor in stored.items():
        torch.testing.assert_close(exported[name].float(), tensor, rtol=0, atol=0, msg=name)
