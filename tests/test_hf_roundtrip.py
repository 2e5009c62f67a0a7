"""HF -> ours -> HF is bit-identical per tensor (both formats) and keeps every config field; InternVL-Chat
(InternLM2) -> transformers-native through ours preserves logits; InternLM2's wqkv split checked by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mllm.hf
from mllm.convert import core
from mllm.convert.internvl_chat import fuse_wqkv, split_wqkv
from mllm.convert.processor import NAMED_IMAGE_TOKENS
from mllm.model.config import TextConfig
from tests.hf_fixtures import (
    IM_END_ID,
    IMAGE_TOKEN_ID,
    QWEN3_HEAD_DIM,
    sample_batch,
    save_hf_model,
    tiny_hf_model,
    write_internvl_chat_dir,
)

pytest.importorskip("transformers")


def read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def assert_tensors_identical(a_dir: Path, b_dir: Path) -> None:
    a, b = read_tensors(a_dir), read_tensors(b_dir)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert torch.equal(a[name], b[name]), name


def assert_fields_kept(original: dict, written: dict, path: str = "") -> None:
    """Every field of ``original`` is in ``written`` with the same value (written may add fields)."""
    for key, value in original.items():
        assert key in written, f"{path}{key} lost"
        if isinstance(value, dict):
            assert_fields_kept(value, written[key], f"{path}{key}.")
        else:
            assert written[key] == value, f"{path}{key}: {written[key]!r} != {value!r}"


def roundtrip(src: Path, tmp: Path, fmt: str) -> Path:
    core.import_hf(src, tmp / "native")
    return core.export_hf(tmp / "native", tmp / "back", fmt)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("vision", "text"), [("6b", "llama"), ("300m", "qwen2"), ("300m", "qwen3")])
def test_transformers_roundtrip_bit_identical(tmp_path, vision, text, dtype) -> None:
    src = save_hf_model(tiny_hf_model(vision, text).to(dtype), tmp_path / "hf")
    back = roundtrip(src, tmp_path, "transformers")
    assert_tensors_identical(src, back)
    assert_fields_kept(
        json.loads((src / "config.json").read_text()), json.loads((back / "config.json").read_text())
    )
    # the export names the image tokens for transformers' InternVLProcessor; nothing else changes
    theirs, ours = (json.loads((d / "tokenizer_config.json").read_text()) for d in (src, back))
    assert ours.pop("extra_special_tokens") == NAMED_IMAGE_TOKENS
    assert ours == theirs


def test_tied_embeddings_roundtrip_and_logits(tmp_path) -> None:
    hf_model = tiny_hf_model("300m", "qwen2", seed=7, tie=True)
    src = save_hf_model(hf_model, tmp_path / "hf")
    assert "language_model.lm_head.weight" not in read_tensors(src)
    back = roundtrip(src, tmp_path, "transformers")
    assert_tensors_identical(src, back)
    ours = mllm.hf.load(back)
    assert ours.lm_head.weight is ours.llm.embed_tokens.weight
    batch = sample_batch(seed=8)
    with torch.no_grad():
        got = ours(batch["input_ids"], batch["pixel_values"], segment_ids=batch["segment_ids"]).logits
        want = hf_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
    real = batch["attention_mask"].bool()
    assert (got - want)[real].abs().max().item() <= 1e-4


@pytest.mark.parametrize("text", ["internlm2", "llama", "qwen2", "qwen3"])
def test_internvl_chat_roundtrip_bit_identical(tmp_path, text) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat", text=text, dtype=torch.bfloat16)
    back = roundtrip(src, tmp_path, "internvl_chat")
    assert_tensors_identical(src, back)
    assert_fields_kept(
        json.loads((src / "config.json").read_text()), json.loads((back / "config.json").read_text())
    )
    assert (back / "tokenizer.model").read_bytes() == (src / "tokenizer.model").read_bytes()
    assert json.loads((back / "generation_config.json").read_text())["eos_token_id"] == IM_END_ID


def test_internvl_chat_without_ps_version_is_v1(tmp_path) -> None:
    src = write_internvl_chat_dir(tmp_path / "chat", ps_version=None)
    sd, cfg = core.read_checkpoint(src)
    assert cfg.ps_version == "v1" and cfg.image_token_id == IMAGE_TOKEN_ID
    assert cfg.text.rope_scaling == {"type": "dynamic", "factor": 2.0}


@pytest.mark.parametrize("text", ["internlm2", "qwen3"])
def test_internvl_chat_to_transformers_preserves_logits(tmp_path, text) -> None:
    """InternVL-Chat (InternLM2 as in V1-5; Qwen3 as in InternVL3.5) -> ours -> transformers' own model."""
    from transformers import AutoModelForImageTextToText

    src = write_internvl_chat_dir(tmp_path / "chat", text=text)
    ours = mllm.hf.load(src)
    out = mllm.hf.save(ours, tmp_path / "hf", format="transformers", tokenizer_dir=src)
    hf_model = AutoModelForImageTextToText.from_pretrained(out).eval()
    if text == "internlm2":
        assert hf_model.config.text_config.model_type == "llama"
        assert hf_model.config.text_config.rope_parameters["rope_type"] == "dynamic"
        assert hf_model.config.text_config.rope_parameters["factor"] == 2.0
        assert hf_model.config.text_config.rope_parameters["rope_theta"] == 1e6
    else:
        assert hf_model.config.text_config.model_type == "qwen3"
        assert hf_model.config.text_config.head_dim == QWEN3_HEAD_DIM

    batch = sample_batch(seed=5)
    with torch.no_grad():
        got = ours(batch["input_ids"], batch["pixel_values"], segment_ids=batch["segment_ids"]).logits
        want = hf_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits
    real = batch["attention_mask"].bool()
    assert (got - want)[real].abs().max().item() <= 1e-4


def reference_internlm2_qkv(x: torch.Tensor, wqkv: torch.Tensor, heads: int, kv: int, d: int):
    """InternLM2Attention's split, written out: rearrange 'b q (h gs d) -> b q h gs d', gs = 2 + heads // kv;
    q = [..., :groups, :] flattened to (h gs), k = [..., -2, :], v = [..., -1, :]."""
    groups = heads // kv
    qkv = x @ wqkv.T  # [b, s, (kv * (groups + 2) * d)]
    b, s, _ = qkv.shape
    qkv = qkv.reshape(b, s, kv, groups + 2, d)
    q = qkv[..., :groups, :].reshape(b, s, kv * groups, d)
    return q, qkv[..., -2, :], qkv[..., -1, :]


def test_wqkv_split_matches_internlm2_head_grouping() -> None:
    t = TextConfig(hidden_size=32, num_heads=6, num_kv_heads=2, head_dim=4)
    wqkv = torch.randn((6 + 2 * 2) * 4, 32)
    q_w, k_w, v_w = split_wqkv(wqkv, t, "wqkv")
    x = torch.randn(2, 5, 32)
    q_ref, k_ref, v_ref = reference_internlm2_qkv(x, wqkv, 6, 2, 4)
    torch.testing.assert_close((x @ q_w.T).reshape(2, 5, 6, 4), q_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close((x @ k_w.T).reshape(2, 5, 2, 4), k_ref, rtol=0, atol=1e-5)
    torch.testing.assert_close((x @ v_w.T).reshape(2, 5, 2, 4), v_ref, rtol=0, atol=1e-5)
    # Row by row: q head 4 is group member 1 of kv head 2 (index 1) -> rows of block (1 * 5 + 1).
    assert torch.equal(q_w[4 * 4 : 5 * 4], wqkv[(1 * 5 + 1) * 4 : (1 * 5 + 2) * 4])
    assert torch.equal(k_w[4:8], wqkv[(1 * 5 + 3) * 4 : (1 * 5 + 4) * 4])
    assert torch.equal(fuse_wqkv(q_w, k_w, v_w, t), wqkv)
