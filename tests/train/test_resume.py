"""Exact resume: 2N straight == N + resume + N bit for bit (fp32, CPU) at tp2 and tp2 x pp2, resume into
another layout, non-finite step handling. Several runs share one set of spawned ranks to keep this fast."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))  # the shared rank launcher

from launcher import run_on_ranks  # noqa: E402

N = 3


def _run(overrides: list[str], poison: tuple[int, ...] = ()) -> dict:
    from fixtures import RowSource

    from mllm.config import load_run_config, validate_run_config
    from mllm.train.run import run_training

    base = [
        "data.path=unused",
        "data.seq_len=64",
        "train.global_batch_size=4",
        "logging.progress=off",
        "optim.warmup_steps=1",
        "model.image_token_id=1000",
        "checkpoint.every=0",
    ]
    run = load_run_config("tiny_sft", base + overrides)
    import torch.distributed as dist

    validate_run_config(run, dist.get_world_size())
    return run_training(run, functools.partial(RowSource, poison_steps=poison))


def _metrics(run_dir: Path) -> list[dict]:
    from mllm.train.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def straight_vs_resumed(rank: int, world: int, root: str, layout: list[str]) -> None:
    root_p = Path(root)
    _run([f"train.run_dir={root_p / 'straight'}", f"train.steps={2 * N}", *layout])
    _run([f"train.run_dir={root_p / 'resumed'}", f"train.steps={2 * N}", f"train.stop_after={N}", *layout])
    # A new run with the full step count resumes from the step-N checkpoint of the first half.
    _run([f"train.run_dir={root_p / 'resumed'}", f"train.steps={2 * N}", "checkpoint.resume=auto", *layout])


@pytest.mark.parametrize(
    "world, layout", [(2, ["parallel.tp=2"]), (4, ["parallel.tp=2", "parallel.pp=2"])], ids=["tp2", "tp2xpp2"]
)
def test_resume_is_bit_identical(tmp_path, world, layout):
    run_on_ranks(straight_vs_resumed, world, str(tmp_path), layout)
    straight, resumed = _metrics(tmp_path / "straight"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in straight] == list(range(1, 2 * N + 1))
    assert [r["step"] for r in resumed] == list(range(1, 2 * N + 1))
    for a, b in zip(straight, resumed):
        for key in ("loss", "grad_norm", "lr", "tokens", "tiles", "samples"):
            assert a[key] == b[key], (a["step"], key, a[key], b[key])  # bit-identical, no tolerance
    assert straight[-1]["loss"] < straight[0]["loss"]
    # Timing fields are present and sane.
    for key in ("step_time", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem", "bad_samples"):
        assert key in straight[0]
    assert straight[0]["tokens_per_s"] > 0 and straight[0]["tflops_per_device"] > 0


def tp2_then_dp2(rank: int, world: int, root: str) -> None:
    root_p = Path(root)
    _run([f"train.run_dir={root_p / 'tp2'}", f"train.steps={N + 1}", "parallel.tp=2"])
    _run(
        [
            f"train.run_dir={root_p / 'tp2b'}",
            f"train.steps={N + 1}",
            f"train.stop_after={N}",
            "parallel.tp=2",
            f"checkpoint.dir={root_p / 'ckpt'}",
        ]
    )
    _run(
        [
            f"train.run_dir={root_p / 'dp2'}",
            f"train.steps={N + 1}",
            "parallel.tp=1",
            f"checkpoint.dir={root_p / 'ckpt'}",
            "checkpoint.resume=auto",
        ]
    )


def test_resume_into_another_layout(tmp_path):
    run_on_ranks(tp2_then_dp2, 2, str(tmp_path))
    reference = _metrics(tmp_path / "tp2")[N]  # step N+1 of an uninterrupted tp2 run
    continued = _metrics(tmp_path / "dp2")
    assert [r["step"] for r in continued] == [N + 1]
    assert continued[0]["loss"] == pytest.approx(reference["loss"], abs=1e-5)
    assert continued[0]["grad_norm"] == pytest.approx(reference["grad_norm"], rel=1e-4)


def nonfinite(rank: int, world: int, root: str) -> str:
    root_p = Path(root)
    result = _run([f"train.run_dir={root_p / 'skip'}", "train.steps=3"], poison=(1,))
    assert result["step"] == 3
    try:
        _run(
            [f"train.run_dir={root_p / 'stop'}", "train.steps=5", "train.max_consecutive_nonfinite=2"],
            poison=(1, 2),
        )
    except Exception as exc:  # noqa: BLE001 - the message is the assertion
        return str(exc)
    return "no error"


def test_nonfinite_steps_are_skipped_then_stop(tmp_path):
    messages = run_on_ranks(nonfinite, 2, str(tmp_path))
    skip = _metrics(tmp_path / "skip")
    assert skip[1]["loss"] != skip[1]["loss"] or skip[1]["loss"] == "nan"  # the poisoned step is reported
    assert skip[1]["skipped_steps"] == 1 and skip[2]["skipped_steps"] == 1
    assert skip[2]["loss"] == pytest.approx(float(skip[2]["loss"]))  # finite again after the skip
    assert "step 2" in messages[0] and "2 consecutive steps" in messages[0] and "row8/a" in messages[0]
