"""Initial weights from separate InternViT and LLM HF checkpoints (``train.init_vision_from`` /
``train.init_llm_from``): a tiny InternVL-Chat checkpoint split into a standalone ViT and a standalone LLM
must give the same weights as the combined checkpoint, with the projector from the seeded init."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/hf_fixtures.py
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))  # the shared rank launcher

from hf_fixtures import write_internvl_chat_dir  # noqa: E402
from launcher import run_on_ranks  # noqa: E402

from mllm.convert import core  # noqa: E402
from mllm.convert.errors import CheckpointError  # noqa: E402
from parallel.build import init_full_tensor  # noqa: E402

PARTS = {"vision": ("vision_model.", "vision_config"), "llm": ("language_model.", "llm_config")}


def split_internvl_chat(chat: Path, out: Path) -> dict[str, Path]:
    """Standalone ViT / LLM directories as their releases ship them: prefixes stripped, own config.json."""
    tensors = load_file(str(chat / "model.safetensors"))
    config = json.loads((chat / "config.json").read_text())
    dirs = {}
    for part, (prefix, config_key) in PARTS.items():
        d = out / part
        d.mkdir(parents=True)
        sd = {k.removeprefix(prefix): v for k, v in tensors.items() if k.startswith(prefix)}
        save_file(sd, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config[config_key]))
        dirs[part] = d
    return dirs


def _run_config(model_cfg, **train):
    from mllm.config import load_run_config

    run = load_run_config("tiny_sft", ["data.path=unused"])
    run.model = copy.deepcopy(model_cfg)
    for key, value in train.items():
        setattr(run.train, key, value)
    return run


@pytest.fixture(params=["internlm2", "llama"])
def checkpoints(request, tmp_path):
    chat = write_internvl_chat_dir(tmp_path / "chat", text=request.param)
    _, cfg = core.read_checkpoint(chat)
    return chat, split_internvl_chat(chat, tmp_path / "parts"), cfg


def test_parts_equal_the_combined_checkpoint(checkpoints):
    from mllm.train.setup import load_initial_state

    chat, parts, cfg = checkpoints
    combined = load_initial_state(_with_init_from(_run_config(cfg, seed=7), chat))
    from_parts = load_initial_state(
        _run_config(cfg, seed=7, init_vision_from=str(parts["vision"]), init_llm_from=str(parts["llm"]))
    )
    assert from_parts.keys() == combined.keys()
    for name, tensor in from_parts.items():
        if name.startswith("projector."):  # not in either part: the seeded, layout-independent init
            expected = init_full_tensor(name, tensor.shape, cfg, 7)
            assert torch.equal(tensor, expected), name
            if name.endswith(("fc1.weight", "fc2.weight")):
                assert not torch.equal(tensor, combined[name]), name
        else:
            assert torch.equal(tensor, combined[name]), name


def _with_init_from(run, path: Path):
    run.model.init_from = str(path)
    return run


def test_part_errors_name_the_key_or_tensor(checkpoints, tmp_path):
    _, parts, cfg = checkpoints
    config = json.loads((parts["vision"] / "config.json").read_text())
    (parts["vision"] / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"config.json: num_layers is 3 but the run's model.vision"):
        core.read_vision_checkpoint(parts["vision"], cfg)
    (parts["vision"] / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"\(LLM checkpoint\): unexpected tensors .*encoder.layers.0"):
        core.read_llm_checkpoint(_copy_config(parts["vision"], parts["llm"], tmp_path / "mixed"), cfg)
    sd = load_file(str(parts["llm"] / "model.safetensors"))
    norm = "model.norm.weight"
    sd[norm] = torch.ones(cfg.text.hidden_size + 1)
    save_file(sd, str(parts["llm"] / "model.safetensors"))
    with pytest.raises(CheckpointError, match=rf"tensor {norm} has shape \(65,\), expected \(64,\)"):
        core.read_llm_checkpoint(parts["llm"], cfg)


def _copy_config(weights_from: Path, config_from: Path, out: Path) -> Path:
    """ViT weights under an LLM config.json (a wrong path passed to train.init_llm_from)."""
    out.mkdir()
    (out / "model.safetensors").write_bytes((weights_from / "model.safetensors").read_bytes())
    (out / "config.json").write_text((config_from / "config.json").read_text())
    return out


def trainer_vs_combined(rank: int, world: int, run, chat: str) -> tuple[int, list[str]]:
    """(tensors compared, names differing) between the trainer's weights and the combined checkpoint's."""
    from fixtures import RowSource

    from mllm.train.setup import load_initial_state
    from mllm.train.trainer import Trainer

    weights = Trainer(run, RowSource).pm.full_state_dict(all_stages=True)
    combined = load_initial_state(_with_init_from(_run_config(run.model), Path(chat)))
    assert weights.keys() == combined.keys()
    compared = [n for n in weights if not n.startswith("projector.")]
    return len(compared), [n for n in compared if not torch.equal(weights[n], combined[n])]


def test_training_run_starts_from_the_parts_at_tp2(tmp_path):
    chat = write_internvl_chat_dir(tmp_path / "chat")
    parts = split_internvl_chat(chat, tmp_path / "parts")
    _, cfg = core.read_checkpoint(chat)
    run = _run_config(cfg, init_vision_from=str(parts["vision"]), init_llm_from=str(parts["llm"]))
    run.parallel.tp = 2
    for compared, differing in run_on_ranks(trainer_vs_combined, 2, run, str(chat)):
        assert compared > 20 and differing == []
