"""Sharded checkpoints: each rank writes only its tensor-parallel shards (padding stripped, placed at their
offsets in the single-device tensors), every element is stored once, and a tp2 checkpoint loads at tp1 (dp2)
and at pp2 into exactly the tensors the tp2 trainer held (references gathered from the live tp2 ranks, not
read back through DCP)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from scenarios import make_trainer, portable, restored, scenario_result

from mllm.convert.core import expected_shapes
from mllm.train.checkpoint import latest_checkpoint
from mllm.train.state import ADAM_TENSOR_STATES, checkpoint_state, inner_optimizer
from parallel.shard import gather_full_tensor


def full_tensors(trainer) -> dict[str, torch.Tensor]:
    """Every single-device tensor of the model and its AdamW state, gathered over tp from the live shards and
    merged over all ranks (so pp stages and ZeRO owners all contribute)."""
    pm, inner = trainer.pm, inner_optimizer(trainer.optimizer)
    out = {f"model/{k}": v.clone() for k, v in pm.full_state_dict().items()}
    for name, p in pm.trainable_parameters():
        if p in inner.state:
            for key in ADAM_TENSOR_STATES:
                out[f"optim/{name}/{key}"] = gather_full_tensor(
                    inner.state[p][key], pm.specs.get(name), pm.tp
                )
            out[f"optim/{name}/step"] = inner.state[p]["step"].reshape(1).float().clone()
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, out)
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        merged.update(part)
    return portable(merged)


def tp2_checkpoint_into_other_layouts(rank: int, world: int, root: str) -> dict:
    root_p = Path(root)
    tp2 = make_trainer([f"train.run_dir={root_p / 'tp2'}", "train.steps=2", "parallel.tp=2"])
    tp2.fit()  # 2 steps: non-zero moments, saved at the end
    state = checkpoint_state(tp2.pm, tp2.optimizer)
    params = dict(tp2.pm.named_parameters())
    shares_storage = all(
        state.tensors[f"model/{n}"].untyped_storage().data_ptr() == p.untyped_storage().data_ptr()
        for n, p in params.items()
    )
    out = {"tp2": full_tensors(tp2), "views": shares_storage}
    ckpt = latest_checkpoint(root_p / "tp2" / "checkpoints")
    out["ckpt"] = str(ckpt)
    for name, layout in (("tp1", ["parallel.tp=1"]), ("pp2", ["parallel.tp=1", "parallel.pp=2"])):
        trainer = make_trainer([f"train.run_dir={root_p / name}", "train.steps=2", *layout])
        trainer.resume(ckpt)
        out[name] = full_tensors(trainer)
    return out if rank == 0 else {}


def test_tp2_checkpoint_loads_at_tp1_and_pp2_with_identical_tensors(world2):
    _, (result, _) = scenario_result(world2, "reshard")
    assert result["views"]  # the saved model tensors are the live shards, not gathered copies
    reference = restored(result["tp2"])
    for layout in ("tp1", "pp2"):
        loaded = restored(result[layout])
        assert sorted(loaded) == sorted(reference), layout
        for key, want in reference.items():
            assert torch.equal(loaded[key], want), (layout, key)
    assert reference["optim/llm.layers.0.mlp.up_proj.weight/exp_avg"].abs().sum() > 0


def _chunks(md, key: str) -> list[tuple[tuple, tuple]]:
    return sorted((tuple(c.offsets), tuple(c.sizes)) for c in md.state_dict_metadata[key].chunks)


def _writer_rank(md, key: str, offsets: tuple) -> int:
    """The rank whose file holds the chunk of ``key`` at ``offsets`` (DCP names files ``__<rank>_<n>.distcp``)."""
    (info,) = [v for k, v in md.storage_data.items() if k.fqn == key and tuple(k.offset) == offsets]
    return int(info.relative_path.split("_")[2])


def test_each_rank_writes_its_own_unpadded_shards_once(world2):
    _, (result, _) = scenario_result(world2, "reshard")
    ckpt = Path(result["ckpt"])
    md = dcp.FileSystemReader(str(ckpt)).read_metadata()
    # Column-parallel LLM weight [64, 64]: rows 0..31 from rank 0, 32..63 from rank 1.
    key = "model/llm.layers.0.self_attn.q_proj.weight"
    assert _chunks(md, key) == [((0, 0), (32, 64)), ((32, 0), (32, 64))]
    assert [_writer_rank(md, key, (0, 0)), _writer_rank(md, key, (32, 0))] == [0, 1]
    # ViT q_proj with 3 heads of 16 at tp2: padded to 4 heads; rank 1 holds head 2 and a dummy head, and
    # saves only head 2. The stored tensor has the single-device shape.
    key = "optim/vision.layers.0.attn.q_proj.weight/exp_avg_sq"
    assert tuple(md.state_dict_metadata[key].size) == (48, 48)
    assert _chunks(md, key) == [((0, 0), (32, 48)), ((32, 0), (16, 48))]
    assert _writer_rank(md, key, (32, 0)) == 1
    # Row-parallel: columns.
    assert _chunks(md, "model/vision.layers.1.attn.proj.weight") == [((0, 0), (48, 32)), ((0, 32), (48, 16))]
    # One copy of the model and of the AdamW state: single-device names and shapes, every element stored once.
    cfg = make_cfg(ckpt)
    shapes = expected_shapes(cfg)
    expected = {f"model/{k}": s for k, s in shapes.items()}
    for k, s in shapes.items():
        expected.update({f"optim/{k}/exp_avg": s, f"optim/{k}/exp_avg_sq": s, f"optim/{k}/step": (1,)})
    stored = {k: tuple(v.size) for k, v in md.state_dict_metadata.items()}
    assert stored == expected
    stored_elements = sum(math.prod(c.sizes) for v in md.state_dict_metadata.values() for c in v.chunks)
    assert stored_elements == sum(math.prod(s) for s in expected.values())
    assert len(md.storage_data) == sum(len(v.chunks) for v in md.state_dict_metadata.values())
    on_disk = sum(f.stat().st_size for f in ckpt.glob("*.distcp"))
    overhead = 4096 * len(md.storage_data)  # torch.save framing per stored chunk
    assert 4 * stored_elements <= on_disk <= 4 * stored_elements + overhead


def make_cfg(ckpt: Path):
    from mllm.convert.trainer_checkpoint import read_model_config

    return read_model_config(ckpt)


def test_zero1_at_tp2_dp2_stores_every_element_once(world4):
    """dp replicas offer identical shards (and ZeRO owners disjoint states): still one copy on disk."""
    root, _ = scenario_result(world4, "zero_tp2xdp2")
    ckpt = latest_checkpoint(root / "straight" / "checkpoints")
    md = dcp.FileSystemReader(str(ckpt)).read_metadata()
    shapes = expected_shapes(make_cfg(ckpt))
    assert {k for k in md.state_dict_metadata if k.startswith("optim/")} == {
        f"optim/{k}/{s}" for k in shapes for s in ("exp_avg", "exp_avg_sq", "step")
    }
    for key, value in md.state_dict_metadata.items():
        volume = sum(math.prod(c.sizes) for c in value.chunks)
        assert volume == math.prod(value.size), key  # no chunk stored twice
    assert _chunks(md, "optim/llm.layers.1.mlp.down_proj.weight/exp_avg") == [
        ((0, 0), (64, 64)),
        ((0, 64), (64, 64)),
    ]
