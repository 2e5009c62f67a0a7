"""``make demo`` step: a tiny model through both HF formats and back, with what was checked and by how much."""

from __future__ import annotations

import os
from pathlib import Path

import torch

import mllm.hf
from mllm.model.config import tiny
from mllm.model.internvl import InternVLModel, build_model


def _randomize(model: InternVLModel, seed: int) -> None:
    """Perturb every parameter (norms and layer scales too) so a wrong mapping shows in the logits."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)


def _batch(cfg, seed: int) -> dict[str, torch.Tensor]:
    """One row: text, an image of 2 tiles, text; and a shorter text-only row, right-padded."""
    gen = torch.Generator().manual_seed(seed)
    per_tile = cfg.num_image_token
    row0 = torch.cat(
        [
            torch.randint(3, 500, (3,), generator=gen),
            torch.full((2 * per_tile,), cfg.image_token_id),
            torch.randint(3, 500, (4,), generator=gen),
        ]
    )
    ids = torch.zeros(2, len(row0), dtype=torch.long)
    segments = torch.zeros_like(ids)
    ids[0], segments[0] = row0, 1
    ids[1, :6], segments[1, :6] = torch.randint(3, 500, (6,), generator=gen), 1
    size = cfg.vision.image_size
    return {
        "input_ids": ids,
        "segment_ids": segments,
        "pixel_values": torch.randn(2, 3, size, size, generator=gen),
    }


def _logits(model: InternVLModel, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(batch["input_ids"], batch["pixel_values"], segment_ids=batch["segment_ids"]).logits


def roundtrip_report(work_dir: str | os.PathLike) -> list[str]:
    """Build the tiny model, run it, round-trip through internvl_chat and transformers; return report lines.

    Raises AssertionError when a check fails (tensors not bit-identical, logits off by more than 1e-4).
    """
    work = Path(work_dir)
    torch.manual_seed(0)
    cfg = tiny(vocab_size=1024, image_token_id=1000)
    model = build_model(cfg).eval()
    _randomize(model, seed=0)
    batch = _batch(cfg, seed=1)
    real = batch["segment_ids"].bool()
    ref = _logits(model, batch)
    lines = [f"tiny model forward: logits {tuple(ref.shape)}, |logits| max {ref.abs().max():.3f}"]

    chat_dir = mllm.hf.save(model, work / "internvl_chat", format="internvl_chat")
    back = mllm.hf.load(chat_dir)
    want, got = model.state_dict(), back.state_dict()
    same = sorted(want) == sorted(got) and all(torch.equal(want[k], got[k]) for k in want)
    assert same, "ours -> internvl_chat -> ours changed a tensor"
    diff = (_logits(back, batch) - ref)[real].abs().max().item()
    assert diff <= 1e-4, f"internvl_chat round trip: logits differ by {diff}"
    lines.append(
        f"ours -> internvl_chat -> ours: {len(want)} tensors bit-identical, logits max abs diff {diff:.2e}"
    )

    hf_dir = mllm.hf.save(model, work / "transformers", format="transformers")
    try:
        from transformers import AutoModelForImageTextToText
    except ImportError:
        return [*lines, "ours -> transformers: written; load check skipped (transformers not installed)"]
    hf_model = AutoModelForImageTextToText.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        hf_logits = hf_model(
            input_ids=batch["input_ids"],
            attention_mask=batch["segment_ids"].clamp(max=1),
            pixel_values=batch["pixel_values"],
        ).logits
    diff = (hf_logits - ref)[real].abs().max().item()
    assert diff <= 1e-4, f"transformers export: logits differ by {diff}"
    lines.append(
        f"ours -> transformers ({type(hf_model).__name__}, text {hf_model.config.text_config.model_type}): "
        f"logits max abs diff {diff:.2e} over {int(real.sum())} tokens"
    )
    return lines
