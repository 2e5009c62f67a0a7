"""Exact resume: 2N straight == N + resume + N bit for bit (fp32, CPU) at tp2 and tp2 x pp2 (and dp2 with a
ZeRO-1 sharded optimizer), resume into another layout, non-finite step handling.

The scenarios run in the session's shared spawned rank groups (``conftest.py``); each scenario's error is
reported by its own test.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
from conftest import N
from scenarios import run_config, scenario_result


def _run(overrides: list[str], poison: tuple[int, ...] = ()) -> dict:
    from fixtures import RowSource

    from mllm.train.run import run_training

    return run_training(run_config(overrides), functools.partial(RowSource, poison_steps=poison))


def _metrics(run_dir: Path) -> list[dict]:
    from mllm.train.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def straight_vs_resumed(rank: int, world: int, root: str, layout: list[str]) -> None:
    root_p = Path(root)
    _run([f"train.run_dir={root_p / 'straight'}", f"train.steps={2 * N}", *layout])
    _run([f"train.run_dir={root_p / 'resumed'}", f"train.steps={2 * N}", f"train.stop_after={N}", *layout])
    # A new run with the full step count resumes from the step-N checkpoint of the first half.
    _run([f"train.run_dir={root_p / 'resumed'}", f"train.steps={2 * N}", "checkpoint.resume=auto", *layout])


def straight_run(rank: int, world: int, root: str, layout: list[str]) -> None:
    _run([f"train.run_dir={Path(root) / 'straight'}", f"train.steps={2 * N}", *layout])


@pytest.mark.parametrize("group, name", [("world2", "tp2"), ("world4", "tp2xpp2")])
def test_resume_is_bit_identical(request, group, name):
    tmp_path, _ = scenario_result(request.getfixturevalue(group), name)
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


def test_resume_into_another_layout(world2):
    tmp_path, _ = scenario_result(world2, "layout_change")
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


def test_nonfinite_steps_are_skipped_then_stop(world2):
    tmp_path, messages = scenario_result(world2, "nonfinite")
    skip = _metrics(tmp_path / "skip")
    assert skip[1]["loss"] != skip[1]["loss"] or skip[1]["loss"] == "nan"  # the poisoned step is reported
    assert skip[1]["skipped_steps"] == 1 and skip[2]["skipped_steps"] == 1
    assert skip[2]["loss"] == pytest.approx(float(skip[2]["loss"]))  # finite again after the skip
    assert "step 2" in messages[0] and "2 consecutive steps" in messages[0] and "row8/a" in messages[0]


def _owned_states(overrides: list[str]) -> tuple[int, int]:
    """(parameters whose AdamW state this rank holds, trainable parameters) of a fresh trainer."""
    from fixtures import RowSource

    from mllm.config import load_run_config
    from mllm.train import state
    from mllm.train.trainer import Trainer

    trainer = Trainer(load_run_config("tiny_sft", ["data.path=unused", *overrides]), RowSource)
    return len(state._owned(trainer.pm, trainer.optimizer)), len(list(trainer.pm.trainable_parameters()))


def sharded_optimizer_runs(rank: int, world: int, root: str) -> tuple[int, int]:
    root_p = Path(root)
    zero = ["parallel.tp=1", "parallel.shard_optimizer=true"]  # dp2, ZeRO-1
    _run([f"train.run_dir={root_p / 'straight'}", f"train.steps={2 * N}", *zero])
    _run([f"train.run_dir={root_p / 'resumed'}", f"train.steps={2 * N}", f"train.stop_after={N}", *zero])
    _run([f"train.run_dir={root_p / 'resumed'}", f"train.steps={2 * N}", "checkpoint.resume=auto", *zero])
    _run([f"train.run_dir={root_p / 'plain'}", f"train.steps={2 * N}", "parallel.tp=1"])
    # The sharded checkpoint of step N continued by the unsharded optimizer (same checkpoint format).
    _run(
        [
            f"train.run_dir={root_p / 'unsharded_from_zero'}",
            f"train.steps={2 * N}",
            "parallel.tp=1",
            f"checkpoint.dir={root_p / 'resumed' / 'checkpoints'}",
            f"checkpoint.resume={root_p / 'resumed' / 'checkpoints' / f'step_{N:08d}'}",
            "checkpoint.save_final=false",
        ]
    )
    return _owned_states(zero)


def test_sharded_optimizer_resume_is_exact_and_matches_unsharded(world2):
    tmp_path, owned = scenario_result(world2, "zero_dp2")
    (own0, total), (own1, total1) = owned
    assert total == total1 and own0 + own1 == total and 0 < own0 < total  # each rank holds a part
    straight, resumed, plain = (_metrics(tmp_path / d) for d in ("straight", "resumed", "plain"))
    assert [r["step"] for r in resumed] == list(range(1, 2 * N + 1))
    for a, b in zip(straight, resumed, strict=True):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], a["step"]  # bit-identical
    for a, b in zip(straight, plain, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]  # ZeRO-1 == plain AdamW
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
    continued = _metrics(tmp_path / "unsharded_from_zero")
    assert [r["step"] for r in continued] == list(range(N + 1, 2 * N + 1))
    for a, b in zip(straight[N:], continued, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    assert straight[-1]["loss"] < straight[0]["loss"]


def test_sharded_optimizer_at_tp2xdp2_matches_tp2xpp2(world4):
    """ZeRO-1 under tensor parallelism (each rank saves its owned states' tp shards) trains like another layout."""
    zero, _ = scenario_result(world4, "zero_tp2xdp2")
    reference, _ = scenario_result(world4, "tp2xpp2")
    sharded, plain = _metrics(zero / "straight"), _metrics(reference / "straight")
    assert [r["step"] for r in sharded] == list(range(1, 2 * N + 1))
    for a, b in zip(sharded, plain, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
    assert (zero / "straight" / "checkpoints" / f"step_{2 * N:08d}" / "meta.json").is_file()
