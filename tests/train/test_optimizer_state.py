"""Pre-created AdamW state sits where torch's own AdamW would put it, and survives a checkpoint round trip.

``init_optimizer_state`` creates the state before the first step (``mllm.train.state``); the fused and
capturable kernels need ``step`` on the parameter's device (torch/optim/adam.py ``_init_group``), the others on
the CPU. The reference is torch creating the state itself in its first step.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mllm.train import state as ckpt_state
from mllm.train.checkpoint import CheckpointManager


def _model(seed: int) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(4, 3)


def _pm(model: torch.nn.Module) -> SimpleNamespace:
    """The part of ``ParallelModel`` the checkpoint state reads (one device, no tensor-parallel specs)."""
    named = list(model.named_parameters())
    return SimpleNamespace(named_parameters=lambda: named, trainable_parameters=lambda: named, specs={})


def _steps(model: torch.nn.Module, opt: torch.optim.Optimizer, first: int, n: int) -> None:
    for k in range(first, first + n):
        gen = torch.Generator().manual_seed(k)
        model.zero_grad()
        model(torch.randn(5, 4, generator=gen)).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("flag", ["capturable", "fused", None])
def test_step_is_created_on_the_device_torch_uses(flag):
    meta = torch.nn.Parameter(torch.empty(3, device="meta"))
    group = {"params": [meta], **({flag: True} if flag else {})}
    opt = torch.optim.AdamW([group], lr=0.1)
    ckpt_state.init_optimizer_state(opt)
    expected = "meta" if flag else "cpu"
    assert opt.state[meta]["step"].device.type == expected


def test_fused_resume_keeps_step_on_the_param_device_and_equals_straight(tmp_path):
    """Fused AdamW (it runs on CPU, unlike capturable): 2 steps + checkpoint + resume + 2 steps equals 4
    straight steps, and the pre-created ``step`` equals torch's own (device, dtype, value)."""
    reference_model = _model(0)
    reference = torch.optim.AdamW(reference_model.parameters(), lr=0.05, fused=True)
    _steps(reference_model, reference, 0, 4)

    model = _model(0)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, fused=True)
    ckpt_state.init_optimizer_state(opt)
    _steps(model, opt, 0, 2)
    mgr = CheckpointManager(tmp_path)
    saved = ckpt_state.checkpoint_state(_pm(model), opt)
    path = mgr.save(2, saved.tensors, {}, {"layout": {}}, saved.chunks)

    resumed_model = _model(1)  # other weights: everything must come from the checkpoint
    resumed = torch.optim.AdamW(resumed_model.parameters(), lr=0.05, fused=True)
    ckpt_state.init_optimizer_state(resumed)
    target = ckpt_state.checkpoint_state(_pm(resumed_model), resumed)
    mgr.load(path, target.tensors, target.chunks)
    ckpt_state.restore(target)
    for p in resumed_model.parameters():
        step = resumed.state[p]["step"]
        assert step.device == p.device and step.dtype == torch.float32 and float(step) == 2.0
    _steps(resumed_model, resumed, 2, 2)

    for p, q in zip(resumed_model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            ours, torchs = resumed.state[p][key], reference.state[q][key]
            assert ours.device == torchs.device and ours.dtype == torchs.dtype and torch.equal(ours, torchs)
