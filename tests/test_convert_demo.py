"""The ``make demo`` round trip runs and reports both formats."""

from __future__ import annotations

import pytest

from demo.roundtrip import roundtrip_report

pytest.importorskip("transformers")


def test_roundtrip_report(tmp_path) -> None:
    lines = roundtrip_report(tmp_path)
    assert len(lines) == 3
    assert "bit-identical" in lines[1] and "InternVLForConditionalGeneration" in lines[2]
