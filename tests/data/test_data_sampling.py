"""The global sample order: InternVL's meta semantics (repeat_time, epochs over the concatenation,
use_data_resampling, unknown keys) at the level of references; the trainer-level check through samples.jsonl is
tests/train/test_layout_invariance.py."""

from __future__ import annotations

import json
import logging
from collections import Counter

import numpy as np
import pytest

from mllm.data.sampling import SampleOrder
from mllm.data.sources import load_meta, open_sources


def _meta(tmp_path, entries: dict) -> str:
    for name, entry in entries.items():
        n = entry.pop("_lines")
        lines = [json.dumps({"conversations": [], "i": i}) for i in range(n)]
        (tmp_path / f"{name}.jsonl").write_text("\n".join(lines) + "\n")
        entry.update(root=str(tmp_path), annotation=str(tmp_path / f"{name}.jsonl"))
    (tmp_path / "meta.json").write_text(json.dumps(entries))
    return str(tmp_path / "meta.json")


def _drain(order: SampleOrder) -> list:
    out = []
    while (item := order.next()) is not None:
        out.append(item[1])
    return out


def test_epochs_cover_internvl_concatenation_exactly(tmp_path):
    """Reference by hand: InternVL keeps int(7 * 0.5) = 3 lines of `half`, repeats `twice` 2x; two epochs hold
    every item of that concatenation twice, and the first epoch's pulls are exactly one concatenation."""
    meta = _meta(
        tmp_path,
        {
            "half": {"_lines": 7, "repeat_time": 0.5},
            "twice": {"_lines": 5, "repeat_time": 2},
            "once": {"_lines": 4},
        },
    )
    sources = open_sources(meta)
    assert [s.length for s in sources] == [3, 5, 4] and [s.repeats for s in sources] == [1, 2, 1]
    order = SampleOrder(sources, seed=3, shuffle_buffer=4, epochs=2)
    refs = _drain(order)
    per_dataset = Counter(d for d, _, _ in refs)
    assert per_dataset == {0: 3 * 2, 1: 5 * 2 * 2, 2: 4 * 2}
    # every (dataset, pass, seq) once: passes over a dataset are whole
    assert len(set(refs)) == len(refs)
    lines = Counter((d, s) for d, _, s in refs)
    expected = {(0, s): 2 for s in range(3)} | {(1, s): 4 for s in range(5)} | {(2, s): 2 for s in range(4)}
    assert lines == Counter(expected)
    # without a shuffle buffer the first 3 + 10 + 4 references are exactly one epoch
    first = _drain(SampleOrder(sources, seed=3, shuffle_buffer=1, epochs=2))[:17]
    assert Counter(d for d, _, _ in first) == {0: 3, 1: 10, 2: 4}


def test_use_data_resampling_draws_by_sqrt_of_size(tmp_path):
    meta = _meta(tmp_path, {"big": {"_lines": 400}, "small": {"_lines": 25, "repeat_time": 1}})
    order = SampleOrder(open_sources(meta), seed=0, shuffle_buffer=1, resample=True)
    counts = Counter(order.next()[1][0] for _ in range(9000))
    share = counts[0] / 9000
    assert share == pytest.approx(np.sqrt(400) / (np.sqrt(400) + np.sqrt(25)), abs=0.02)  # 0.8, not 400/425


def test_meta_keys_as_internvl(tmp_path, caplog):
    meta = _meta(tmp_path, {"a": {"_lines": 3, "repeat_time": 1, "max_dynamic_patch": 6, "colour": "red"}})
    with caplog.at_level(logging.WARNING, logger="mllm.data"):
        (spec,) = load_meta(meta)
    assert spec.max_dynamic_patch == 6 and "unknown keys ['colour']" in caplog.text
    bad = _meta(tmp_path, {"b": {"_lines": 3, "repeat_time": 1.5}})
    with pytest.raises(ValueError, match="repeat_time=1.5: above 1 it must be a whole number") as e:
        load_meta(bad)
    assert "\n" not in str(e.value)
