"""The trainer under FSDP2 (``parallel.dp_shard=2``): it trains like plain data parallel, its DCP checkpoint
loads bit-exactly into ``dp_shard=1`` and tp2 and back (model and AdamW state), a run resumed across the
dp_shard change continues like the uninterrupted one, and the dp_shard=1 path overlaps its gradient
all-reduce with the backward. Runs in the session's shared 2-rank group (``conftest.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import N
from scenarios import make_trainer, run_config, scenario_result

FSDP = ["parallel.dp_shard=2"]


def _run(overrides: list[str]) -> dict:
    from fixtures import RowSource

    from mllm.train.run import run_training

    return run_training(run_config(overrides), RowSource)


def _metrics(run_dir: Path) -> list[dict]:
    from mllm.train.metrics import read_metrics

    return read_metrics(run_dir / "metrics.jsonl")


def _resave(step_dir: Path, layout: list[str], out: Path) -> int:
    """Load ``step_dir`` into a trainer of ``layout`` and save it again under ``out``; returns the buckets
    the dp_shard=1 reducer launched during the backward of one step (0 under FSDP)."""
    trainer = make_trainer([*layout, f"checkpoint.dir={out}"])
    trainer.resume(step_dir)
    trainer.save()
    reducer = trainer.pm.grad_reducer
    if reducer is None:
        return 0
    trainer.train_step()
    return reducer.launched_early


def dp_shard_resume(rank: int, world: int, root: str) -> int:
    root_p = Path(root)
    ckpt = root_p / "ckpt"
    _run([f"train.run_dir={root_p / 'fsdp'}", f"train.steps={2 * N}", *FSDP])
    _run([f"train.run_dir={root_p / 'ddp'}", f"train.steps={2 * N}"])
    _run([f"train.run_dir={root_p / 'half'}", f"train.steps={2 * N}", f"train.stop_after={N}", *FSDP,
          f"checkpoint.dir={ckpt}"])  # fmt: skip
    _run([f"train.run_dir={root_p / 'continued'}", f"train.steps={2 * N}", f"checkpoint.dir={ckpt}",
          "checkpoint.resume=auto"])  # fmt: skip
    step = f"step_{N:08d}"
    overlapped = _resave(ckpt / step, [], root_p / "as_ddp")
    _resave(ckpt / step, ["parallel.tp=2"], root_p / "as_tp2")
    _resave(root_p / "as_ddp" / step, FSDP, root_p / "back_to_fsdp")
    return overlapped


@pytest.fixture(scope="module")
def resumed(world2):
    return scenario_result(world2, "fsdp_resume")


def _read(step_dir: Path, tmp: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = tmp / f"{step_dir.parent.name}.pt"
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)


def test_fsdp_trains_like_plain_data_parallel(resumed):
    root, _ = resumed
    fsdp, ddp = _metrics(root / "fsdp"), _metrics(root / "ddp")
    assert [r["step"] for r in fsdp] == list(range(1, 2 * N + 1))
    for a, b in zip(fsdp, ddp, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4), a["step"]
    assert fsdp[-1]["loss"] < fsdp[0]["loss"]


def test_resume_across_dp_shard_change_continues_the_run(resumed):
    root, _ = resumed
    straight, continued = _metrics(root / "fsdp"), _metrics(root / "continued")
    assert [r["step"] for r in continued] == list(range(N + 1, 2 * N + 1))
    for a, b in zip(straight[N:], continued, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5), a["step"]


def test_checkpoint_moves_between_dp_shard_layouts_bit_exactly(resumed, tmp_path):
    root, _ = resumed
    step = f"step_{N:08d}"
    written = _read(root / "ckpt" / step, tmp_path)
    assert any(k.startswith("optim/") and k.endswith("exp_avg_sq") for k in written)
    for other in ("as_ddp", "as_tp2", "back_to_fsdp"):
        again = _read(root / other / step, tmp_path)
        assert sorted(again) == sorted(written), other
        for key, value in written.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(again[key], value), (other, key)  # bit for bit, no tolerance


def test_dp_all_reduce_is_launched_during_the_backward(resumed):
    _, per_rank = resumed
    assert all(n > 0 for n in per_rank), per_rank  # buckets launched before the backward ended


def test_fsdp_checkpoint_exports_its_weights(resumed, tmp_path):
    from mllm.convert import core

    root, _ = resumed
    step_dir = root / "ckpt" / f"step_{N:08d}"  # written under dp_shard=2
    sd, _ = core.read_checkpoint(str(step_dir))
    written = _read(step_dir, tmp_path)
    assert len(sd) == sum(k.startswith("model/") for k in written)
    for name, tensor in sd.items():
        assert torch.equal(tensor, written[f"model/{name}"]), name
