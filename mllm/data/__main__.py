"""Command line: `python -m mllm.data {synth,prepare,stats}`.

python -m mllm.data synth OUT_DIR
python -m mllm.data prepare META.json OUT_DIR [--check]      # META and OUT may be s3:// URLs
python -m mllm.data stats META_OR_SHARDS --tokenizer DIR [--config-name RECIPE] [--json]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m mllm.data", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("synth", help="write the synthetic bilingual dataset, tokenizer and meta JSON")
    s.add_argument("out_dir")
    s.add_argument("--num-samples", type=int, default=1000)
    s.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("prepare", help="write webdataset tar shards + index.json from an InternVL meta JSON")
    p.add_argument("meta")
    p.add_argument("out_dir")
    p.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    p.add_argument(
        "--check", action="store_true", help="decode every image/video once; report unreadable ones"
    )
    a = sub.add_parser("stats", help="audit a meta JSON or shard directory as training would read it")
    a.add_argument("path", help="a meta JSON or a directory written by prepare")
    a.add_argument("--tokenizer", required=True, help="a local Hugging Face tokenizer directory")
    a.add_argument("--config-name", help="a recipe: its data settings and global batch (steps per epoch)")
    a.add_argument("--json", action="store_true", help="print the audit as one JSON object")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.cmd == "synth":
            from mllm.data.synth import synth

            info = synth(args.out_dir, args.num_samples, args.seed)
            print(
                f"wrote {info.num_samples} samples, meta {info.meta}, tokenizer {info.tokenizer} (vocab {info.vocab_size})"
            )
        elif args.cmd == "prepare":
            _prepare(args)
        else:
            _stats(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _prepare(args) -> None:
    from mllm.data.shards import prepare

    index = prepare(args.meta, args.out_dir, args.shard_size, check=args.check)
    for name, entry in index["datasets"].items():
        print(f"{name}: {entry['length']} samples in {len(entry['shards'])} shards")
        if args.check:
            bad = entry["unreadable"]
            print(f"  check: {entry['missing_images']} files missing, {bad['count']} unreadable")
            for example in bad["examples"]:
                print(f"    {example}")


def _stats(args) -> None:
    from mllm.data.config import DataConfig
    from mllm.data.stats import audit, format_audit

    logging.getLogger("mllm.data").setLevel(logging.ERROR)  # rejections are in the report, not the log
    if args.config_name:
        from mllm.config import ConfigError, load_run_config

        try:
            run = load_run_config(
                args.config_name, [f"data.path={args.path}", f"data.tokenizer={args.tokenizer}"]
            )
        except ConfigError as e:
            raise ValueError(str(e)) from e
        cfg, global_batch = run.data, run.train.global_batch_size
    else:
        cfg, global_batch = DataConfig(path=args.path, tokenizer=args.tokenizer), None
    report = audit(cfg, global_batch)
    print(json.dumps(report, ensure_ascii=False) if args.json else format_audit(report))


if __name__ == "__main__":
    sys.exit(main())
