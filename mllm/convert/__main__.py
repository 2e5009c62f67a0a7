"""``python -m mllm.convert {import-hf,export-hf} ...``: convert between HF directories and native checkpoints;
``export-hf`` also reads a trainer checkpoint (``RUN_DIR/checkpoints/step_XXXXXXXX``, any parallel layout)."""

from __future__ import annotations

import argparse
import sys

import torch

from mllm.convert.core import HF_FORMATS, export_hf, import_hf
from mllm.convert.errors import CheckpointError
from mllm.convert.files import DEFAULT_MAX_SHARD_SIZE

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mllm.convert", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import-hf", help="HF directory (InternVL-Chat or transformers) -> native checkpoint"
    )
    imp.add_argument("hf_dir")
    imp.add_argument("out_dir")
    exp = sub.add_parser(
        "export-hf",
        help="native, HF or trainer checkpoint (RUN_DIR/checkpoints/step_XXXXXXXX) -> HF directory",
    )
    exp.add_argument("ckpt_dir")
    exp.add_argument("out_dir")
    exp.add_argument("--format", required=True, choices=sorted(HF_FORMATS))
    exp.add_argument(
        "--max-shard-size", default=DEFAULT_MAX_SHARD_SIZE, help="e.g. 5GB, 500MB (default %(default)s)"
    )
    exp.add_argument(
        "--adapter",
        metavar="ADAPTER_DIR",
        default=None,
        help="LoRA checkpoints: write the base model to OUT_DIR and a PEFT adapter to ADAPTER_DIR (format "
        "transformers) instead of merged weights",
    )
    for p in (imp, exp):
        p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="cast weights (default: keep)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype] if args.dtype else None
    try:
        if args.command == "import-hf":
            out = import_hf(args.hf_dir, args.out_dir, dtype=dtype)
        else:
            out = export_hf(
                args.ckpt_dir,
                args.out_dir,
                args.format,
                args.max_shard_size,
                dtype=dtype,
                adapter_dir=args.adapter,
            )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
