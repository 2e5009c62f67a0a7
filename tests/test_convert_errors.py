"""Each bad checkpoint gives a one-line error naming the file/tensor and what was expected."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mllm import checkpoint_io
from mllm.convert import core
from mllm.convert.errors import CheckpointError
from tests.hf_fixtures import write_internvl_chat_dir


def edit_config(path, fn) -> None:
    cfg = json.loads((path / "config.json").read_text())
    fn(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def edit_weights(path, fn) -> None:
    sd = load_file(str(path / "model.safetensors"))
    fn(sd)
    save_file(sd, str(path / "model.safetensors"))


def test_missing_config(tmp_path) -> None:
    with pytest.raises(CheckpointError, match=r"config\.json not found: expected the model's config\.json"):
        core.read_checkpoint(tmp_path)


def test_missing_weights(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat")
    (src / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors not found .*index\.json.*safetensors"):
        core.read_checkpoint(src)


def test_missing_native_weights(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat")
    core.import_hf(src, tmp_path / "native")
    (tmp_path / "native" / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors not found: a native checkpoint needs"):
        checkpoint_io.load_native(tmp_path / "native")


def test_unknown_architecture(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat")
    edit_config(src, lambda c: c.update(model_type="llava", architectures=["LlavaForConditionalGeneration"]))
    with pytest.raises(
        CheckpointError, match=r"unknown architecture 'LlavaForConditionalGeneration'.*InternVLChatModel"
    ):
        core.read_checkpoint(src)


def test_unknown_language_model(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat")
    edit_config(src, lambda c: c["llm_config"].update(architectures=["MistralForCausalLM"]))
    with pytest.raises(
        CheckpointError, match=r"'MistralForCausalLM'; supported: InternLM2ForCausalLM, Llama"
    ):
        core.read_checkpoint(src)


def test_wrong_shape_names_tensor_and_shapes(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat")
    edit_weights(src, lambda sd: sd.update({"mlp1.1.weight": torch.zeros(64, 100)}))
    with pytest.raises(
        CheckpointError, match=r"tensor mlp1\.1\.weight has shape \(64, 100\), expected \(64, 192\)"
    ):
        core.read_checkpoint(src)


def test_wrong_wqkv_shape(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat")
    key = "language_model.model.layers.1.attention.wqkv.weight"
    edit_weights(src, lambda sd: sd.update({key: torch.zeros(96, 64)}))
    with pytest.raises(CheckpointError, match=rf"tensor {key} has shape \(96, 64\), expected \(128, 64\)"):
        core.read_checkpoint(src)


def test_missing_tensor(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat")
    edit_weights(src, lambda sd: sd.pop("vision_model.encoder.layers.1.ls2"))
    with pytest.raises(CheckpointError, match=r"missing tensors: vision_model\.encoder\.layers\.1\.ls2"):
        core.read_checkpoint(src)


def test_unexpected_tensor(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat")
    edit_weights(src, lambda sd: sd.update({"vision_model.encoder.layers.0.extra.weight": torch.zeros(2)}))
    with pytest.raises(
        CheckpointError, match=r"unexpected tensors .*vision_model\.encoder\.layers\.0\.extra\.weight"
    ):
        core.read_checkpoint(src)


def test_v1_to_transformers_is_an_error(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat", ps_version=None)  # absent means v1
    with pytest.raises(CheckpointError, match=r"ps_version 'v1' cannot be exported.*pixel shuffle v2"):
        core.export_hf(src, tmp_path / "out", "transformers")
    assert not (tmp_path / "out").exists()
