"""Logits of our model loaded from a transformers-native checkpoint equal transformers' own InternVL's."""

from __future__ import annotations

import pytest
import torch

import mllm.hf
from tests.hf_fixtures import sample_batch, save_hf_model, tiny_hf_model

pytest.importorskip("transformers")

CASES = [
    pytest.param("6b", "llama", {}, id="rmsnorm-qknorm-vit+llama"),
    pytest.param("300m", "qwen2", {}, id="layernorm-qkvbias-vit+qwen2"),
    pytest.param("6b", "qwen2", {"vision_feature_layer": -2}, id="rmsnorm-vit-layer-2+qwen2"),
    pytest.param("300m", "qwen3", {}, id="layernorm-qkvbias-vit+qwen3-qknorm-headdim"),
]


def hf_logits(hf_model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            pixel_values=batch["pixel_values"],
        ).logits


@pytest.mark.parametrize(("vision", "text", "top"), CASES)
def test_logits_match_transformers(tmp_path, vision: str, text: str, top: dict) -> None:
    hf_model = tiny_hf_model(vision, text, seed=1, **top)
    save_hf_model(hf_model, tmp_path / "hf")
    ours = mllm.hf.load(tmp_path / "hf")
    assert not ours.training and ours.cfg.text.arch == text and ours.cfg.ps_version == "v2"

    batch = sample_batch(seed=2)
    with torch.no_grad():
        got = ours(batch["input_ids"], batch["pixel_values"], segment_ids=batch["segment_ids"]).logits
    want = hf_logits(hf_model, batch)
    real = batch["attention_mask"].bool()
    assert got.shape == want.shape
    diff = (got - want)[real].abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff}"
    assert want[real].abs().max() > 1e-2  # the comparison is not between two near-zero tensors


def test_text_only_batch_matches_transformers(tmp_path) -> None:
    hf_model = tiny_hf_model("300m", "llama", seed=3)
    save_hf_model(hf_model, tmp_path / "hf")
    ours = mllm.hf.load(tmp_path / "hf")
    ids = torch.randint(3, 90, (1, 11), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf_model(input_ids=ids).logits
        got = ours(ids).logits
    assert (got - want).abs().max().item() <= 1e-4
