"""The tiny twin of every InternVL 2.5 / 3 / 3.5 preset (``mllm.model.config.tiny_twin``: the preset's ViT style,
text architecture, Qwen3 norms and decoupled head_dim, template) goes through the user's flow at tp2: an
InternVL-Chat directory is imported, the trainer takes one step from it, and the trainer checkpoint exports to
both HF formats, which reload (ours; transformers' own model for each ViT style x text architecture) with the
trained model's logits.

Reference for the import: the random weights written. For the exports: the weights the tp2 trainer held in memory
after its step (gathered from the live ranks, not via DCP)."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import pytest
import torch
from fixtures import RowSource, make_row
from scenarios import portable, restored, run_config, scenario_result

import mllm.hf
from demo.hf import our_logits, transformers_logits
from mllm.convert import core
from mllm.model.config import tiny_twin
from mllm.model.internvl import build_model

TWINS = ["internvl2_5_8b", "internvl3_8b", "internvl3_5_8b", "internvl2_5_78b", "internvl3_78b"]
# The transformers-native export is loaded in transformers for one twin per (ViT style, text architecture) pair;
# the other two pairs repeat one of these (300M + Qwen2 is also in tests/test_hf_parity.py).
IN_TRANSFORMERS = {"internvl2_5_8b", "internvl3_5_8b", "internvl3_78b"}


def _random_twin(name: str) -> tuple[dict[str, torch.Tensor], object]:
    """The twin with every tensor random (norm weights around 1), so parity checks can fail."""
    cfg = tiny_twin(name)
    gen = torch.Generator().manual_seed(len(name))
    sd = {}
    for key, t in build_model(cfg).state_dict().items():
        noise = torch.randn(t.shape, generator=gen) * 0.05
        sd[key] = noise + (1.0 if "norm" in key and key.endswith("weight") else 0.0)
    return sd, cfg


def import_train_one_step(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    from mllm.train.trainer import Trainer

    out = {}
    for name in TWINS:
        chat, native = Path(root) / name / "chat", Path(root) / name / "native"
        if rank == 0:
            sd, cfg = _random_twin(name)
            core.write_hf(sd, cfg, chat, "internvl_chat")
            core.import_hf(chat, native)
        dist.barrier()
        imported, imported_cfg = core.read_checkpoint(native)
        run = run_config(
            ["parallel.tp=2", "train.steps=1", "checkpoint.every=1", f"train.run_dir={root}/{name}/run"]
        )
        run.model = dataclasses.replace(imported_cfg, init_from=str(native))
        trainer = Trainer(run, functools.partial(RowSource))
        trainer.fit()
        trained = portable(trainer.pm.full_state_dict(all_stages=True))
        if rank == 0:
            out[name] = {"state_dict": trained, "model": run.model}
    return out


@pytest.fixture(scope="module")
def twins(world2):
    run_dir, (result, _) = scenario_result(world2, "family_twins")
    for value in result.values():
        value["state_dict"] = restored(value["state_dict"])
    return run_dir, result


def _question() -> tuple[torch.Tensor, torch.Tensor]:
    row = make_row(7, 0, 64)
    first = row["segment_ids"][0] == 1
    return row["input_ids"][0][first][None], row["pixel_values"]


@pytest.mark.parametrize("name", TWINS)
def test_twin_imports_trains_and_exports(twins, name, tmp_path):
    transformers = pytest.importorskip("transformers")
    run_dir, result = twins
    written, cfg = _random_twin(name)
    imported, imported_cfg = core.read_checkpoint(run_dir / name / "native")
    assert dataclasses.replace(imported_cfg, hf_extra={}) == cfg  # the twin's structure survives the import
    assert all(torch.equal(imported[k], v) for k, v in written.items())

    trained = result[name]["state_dict"]
    moved = [k for k in written if not torch.equal(trained[k], written[k])]
    assert any(k.startswith("vision.") for k in moved) and any(k.startswith("llm.") for k in moved)

    ckpt = run_dir / name / "run" / "checkpoints" / "step_00000001"
    want = our_logits(mllm.hf.model_from_state_dict(trained, result[name]["model"]).eval(), *_question())
    chat = core.export_hf(ckpt, tmp_path / "chat", "internvl_chat")
    assert torch.equal(our_logits(mllm.hf.load(chat), *_question()), want)
    native = core.export_hf(ckpt, tmp_path / "hf", "transformers")
    if name not in IN_TRANSFORMERS:
        return
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(native).eval()
    assert (transformers_logits(hf_model, *_question()) - want).abs().max().item() <= 1e-4
