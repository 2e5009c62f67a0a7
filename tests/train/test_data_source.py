"""The trainer's data source: one optimizer step of micro-batches prefetched, CPU batches unchanged.

Reference: a plain ``PackedLoader`` with the user's prefetch and the CPU normalization of ``mllm.data``.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mllm.config import load_run_config
from mllm.data.loader import PackedLoader
from mllm.train.data import MAX_STEP_PREFETCH, DataLoaderSource, step_prefetch


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory):
    from mllm.data.synth import synth

    return synth(tmp_path_factory.mktemp("synth"), num_samples=40, progress=False)


def _run(synth_data, *overrides: str):
    return load_run_config(
        "tiny_sft", [f"data.path={synth_data.meta}", f"data.tokenizer={synth_data.tokenizer}", *overrides]
    )


@pytest.mark.parametrize(
    "gbs, micro, dp, user, expected",
    [
        (4, 1, 1, 2, 4),  # grad accum 4 > the default 2
        (4, 1, 2, 2, 2),  # grad accum 2
        (8, 1, 1, 10, 10),  # the user's larger value is kept
        (1024, 1, 2, 2, MAX_STEP_PREFETCH),  # grad accum 512: capped
    ],
)
def test_prefetch_covers_one_step(synth_data, gbs, micro, dp, user, expected):
    run = _run(
        synth_data,
        f"train.global_batch_size={gbs}",
        f"data.micro_batch_size={micro}",
        f"data.prefetch_batches={user}",
    )
    assert step_prefetch(run, dp) == expected


def test_cpu_micro_batches_equal_the_plain_loaders(synth_data):
    run = _run(synth_data, "train.global_batch_size=8")
    source = DataLoaderSource(run, SimpleNamespace(dp_rank=0, dp=1))
    assert source.loader.cfg.prefetch_batches == 8 and source.device.type == "cpu"
    ours = source.next_micro_batches(8)
    reference = PackedLoader(run.data, 0, 1, rows_per_step=8)  # prefetch_batches=2
    try:
        for mb in ours:
            batch = next(reference)
            for key in ("input_ids", "labels", "segment_ids", "position_ids"):
                assert torch.equal(mb[key], getattr(batch, key))
            assert mb["sample_ids"] == [i for row in batch.sample_ids for i in row]
            if batch.pixel_values is not None and batch.pixel_values.numel():
                # uint8 tiles: the trainer's PixelFeeder normalizes them on the device just in time
                assert mb["pixel_values"].dtype == torch.uint8
                assert torch.equal(mb["pixel_values"], batch.pixel_values)
                assert torch.equal(mb["image_flags"], batch.image_flags)
        assert any(mb["pixel_values"] is not None for mb in ours)
    finally:
        reference.close()
        source.loader.close()
