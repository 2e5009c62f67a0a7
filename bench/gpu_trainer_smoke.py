"""The trainer itself on the GPU: a short ``tiny_sft`` run through ``mllm.train.run.run_training``.

Device run: bf16 autocast, ``model.attention_backend=flex`` (FlexAttention forward *and* backward in real steps),
FP8 (torchao), fused AdamW, the real data loader (pinned memory, non-blocking copies) on the synthetic dataset,
an asynchronous DCP save half-way (``train.stop_after``: the run stops there) and a second invocation that
resumes from it (``checkpoint.resume=auto``) to the end.

Reference: the same recipe, data and seed on the CPU in fp32 (SDPA, no FP8), straight through.

Check: the device loss curve tracks the CPU fp32 one: the mean over steps of |device - CPU| / CPU is at most
``MEAN_TOLERANCE`` (2%) and no single step is off by more than ``STEP_TOLERANCE`` (10%). Measured with the
CPU stand-in (bf16 autocast + emulated FP8, ``--smoke`` with 20 steps): mean 0.4%, worst step 5.3% (one batch;
the curves rejoin at the next step). A lost resume, a wrong mask or a broken optimizer step moves the curve
by far more. Also checked: the asynchronous save is complete on disk and the second invocation resumed from it
(its metrics continue at step ``steps/2 + 1``: a run that started over would log steps 1.. again).

On CPU (``bench/gpu_bench.py --smoke``) the same control flow runs with bf16 autocast, emulated FP8 and SDPA
(FlexAttention has no CPU backward) for fewer steps: it checks this script, not the GPU.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

MEAN_TOLERANCE = 2e-2  # mean over steps of |device loss - CPU fp32 loss| / CPU fp32 loss
STEP_TOLERANCE = 1e-1  # the same for any single step
BASE = [
    "logging.tensorboard=false",
    "logging.progress=off",
    "train.seed=0",
    "data.num_workers=0",
]


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    from mllm.train.metrics import read_metrics

    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def _train(overrides: list[str]) -> dict:
    from mllm.config import load_run_config, validate_run_config
    from mllm.train.run import run_training

    run = load_run_config("tiny_sft", BASE + overrides)
    validate_run_config(run, 1)
    with contextlib.redirect_stdout(io.StringIO()):  # the bench's stdout carries only its own lines
        return run_training(run)


def run_trainer_smoke(device: str, steps: int, work_dir: Path) -> dict:
    """Train ``steps`` steps on ``device`` (save + stop half-way, then resume) and on CPU in fp32; compare."""
    from mllm.data.synth import synth

    data = synth(work_dir / "data", num_samples=200, seed=0, progress=False)
    common = [f"data.path={data.meta}", f"data.tokenizer={data.tokenizer}", f"train.steps={steps}"]
    half = steps // 2
    gpu = device == "cuda"
    device_run = work_dir / "device"
    fast = [
        f"train.run_dir={device_run}",
        f"train.device={device}",
        "train.dtype=bf16",
        f"model.attention_backend={'flex' if gpu else 'sdpa'}",
        "fp8.enabled=true",
        "optim.implementation=fused",
        "checkpoint.async_save=true",
        f"checkpoint.every={half}",
    ]
    first = _train(common + fast + [f"train.stop_after={half}"])
    second = _train(common + fast + ["checkpoint.resume=auto"])
    reference = work_dir / "cpu_fp32"
    _train(
        common + [f"train.run_dir={reference}", "train.device=cpu", "train.dtype=fp32", "checkpoint.every=0"]
    )

    got, want = _losses(device_run), _losses(reference)
    all_steps = list(range(1, steps + 1))
    rel = [abs(a - b) / abs(b) for (_, a), (_, b) in zip(got, want)]
    saved = (device_run / "checkpoints" / f"step_{half:08d}" / "meta.json").is_file()
    resumed = first.get("stopped") is True and first["step"] == half and second["step"] == steps
    result = {
        "device": device,
        "steps": steps,
        "async_save_complete": saved,
        "resumed_at": half if resumed and [s for s, _ in got] == all_steps else None,
        "device_losses": [loss for _, loss in got],
        "cpu_fp32_losses": [loss for _, loss in want],
        "mean_rel_diff": sum(rel) / len(rel) if rel else None,
        "max_rel_diff": max(rel) if rel else None,
        "tolerance": {"mean": MEAN_TOLERANCE, "step": STEP_TOLERANCE},
    }
    result["pass"] = bool(
        saved
        and result["resumed_at"] == half
        and [s for s, _ in want] == all_steps
        and len(rel) == steps
        and result["mean_rel_diff"] <= MEAN_TOLERANCE
        and result["max_rel_diff"] <= STEP_TOLERANCE
    )
    return result
