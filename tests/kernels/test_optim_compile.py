"""Fused AdamW selection and per-block torch.compile (names unchanged, same outputs as eager)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mllm.kernels.compile import compile_blocks
from mllm.kernels.optim import adamw_implementation_kwargs, build_adamw
from mllm.model import build_model
from mllm.model.config import tiny


def test_adamw_selection() -> None:
    cpu = [nn.Parameter(torch.zeros(3))]
    assert adamw_implementation_kwargs(cpu) == {"foreach": True}
    assert adamw_implementation_kwargs(cpu, "fused") == {"fused": True}
    assert adamw_implementation_kwargs(cpu, "for_loop") == {"foreach": False}
    with pytest.raises(ValueError, match="optim.implementation='apex'"):
        adamw_implementation_kwargs(cpu, "apex")


def test_fused_adamw_matches_the_for_loop_reference() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))
    models = {c: copy.deepcopy(model) for c in ("fused", "for_loop")}
    opts = {
        c: build_adamw(
            [{"params": list(m.parameters()), "weight_decay": 0.05}], c, lr=1e-2, betas=(0.9, 0.95), eps=1e-8
        )
        for c, m in models.items()
    }
    assert opts["fused"].defaults["fused"] is True
    x = torch.randn(8, 16)
    for _ in range(3):
        for c, m in models.items():
            opts[c].zero_grad()
            m(x).square().mean().backward()
            opts[c].step()
    for a, b in zip(models["fused"].parameters(), models["for_loop"].parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def test_compile_blocks_keeps_names_and_outputs() -> None:
    torch.manual_seed(0)
    cfg = tiny()
    cfg.attention_backend = "flex"  # exercises the eager BlockMask preparation outside the graph
    eager = build_model(cfg).eval()
    compiled = copy.deepcopy(eager)
    names = compile_blocks(compiled, backend="aot_eager")
    assert names == [f"vision.layers.{i}" for i in range(2)] + [f"llm.layers.{i}" for i in range(4)]
    assert list(compiled.state_dict()) == list(eager.state_dict())
    seg = torch.tensor([[1] * 30 + [2] * 10, [1] * 25 + [0] * 15])
    ids = torch.randint(0, 900, seg.shape)
    pixels = torch.randn(1, 3, 56, 56)
    ids[0, 2 : 2 + cfg.num_image_token] = cfg.image_token_id
    with torch.no_grad():
        ref = eager(ids, pixel_values=pixels, segment_ids=seg).logits
        out = compiled(ids, pixel_values=pixels, segment_ids=seg).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_vit_blocks_see_one_dtype_and_compile_once_under_autocast() -> None:
    """Under bf16 autocast the ViT residual stream stays in the parameters' dtype (fp32), so both blocks get
    the same input dtype and share one graph (before: bf16 into block 0, fp32 after its layer scale)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = build_model(tiny())
    seen = []
    for block in model.vision.layers:
        block.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    torch._dynamo.reset()
    counters.clear()
    compile_blocks(model.vision, backend="eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.vision(torch.randn(2, 3, 56, 56)).float().sum().backward()
    assert seen == [torch.float32, torch.float32]
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()
