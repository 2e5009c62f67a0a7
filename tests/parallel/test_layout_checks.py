"""Impossible layouts fail early with one-line errors; FLOP balancing; the meta-device memory report."""

from __future__ import annotations

import pytest
import torch

from mllm.model.config import PRESETS, tiny
from mllm.model.internvl import build_model, count_parameters
from parallel import ParallelConfig, validate_layout
from parallel.build import build_rank_skeleton
from parallel.memory import format_memory_report, memory_report
from parallel.mesh import meta_mesh


@pytest.mark.parametrize(
    "world, kwargs, message",
    [
        (6, {"tp": 4}, r"world size 6 is not divisible by tp\*pp = 4\*1"),
        (
            4,
            {"tp": 4},
            r"parallel.tp=4 must divide model.text.num_kv_heads=2: tensor parallelism splits whole",
        ),
        (4, {"pp": 2, "layers_per_stage": [1, 2]}, r"layers_per_stage \[1, 2\] sums to 3"),
        (4, {"pp": 2, "layers_per_stage": [4, 0]}, r"every stage needs at least one layer"),
        (4, {"pp": 2, "layers_per_stage": [4]}, r"has 1 entries but pp\*virtual_stages = 2"),
        (8, {"pp": 8}, r"num_layers=4 < 8 pipeline stages"),
        (2, {"pp": 2, "virtual_stages": 2}, r"virtual_stages=2 needs pp_schedule=interleaved_1f1b"),
        (2, {"pp": 2, "pp_schedule": "interleaved_1f1b"}, r"needs virtual_stages >= 2"),
        (2, {"pp_schedule": "zero_bubble"}, r"pp_schedule must be one of"),
        (2, {"loss_mode": "mean"}, r"loss_mode must be one of"),
    ],
)
def test_impossible_layouts_raise_before_any_work(world, kwargs, message) -> None:
    with pytest.raises(ValueError, match=message) as info:
        validate_layout(tiny(), ParallelConfig(**kwargs), world)
    assert "\n" not in str(info.value)


def test_lora_with_the_te_backend_raises_before_any_work() -> None:
    cfg = tiny()
    cfg.lora.llm = 4
    with pytest.raises(ValueError, match="lora.vision / lora.llm need parallel.layer_backend=torch"):
        validate_layout(cfg, ParallelConfig(layer_backend="te"), 1)


def test_uneven_vit_heads_are_a_valid_layout() -> None:
    cfg = PRESETS["internvl_chat_v1_5"]()  # 25 ViT heads, 8 kv heads
    for tp in (2, 4, 8):
        validate_layout(cfg, ParallelConfig(tp=tp), tp)


def test_memory_report_counts_every_parameter_once_per_shard() -> None:
    cfg = tiny()
    cfg.vision.num_heads = 4  # no dummy heads, so shards add up exactly
    total = count_parameters(build_model(cfg, "meta"))["total"]
    assert memory_report(cfg, ParallelConfig(), 1)[0].params == total
    pcfg = ParallelConfig(tp=2, pp=2)
    reports = memory_report(cfg, pcfg, 4)
    replicated = 0
    for pp_rank in range(2):
        sk = build_rank_skeleton(cfg, pcfg, meta_mesh(pcfg, 4, pp_rank=pp_rank))
        replicated += sum(p.numel() for n, p in sk.module.named_parameters() if n not in sk.specs)
    # Sharded tensors split exactly in two; replicated ones are held by both tp ranks.
    assert sum(r.params for r in reports) * 2 - replicated == total


def test_memory_report_26b_on_64_gpus_fits_80gb_on_meta() -> None:
    cfg = PRESETS["internvl_chat_v1_5"]()
    pcfg = ParallelConfig(tp=8, pp=4, shard_optimizer=True)
    reports = memory_report(cfg, pcfg, 64, param_dtype=torch.bfloat16)
    text = format_memory_report(reports)
    assert len(reports) == 4 and "total GiB" in text
    assert max(r.total_bytes for r in reports) < 80 * 1024**3
    # 25 ViT heads padded to 32 at tp 8: stage 0 holds 32/8 = 4 heads * 128 = 512 rows of each q/k/v.
    sk = build_rank_skeleton(cfg, pcfg, meta_mesh(pcfg, 64, pp_rank=0))
    assert sk.module.vision.layers[0].attn.q_proj.weight.shape == (512, 3200)
    assert sk.module.vision.layers[0].attn.q_proj.weight.is_meta
    unsharded = ParallelConfig(tp=8, pp=4)
    assert memory_report(cfg, unsharded, 64)[0].optimizer_bytes == 2 * reports[0].optimizer_bytes
