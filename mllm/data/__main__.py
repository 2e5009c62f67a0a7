"""Command line: `python -m mllm.data synth OUT_DIR` and `python -m mllm.data prepare META.json OUT_DIR`."""

from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mllm.data", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the synthetic bilingual dataset, tokenizer and meta JSON")
    s.add_argument("out_dir")
    s.add_argument("--num-samples", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prepare", help="write webdataset tar shards + index.json from an InternVL meta JSON")
    p.add_argument("meta")
    p.add_argument("out_dir")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "synth":
            from mllm.data.synth import synth

            info = synth(args.out_dir, args.num_samples, args.seed)
            print(
                f"wrote {info.num_samples} samples, meta {info.meta}, tokenizer {info.tokenizer} (vocab {info.vocab_size})"
            )
        else:
            from mllm.data.shards import prepare

            index = prepare(args.meta, args.out_dir, args.shard_size)
            for name, entry in index["datasets"].items():
                print(f"{name}: {entry['length']} samples in {len(entry['shards'])} shards")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
