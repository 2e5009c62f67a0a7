"""GPU fast-path keys in the trainer config: FP8 (torchao, emulated on CPU) trains like fp32 at tp2; settings
that cannot run on the chosen device fail with one line before any process group exists."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch.distributed as dist
from scenarios import make_trainer, scenario_result

from mllm.config import load_run_config
from mllm.train.fast_path import FastPathError, validate_fast_path
from mllm.train.metrics import read_metrics

STEPS = 2


def fp8_vs_fp32(rank: int, world: int, root: str) -> dict:
    out = {}
    for name, extra in (("fp32", []), ("fp8", ["fp8.enabled=true"])):
        trainer = make_trainer(
            [f"train.run_dir={Path(root) / name}", f"train.steps={STEPS}", "parallel.tp=2", *extra]
        )
        trainer.fit()
        out[name] = trainer.fast_path.get("fp8", [])
        out[f"{name}_optimizer"] = type(trainer.optimizer).__name__, trainer.optimizer.defaults.get("foreach")
    return out


def test_fp8_training_runs_and_tracks_fp32(world2):
    root, (result, _) = scenario_result(world2, "fp8")
    converted = result["fp8"]
    # Edge LLM layers, the projector and the output layer stay in BF16; the middle layers and the ViT run FP8.
    assert "llm.layers.1.mlp.up_proj" in converted and "vision.layers.0.attn.q_proj" in converted
    assert not any(
        n.startswith(("llm.layers.0.", "llm.layers.3.", "projector.", "lm_head")) for n in converted
    )
    assert result["fp32"] == []
    assert result["fp32_optimizer"] == ("AdamW", True)  # optim.implementation=auto: foreach on CPU
    fp32, fp8 = read_metrics(root / "fp32" / "metrics.jsonl"), read_metrics(root / "fp8" / "metrics.jsonl")
    assert [r["step"] for r in fp8] == list(range(1, STEPS + 1))
    for a, b in zip(fp32, fp8, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=2e-2), a["step"]
        assert b["loss"] != a["loss"]  # FP8 really ran (rounding changes the loss a little)
    assert (root / "fp8" / "checkpoints" / f"step_{STEPS:08d}" / "meta.json").is_file()


def _run(*overrides: str):
    return load_run_config("tiny_sft", ["data.path=unused", *overrides])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["fp8.enabled=true", "fp8.emulate=false"], "fp8.emulate=false needs CUDA FP8 GEMMs"),
        (["model.attention_backend=flex"], "model.attention_backend='flex' cannot train on CPU"),
        (["model.attention_backend=flash"], "model.attention_backend='flash' cannot train on CPU"),
        (["optim.implementation=fastest"], "optim.implementation='fastest': use one of auto, fused"),
        (
            ["fp8.enabled=true", "fp8.recipe=delayed"],
            "fp8.recipe='delayed' is not a recipe of parallel.layer",
        ),
        (["fp8.enabled=true", "parallel.layer_backend=te", "fp8.recipe=current"], "needs CUDA"),
    ],
)
def test_settings_that_cannot_run_here_fail_in_one_line(overrides, message):
    with pytest.raises(FastPathError, match=message) as exc:
        validate_fast_path(_run(*overrides), "cpu")
    assert "\n" not in str(exc.value)


def test_validation_happens_before_any_process_group():
    from mllm.train.run import run_training

    with pytest.raises(FastPathError, match="model.attention_backend"):
        run_training(_run("model.attention_backend=flex", "train.device=cpu"))
    assert not dist.is_initialized()


def test_valid_fast_path_settings_pass():
    validate_fast_path(_run("fp8.enabled=true", "optim.implementation=fused", "train.compile=true"), "cpu")
    validate_fast_path(_run("model.attention_backend=flex", "fp8.enabled=true"), "cuda")
    validate_fast_path(_run("fp8.enabled=true", "parallel.layer_backend=te", "fp8.recipe=delayed"), "cuda")
