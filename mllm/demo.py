"""``make demo``: the main job on a tiny embedded default.

Builds the tiny InternVL model, runs a forward pass and round-trips it through both Hugging Face formats,
printing what was checked.
"""

from __future__ import annotations

import sys
import tempfile

from mllm.convert.demo_roundtrip import roundtrip_report


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mllm-demo-") as work:
        for line in roundtrip_report(work):
            print(line, flush=True)
    print("demo: all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
