"""A trainer checkpoint exports directly: ``python -m mllm.convert export-hf STEP_DIR OUT --format ...`` in a
fresh single process (no process group), using the ``model_config.json`` every checkpoint carries. Reference:
the weights the tp2 trainer held in memory after its last step (gathered from the live ranks, not via DCP)."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from fixtures import make_row
from scenarios import make_trainer, portable, restored, scenario_result

import mllm.hf
from demo.hf import our_logits, transformers_logits
from mllm.convert import core
from mllm.convert.__main__ import main as convert_main
from mllm.convert.trainer_checkpoint import MODEL_CONFIG_FILE, RUN_CONFIG_FILE, read_model_config

ROOT = Path(__file__).resolve().parents[2]
STEPS = 2


def train_tp2_for_export(rank: int, world: int, root: str) -> dict:
    # Saved asynchronously (every step): the exported weights also check the background save.
    overrides = ["checkpoint.async_save=true", "checkpoint.every=1", "parallel.tp=2"]
    trainer = make_trainer([f"train.run_dir={root}", f"train.steps={STEPS}", *overrides])
    trainer.fit()
    trained = portable(trainer.pm.full_state_dict(all_stages=True))
    return {"state_dict": trained, "model": trainer.run.model} if rank == 0 else {}


@pytest.fixture(scope="module")
def trained(world2):
    run_dir, (result, _) = scenario_result(world2, "export")
    result["state_dict"] = restored(result["state_dict"])
    return run_dir / "checkpoints" / f"step_{STEPS:08d}", result


def _question(cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """The first sample of a training row: text around one 56 px tile's 4 image tokens."""
    row = make_row(7, 0, 64)
    first = row["segment_ids"][0] == 1
    return row["input_ids"][0][first][None], row["pixel_values"]


def test_checkpoint_records_its_configs(trained):
    ckpt, result = trained
    assert read_model_config(ckpt) == result["model"]
    run = yaml.safe_load((ckpt / RUN_CONFIG_FILE).read_text())
    assert run["parallel"]["tp"] == 2 and run["train"]["steps"] == STEPS and "fp8" in run
    assert (ckpt / MODEL_CONFIG_FILE).is_file()


def test_cli_export_loads_in_transformers_with_the_trained_logits(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt, result = trained
    out = tmp_path / "hf"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "mllm.convert", "export-hf", str(ckpt), str(out), "--format", "transformers"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    ours = mllm.hf.model_from_state_dict(result["state_dict"], result["model"]).eval()
    ids, pixels = _question(result["model"])
    assert int((ids == result["model"].image_token_id).sum()) == 4
    want, got = our_logits(ours, ids, pixels), transformers_logits(hf_model, ids, pixels)
    assert want.shape == got.shape and want.abs().max() > 0
    assert (want - got).abs().max().item() <= 1e-4
    # mllm.hf.load reads the trainer checkpoint directly too.
    loaded = mllm.hf.load(ckpt)
    assert torch.equal(our_logits(loaded, ids, pixels), want)


def test_cli_export_internvl_chat_holds_the_trained_weights(trained, tmp_path):
    ckpt, result = trained
    out = tmp_path / "chat"
    assert convert_main(["export-hf", str(ckpt), str(out), "--format", "internvl_chat"]) == 0
    sd, cfg = core.read_checkpoint(out)
    assert dataclasses.replace(cfg, hf_extra={}) == result["model"]  # hf_extra: InternVL-Chat's own keys
    assert sorted(sd) == sorted(result["state_dict"])
    for key, want in result["state_dict"].items():
        assert torch.equal(sd[key], want), key


def test_export_of_a_directory_without_model_config_says_how(trained, tmp_path):
    ckpt, _ = trained
    import shutil

    old = tmp_path / "old"
    shutil.copytree(ckpt, old)
    (old / MODEL_CONFIG_FILE).unlink()
    with pytest.raises(ValueError, match="model_config.json not found.*read_trainer_checkpoint"):
        core.read_checkpoint(old)
