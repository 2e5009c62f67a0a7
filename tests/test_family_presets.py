"""InternVL 2.5 / 3 / 3.5 presets: the ViT presets' YAML equals the Python, and the parameter counts equal the
model cards' (huggingface.co/OpenGVLab/InternVL2_5-8B: 8.1B, InternVL2_5-78B: 78.4B, InternVL3_5-8B: 8.5B)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from mllm.config import RECIPES_DIR, load_run_config
from mllm.model.config import PRESETS, VISION_PRESETS
from mllm.model.internvl import build_model, count_parameters


@pytest.mark.parametrize("preset", sorted(VISION_PRESETS))
def test_yaml_vision_preset_equals_python_preset(preset, tmp_path):
    shutil.copytree(Path(RECIPES_DIR) / "model", tmp_path / "model")
    root = f"defaults:\n  - run_schema\n  - model: tiny\n  - model/vision: {preset}\n  - _self_\n"
    (tmp_path / "only_vision.yaml").write_text(root)
    assert load_run_config("only_vision", config_dir=tmp_path).model.vision == VISION_PRESETS[preset]()


@pytest.mark.parametrize(
    ("preset", "billions", "vision"),
    [("internvl2_5_8b", 8.1, 0.3), ("internvl2_5_78b", 78.4, 5.5), ("internvl3_5_8b", 8.5, 0.3)],
)
def test_parameter_counts_match_the_model_cards(preset, billions, vision):
    counts = count_parameters(build_model(PRESETS[preset](), device="meta"))
    assert counts["total"] / 1e9 == pytest.approx(billions, abs=0.05)
    assert counts["vision"] / 1e9 == pytest.approx(vision, abs=0.05)
