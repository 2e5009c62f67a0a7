"""Our parameter names and shapes for a ModelConfig, shared by every checkpoint reader."""

from __future__ import annotations

from mllm.model.config import ModelConfig
from mllm.model.internvl import build_model


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Our parameter names and shapes for ``cfg`` (built on the meta device: no memory)."""
    return {k: tuple(v.shape) for k, v in build_model(cfg, "meta").state_dict().items()}
