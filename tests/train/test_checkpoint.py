"""Checkpoint manager: atomic commit, a crash during save leaves the previous checkpoint chosen, retention."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mllm.train.checkpoint import CheckpointManager, latest_checkpoint, list_checkpoints, resolve_resume


def _tensors(value: float) -> dict[str, torch.Tensor]:
    return {"model/w": torch.full((3, 2), value), "optim/w/step": torch.tensor([value])}


def test_crash_during_save_keeps_previous_checkpoint(tmp_path):
    mgr = CheckpointManager(tmp_path, keep_last=2)
    mgr.save(1, _tensors(1.0), {"rng": 1}, {"layout": {}})

    def crash(step: int) -> None:
        raise KeyboardInterrupt(f"killed while saving step {step}")

    mgr.before_commit = crash
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, _tensors(2.0), {"rng": 2}, {"layout": {}})
    assert (tmp_path / ".tmp_step_00000002").is_dir()  # the half-written one exists ...
    assert latest_checkpoint(tmp_path).name == "step_00000001"  # ... but is never chosen
    assert resolve_resume("auto", tmp_path).name == "step_00000001"
    loaded = {k: torch.zeros_like(v) for k, v in _tensors(0.0).items()}
    extra, meta = CheckpointManager(tmp_path).load(resolve_resume("auto", tmp_path), loaded)
    assert (
        torch.equal(loaded["model/w"], torch.full((3, 2), 1.0)) and extra == {"rng": 1} and meta["step"] == 1
    )

    mgr.before_commit = None
    for step in (2, 3, 4):
        mgr.save(step, _tensors(float(step)), {}, {})
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]  # keep_last=2
    assert not list(tmp_path.glob(".tmp_*"))  # the stale one was cleaned by the next save


def test_resume_values(tmp_path):
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path) is None  # fresh run
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        resolve_resume(str(tmp_path / "step_00000007"), tmp_path)


def test_crash_while_deleting_never_leaves_a_broken_checkpoint_chosen(tmp_path, monkeypatch):
    """A kill inside retention's rmtree (here: one shard deleted, then the 'kill') must not leave a
    ``step_`` directory with meta.json and .metadata but missing shards: resume would pick it and fail."""
    import shutil

    import mllm.train.checkpoint as ckpt

    mgr = CheckpointManager(tmp_path, keep_last=1)
    mgr.save(1, _tensors(1.0), {}, {})
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, ignore_errors=False):
        shards = sorted(Path(path).glob("*.distcp"))
        if shards:
            shards[0].unlink()  # partly deleted ...
            raise KeyboardInterrupt("killed while deleting")  # ... then the process dies
        real_rmtree(path, ignore_errors=ignore_errors)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        mgr.save(2, _tensors(2.0), {}, {})  # retention deletes step 1
    monkeypatch.setattr(ckpt.shutil, "rmtree", real_rmtree)
    for path in list_checkpoints(tmp_path):  # every checkpoint still listed loads completely
        loaded = {k: torch.zeros_like(v) for k, v in _tensors(0.0).items()}
        CheckpointManager(tmp_path).load(path, loaded)
        assert torch.equal(loaded["model/w"], torch.full((3, 2), float(path.name[-1])))
    assert latest_checkpoint(tmp_path).name == "step_00000002"
