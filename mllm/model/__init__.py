"""The InternVL model for one device."""

from mllm.model.config import PRESETS, ModelConfig, TextConfig, VisionConfig
from mllm.model.internvl import InternVLModel, ModelOutput, build_model, count_parameters

__all__ = [
    "PRESETS",
    "InternVLModel",
    "ModelConfig",
    "ModelOutput",
    "TextConfig",
    "VisionConfig",
    "build_model",
    "count_parameters",
]
