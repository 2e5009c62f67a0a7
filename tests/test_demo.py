"""``make demo``'s code path, short (6 + 2 steps on 4 CPU ranks, tp2 x pp2), checked against independent
references: the trainer's own logged loss for the checkpoint loader, and our model's logits for the export."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch

from demo.hf import load_checkpoint_model, our_logits, transformers_logits
from demo.run import DemoOptions, main, run_demo
from demo.train import RECIPE, recipe_overrides
from mllm.config import load_run_config
from mllm.data.loader import PackedLoader
from mllm.model.loss import reference_loss
from mllm.train.data import batch_to_dict

transformers = pytest.importorskip("transformers")

STEPS, RESUME_STEPS = 6, 2


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    work = tmp_path_factory.mktemp("demo")
    lines: list[str] = []
    result = run_demo(DemoOptions(STEPS, RESUME_STEPS, work, num_samples=300), say=lines.append)
    return result, lines


@pytest.fixture(scope="module")
def run_config(demo):
    result, _ = demo
    return load_run_config(RECIPE, recipe_overrides(result.data_dir, result.run_dir, 2, 2))


def test_losses_finite_and_resume_continues_after_checkpoint(demo):
    result, lines = demo
    assert [r["step"] for r in result.train.records] == list(range(1, STEPS + 1))
    assert all(math.isfinite(x) for x in result.train.losses + result.resumed.losses)
    assert result.checkpoint_step == STEPS == result.resumed.resumed_from_step
    assert [r["step"] for r in result.resumed.records] == list(range(STEPS + 1, STEPS + RESUME_STEPS + 1))
    # metrics.jsonl is appended: the resumed run continues after the checkpoint step, nothing is lost
    logged = [json.loads(x)["step"] for x in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, STEPS + RESUME_STEPS + 1))
    assert any(f"at step {STEPS}" in line for line in lines)  # the trainer's "resumed from" line was shown
    assert isinstance(result.answer, str) and result.new_tokens >= 1


def test_checkpoint_loader_reproduces_the_trainers_loss(demo, run_config):
    """Our single-device model loaded from the step-6 checkpoint, on the micro-batches of step 7 (the loader
    state saved with it), gives the loss the tp2 x pp2 trainer logged for step 7 (before its update)."""
    result, _ = demo
    ckpt = result.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    model = load_checkpoint_model(ckpt, run_config.model)
    loader = PackedLoader(run_config.data, 0, 1, rows_per_step=run_config.train.global_batch_size)
    loader.load_state_dict(torch.load(ckpt / "extra" / "rank_00000.pt", weights_only=False)["data"])
    grad_accum = run_config.train.global_batch_size // run_config.data.micro_batch_size
    micro = [batch_to_dict(next(loader)) for _ in range(grad_accum)]
    with torch.no_grad():
        loss = float(reference_loss(model, micro, run_config.parallel.loss_mode))
    logged = result.resumed.records[0]
    assert logged["step"] == STEPS + 1
    assert abs(loss - logged["loss"]) <= 1e-4, (loss, logged["loss"])


def _first_image_sample(loader: PackedLoader, image_token_id: int, num_image_token: int):
    """(input_ids [1, L], pixel_values) of the first sample of a micro-batch that has an image."""
    for _ in range(20):
        mb = batch_to_dict(next(loader))
        first = mb["segment_ids"][0] == 1
        ids = mb["input_ids"][0][first][None]
        tiles = int((ids == image_token_id).sum()) // num_image_token
        if tiles:
            return ids, mb["pixel_values"][:tiles]  # the first sample's tiles come first
    raise AssertionError("no image sample in 20 micro-batches")


def test_export_logits_equal_trained_model(demo, run_config):
    result, _ = demo
    assert result.logits_max_diff <= 1e-4
    ckpt = result.run_dir / "checkpoints" / f"step_{STEPS + RESUME_STEPS:08d}"
    ours = load_checkpoint_model(ckpt, run_config.model)
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(result.hf_dir).eval()
    assert type(hf_model).__name__ == "InternVLForConditionalGeneration"
    loader = PackedLoader(run_config.data, 0, 1)
    ids, pixels = _first_image_sample(
        loader, run_config.model.image_token_id, run_config.data.num_image_token
    )
    want, got = our_logits(ours, ids, pixels), transformers_logits(hf_model, ids, pixels)
    assert want.shape == got.shape and want.abs().max() > 0
    assert (want - got).abs().max().item() <= 1e-4


def test_export_refuses_a_checkpoint_of_another_model(demo, run_config, tmp_path):
    result, _ = demo
    ckpt = result.run_dir / "checkpoints" / f"step_{STEPS:08d}"
    other = copy.deepcopy(run_config.model)
    other.text.num_layers += 1
    with pytest.raises(ValueError, match=r"does not hold the recipe's model \(missing llm\.layers\.4"):
        load_checkpoint_model(ckpt, other)
    with pytest.raises(ValueError, match="not a trainer checkpoint"):
        load_checkpoint_model(Path(tmp_path), other)


def test_bad_arguments_exit_with_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--steps", "0"])
    assert exc.value.code == 2
    assert "--steps >= 2" in capsys.readouterr().err


def test_failure_reason_is_the_workers_error_not_torchruns():
    from demo.train import last_error_line

    out = "step 1\nTraceback (most recent call last):\n  File 'x'\nValueError: data.path is empty\n"
    out += "torch.distributed.elastic.multiprocessing.errors.ChildFailedError:\n====\n"
    assert last_error_line(out) == "ValueError: data.path is empty"
    assert last_error_line("no error here\nlast line\n") == "last line"
