"""Entry point: ``torchrun --nproc-per-node=N -m mllm.train --config-name=RECIPE [--dry-run] [key=value ...]``.

The recipe is composed and fully validated for the world size (``WORLD_SIZE`` from torchrun) before any process
group or model is created; a bad config exits with one line naming the key and the fix.
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(prog="python -m mllm.train", description=__doc__.split("\n")[0])
    p.add_argument("--config-name", "-cn", required=True, help="a recipe in recipes/ (e.g. tiny_sft)")
    p.add_argument("--config-dir", "-cd", default=None, help="another recipe directory")
    p.add_argument(
        "--dry-run", action="store_true", help="layout, memory and FLOPs on the meta device; no model"
    )
    p.add_argument("--cfg", action="store_true", help="print the composed config and exit")
    args, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        p.error(f"unknown option(s) {' '.join(bad)}; config overrides look like key=value")
    return args, overrides


def main(argv: list[str] | None = None) -> int:
    from mllm.train.signals import die_with_parent

    die_with_parent()  # the workers of a killed torchrun stop at once
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    from mllm.config import ConfigError, load_run_config, to_yaml, validate_run_config
    from mllm.train.fast_path import FastPathError
    from mllm.train.setup import world_size_from_env

    try:
        run = load_run_config(args.config_name, overrides, args.config_dir)
        if args.dry_run:
            run.train.dry_run = True
        if args.cfg:
            print(to_yaml(run))
            return 0
        if run.train.dry_run:
            from mllm.train.dry_run import dry_run_world_size, print_dry_run

            world = dry_run_world_size(run)
            # The dry run plans the target machine's run: GPU fast-path keys are fine on a laptop.
            device = "cpu" if run.train.device == "cpu" else "cuda"
            validate_run_config(run, world, need_data=False, device_type=device)
            print_dry_run(run, world)
            return 0
        validate_run_config(run, world_size_from_env())  # the fast-path keys and data files too
    except (ConfigError, FastPathError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from mllm.train.checkpoint import CheckpointWriteError
    from mllm.train.preflight import PreflightError
    from mllm.train.run import run_training
    from mllm.train.signals import EXIT_STOPPED

    try:
        result = run_training(run)
    except (PreflightError, CheckpointWriteError) as exc:
        if os.environ.get("RANK", "0") == "0":  # every rank has the same error: say it once
            print(f"error: {exc}", file=sys.stderr)
        else:  # leave rank 0 time to say it before torchrun ends the workers
            time.sleep(2.0)
        return 1
    # A stop on request (signal, stop file) saved and can resume: EX_TEMPFAIL, unlike train.stop_after.
    stopped = result.get("stopped") and result.get("stop_reason") != "train.stop_after"
    return EXIT_STOPPED if stopped else 0


if __name__ == "__main__":
    sys.exit(main())
