"""The native single-file checkpoint: save/load round trip, tied embeddings, atomic replacement."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mllm import checkpoint_io
from mllm.convert.errors import CheckpointError
from mllm.model.config import tiny
from mllm.model.internvl import build_model


def test_save_load_native_roundtrip(tmp_path) -> None:
    cfg = tiny(vocab_size=64, image_token_id=60)
    cfg.hf_extra = {"internvl_chat": {"use_thumbnail": True}}
    model = build_model(cfg).to(torch.bfloat16)
    checkpoint_io.save_native(model, cfg, tmp_path / "ckpt")
    sd, loaded = checkpoint_io.load_native(tmp_path / "ckpt")
    assert dataclasses.asdict(loaded) == dataclasses.asdict(cfg)
    want = model.state_dict()
    assert sorted(sd) == sorted(want)
    for name, tensor in want.items():
        assert sd[name].dtype == torch.bfloat16 and torch.equal(sd[name], tensor), name
    assert not list(tmp_path.glob(".ckpt.*"))  # no temp directories left behind


def test_tied_embeddings_saved_once_and_retied(tmp_path) -> None:
    cfg = tiny(vocab_size=64, image_token_id=60)
    cfg.text.tie_word_embeddings = True
    model = build_model(cfg)
    checkpoint_io.save_native(model, cfg, tmp_path / "ckpt")
    sd, _ = checkpoint_io.load_native(tmp_path / "ckpt")
    assert torch.equal(sd["lm_head.weight"], model.llm.embed_tokens.weight)


def test_failed_save_keeps_previous_checkpoint(tmp_path) -> None:
    cfg = tiny(vocab_size=64, image_token_id=60)
    checkpoint_io.save_native(build_model(cfg), cfg, tmp_path / "ckpt")
    before = (tmp_path / "ckpt" / "model.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError):
        checkpoint_io.save_native(
            build_model(cfg), cfg, tmp_path / "ckpt", extra_files={"x": tmp_path / "nope"}
        )
    assert (tmp_path / "ckpt" / "model.safetensors").read_bytes() == before
    assert not list(tmp_path.glob(".ckpt.*"))


def test_unknown_native_field_is_an_error(tmp_path) -> None:
    cfg = tiny(vocab_size=64, image_token_id=60)
    d = checkpoint_io.config_to_dict(cfg)
    d["model"]["text"]["n_experts"] = 8
    with pytest.raises(CheckpointError, match=r"unknown field\(s\) n_experts for TextConfig"):
        checkpoint_io.config_from_dict(d)
