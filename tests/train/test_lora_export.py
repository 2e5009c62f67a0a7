"""LoRA through the trainer at tp2 (``lora.vision`` / ``lora.llm``): only the adapters (and the unfrozen
projector) move, and the trainer checkpoint exports both as merged weights (transformers-native and
InternVL-Chat) and as a PEFT adapter on the transformers-native base; each reproduces the trained model's logits
in transformers / peft. Reference: the weights the tp2 trainer held in memory after its last step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fixtures import make_row
from scenarios import make_trainer, portable, restored, scenario_result
from test_sharded_checkpoint import full_tensors

import mllm.hf
from demo.hf import our_logits, transformers_logits
from mllm.convert import core
from mllm.convert.__main__ import main as convert_main
from mllm.model.lora import is_adapter_name
from parallel.build import init_full_tensor

STEPS = 2
LORA = ["lora.vision=4", "lora.llm=4", "lora.dropout=0.0"]


def train_lora_tp2(rank: int, world: int, root: str) -> dict:
    overrides = ["checkpoint.every=2", "parallel.tp=2", *LORA]
    trainer = make_trainer([f"train.run_dir={root}", f"train.steps={STEPS}", *overrides])
    trainer.fit()
    trained = portable(trainer.pm.full_state_dict(all_stages=True))
    run = trainer.run
    # The tp2 checkpoint (adapters with their base layers' shard specs) resumed at pp2: same tensors.
    pp2 = make_trainer([f"train.run_dir={root}/pp2", f"train.steps={STEPS}", "parallel.pp=2", *LORA])
    pp2.resume(Path(root) / "checkpoints" / f"step_{STEPS:08d}")
    tensors = {"tp2": full_tensors(trainer), "pp2": full_tensors(pp2)}
    out = {"state_dict": trained, "model": run.model, "seed": run.train.seed, "resumed": tensors}
    return out if rank == 0 else {}


@pytest.fixture(scope="module")
def trained(world2):
    run_dir, (result, _) = scenario_result(world2, "lora_export")
    result["state_dict"] = restored(result["state_dict"])
    return run_dir / "checkpoints" / f"step_{STEPS:08d}", result


def _question() -> tuple[torch.Tensor, torch.Tensor]:
    row = make_row(7, 0, 64)
    first = row["segment_ids"][0] == 1
    return row["input_ids"][0][first][None], row["pixel_values"]


def _trained_logits(result) -> torch.Tensor:
    ours = mllm.hf.model_from_state_dict(result["state_dict"], result["model"]).eval()
    return our_logits(ours, *_question())


def test_only_adapters_and_projector_moved(trained):
    """Every other tensor still equals the seeded, layout-independent init (computed here, independently)."""
    _, result = trained
    cfg, sd = result["model"], result["state_dict"]
    assert cfg.lora.vision == 4 and cfg.lora.llm == 4
    moved = []
    for name, tensor in sd.items():
        init = init_full_tensor(name, tensor.shape, cfg, result["seed"])
        if not torch.equal(tensor, init):
            moved.append(name)
    assert moved and all(is_adapter_name(n) or n.startswith("projector.") for n in moved), moved
    assert (
        sum(is_adapter_name(n) and ".lora_B." in n for n in moved) == 6 * 2 + 7 * 4
    )  # every B moved off its zero init


def test_lora_checkpoint_resumes_at_pp2_with_identical_tensors(trained):
    _, result = trained
    tp2, pp2 = (restored(result["resumed"][k]) for k in ("tp2", "pp2"))
    assert sorted(pp2) == sorted(tp2) and any(".lora_A." in k and k.startswith("optim/") for k in tp2)
    for key, want in tp2.items():
        assert torch.equal(pp2[key], want), key


def test_merged_export_reproduces_the_trained_logits(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    ckpt, result = trained
    want = _trained_logits(result)
    base_sd, base_cfg = core.without_adapters(result["state_dict"], result["model"])
    base = our_logits(mllm.hf.model_from_state_dict(base_sd, base_cfg).eval(), *_question())
    assert (want - base).abs().max() > 1e-3  # the adapters matter: merging them is visible

    assert convert_main(["export-hf", str(ckpt), str(tmp_path / "hf"), "--format", "transformers"]) == 0
    hf_model = transformers.AutoModelForImageTextToText.from_pretrained(tmp_path / "hf").eval()
    assert (transformers_logits(hf_model, *_question()) - want).abs().max().item() <= 1e-4

    assert convert_main(["export-hf", str(ckpt), str(tmp_path / "chat"), "--format", "internvl_chat"]) == 0
    config = json.loads((tmp_path / "chat" / "config.json").read_text())
    assert config["use_llm_lora"] == 0 and config["use_backbone_lora"] == 0
    sd, cfg = core.read_checkpoint(tmp_path / "chat")
    assert not cfg.lora.enabled and not any(is_adapter_name(n) for n in sd)
    chat = mllm.hf.model_from_state_dict(sd, cfg).eval()
    assert (our_logits(chat, *_question()) - want).abs().max().item() <= 1e-4


def test_peft_adapter_on_the_transformers_base_reproduces_the_trained_logits(trained, tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    ckpt, result = trained
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    argv = ["export-hf", str(ckpt), str(base_dir), "--format", "transformers", "--adapter", str(adapter_dir)]
    assert convert_main(argv) == 0
    config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8  # InternVL's alpha = 2 x rank
    base = transformers.AutoModelForImageTextToText.from_pretrained(base_dir).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    loaded = [n for n, _ in model.named_parameters() if ".lora_B." in n]
    assert len(loaded) == 6 * 2 + 7 * 4
    got = transformers_logits(model, *_question())
    assert (got - _trained_logits(result)).abs().max().item() <= 1e-4


def test_adapter_export_needs_the_transformers_format(trained, tmp_path, capsys):
    ckpt, _ = trained
    argv = [
        "export-hf",
        str(ckpt),
        str(tmp_path / "x"),
        "--format",
        "internvl_chat",
        "--adapter",
        str(tmp_path / "a"),
    ]
    assert convert_main(argv) == 2
    assert "--format transformers" in capsys.readouterr().err
