"""Entry point: ``torchrun --nproc-per-node=N -m mllm.train --config-name=RECIPE [--dry-run] [key=value ...]``.

The recipe is composed and fully validated for the world size (``WORLD_SIZE`` from torchrun) before any process
group or model is created; a bad config exits with one line naming the key and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m mllm.train", description=__doc__.split("\n")[0])
    p.add_argument("--config-name", "-cn", required=True, help="a recipe in recipes/ (e.g. tiny_sft)")
    p.add_argument(
        "--config-dir", "-cd", default=None, help="your own recipe directory, searched before the bundled one"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="layout, memory and FLOPs on the meta device; no model"
    )
    p.add_argument(
        "--cfg",
        nargs="?",
        const="job",
        choices=("job", "all"),
        help="print the resolved, validated config (Hydra's --cfg job) and exit",
    )
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        p.error(f"unknown option(s) {' '.join(bad)}; config overrides look like key=value")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from mllm.config import ConfigError, load_run_config, to_yaml, validate_run_config
    from mllm.train.fast_path import FastPathError
    from mllm.train.rundir import check_run_dir, run_training_cli
    from mllm.train.setup import world_size_from_env

    try:
        run = load_run_config(args.config_name, overrides, args.config_dir)
        if args.dry_run:
            run.train.dry_run = True
        run.logging.run_name = run.logging.run_name or args.config_name
        if run.train.dry_run or args.cfg:
            from mllm.train.dry_run import dry_run_world_size, print_dry_run

            world = dry_run_world_size(run)
            # The dry run plans the target machine's run: GPU fast-path keys are fine on a laptop.
            device = "cpu" if run.train.device == "cpu" else "cuda"
            validate_run_config(run, world, need_data=False, device_type=device)
            if args.cfg:
                print(to_yaml(run))
            else:
                print_dry_run(run, world)
            return 0
        validate_run_config(run, world_size_from_env())  # the fast-path keys and data files too
        check_run_dir(run)
    except (ConfigError, FastPathError) as exc:
        if os.environ.get("RANK", "0") == "0":  # the same line on every rank: print it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    from mllm.train.run import run_training

    return run_training_cli(run, run_training)


if __name__ == "__main__":
    sys.exit(main())
