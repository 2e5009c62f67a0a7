"""Multimodal data pipeline: exact InternVL tiling, conversation templates, webdataset shards, FLOP-balanced
packing and exactly resumable loading. See docs/data.md."""

from mllm.data.badsamples import BadSampleCounter, DataQualityError
from mllm.data.batch import IGNORE_INDEX, PackedBatch, build_batch, normalize_pixels
from mllm.data.config import DataConfig
from mllm.data.loader import PackedLoader, build_loader
from mllm.data.packing import FlopModel, Packer
from mllm.data.tiling import select_grid, tile_image

__all__ = [
    "IGNORE_INDEX",
    "BadSampleCounter",
    "DataConfig",
    "DataQualityError",
    "FlopModel",
    "PackedBatch",
    "PackedLoader",
    "Packer",
    "build_batch",
    "build_loader",
    "normalize_pixels",
    "select_grid",
    "tile_image",
]
