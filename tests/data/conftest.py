"""Shared fixtures of the data tests: one small synthetic dataset (and tokenizer) per test process."""

from __future__ import annotations

import pytest

from mllm.data import DataConfig
from mllm.data.synth import synth


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    return synth(tmp_path_factory.mktemp("synth"), num_samples=400, seed=1, progress=False)


def small_config(path, tokenizer, **overrides) -> DataConfig:
    """Tiny tiles (28 px, 4 tokens each) and short rows so loader tests run in seconds."""
    base = dict(
        path=str(path),
        tokenizer=str(tokenizer),
        seq_len=512,
        micro_batch_size=2,
        max_tiles_per_row=40,
        tile_size=28,
        num_image_token=4,
        shuffle_buffer=32,
        pack_buffer=16,
        num_workers=0,
        decode_threads=0,
        prefetch_batches=1,
        max_bad_fraction=1.0,
    )
    base.update(overrides)
    return DataConfig(**base)
