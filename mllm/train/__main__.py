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
    p.add_argument(
        "--gpu-memory", type=float, default=None, metavar="GIB", help="dry run: GPU memory per rank"
    )
    p.add_argument("--search", action="store_true", help="dry run: list the best layouts for the world size")
    p.add_argument("--json", action="store_true", help="dry run: the report as JSON on the last line")
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
            memory = args.gpu_memory or run.parallel.gpu_memory_gib or None
            if args.search:
                from mllm.train.plan_report import print_search

                print_search(run, world, memory or 80.0, args.json)
                return 0
            _auto_layout(run, world, memory)
            # The dry run plans the target machine's run: GPU fast-path keys are fine on a laptop.
            device = "cpu" if run.train.device == "cpu" else "cuda"
            validate_run_config(run, world, need_data=False, device_type=device)
            if args.cfg:
                print(to_yaml(run))
            else:
                print_dry_run(run, world, memory, args.json)
            return 0
        _auto_layout(run, world_size_from_env(), None)
        validate_run_config(run, world_size_from_env())  # the fast-path keys and data files too
        check_run_dir(run)
    except (ConfigError, FastPathError) as exc:
        if os.environ.get("RANK", "0") == "0":  # the same line on every rank: print it once
            print(f"error: {exc}", file=sys.stderr)
        return 2
    from mllm.train.run import run_training

    return run_training_cli(run, run_training)


def _auto_layout(run, world: int, memory: float | None) -> None:
    """``parallel.layout=auto``: the planner's layout replaces the recipe's (printed by rank 0)."""
    import os

    from mllm.config import ConfigError
    from mllm.train.plan_report import layout_line, resolve_auto_layout

    try:
        chosen = resolve_auto_layout(run, world, memory)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    if chosen is not None and os.environ.get("RANK", "0") == "0":
        print(
            f"parallel.layout=auto: {layout_line(chosen)} (peak {chosen.max_rank_bytes / 2**30:.1f} of "
            f"{chosen.hardware.gpu_memory_gib:g} GiB, step ~{chosen.est_step_s:.1f} s estimated)"
        )


if __name__ == "__main__":
    sys.exit(main())
