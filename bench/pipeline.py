"""Pipeline balance benchmark: simulated step efficiency of a recipe at pp 2, 4 and 8.

For each pp: dp = gpus / (tp * pp) replicas each pack their own stream of the synthetic SFT-like mix of
bench/packing.py (scaled to the recipe's row length, tile budget and image tokens) with the real packer; every
micro-batch is costed per stage with the project's FLOP model (``parallel.stage_split.unit_costs``: its tiles,
its samples' attention, the frozen parts of the recipe); the schedule is simulated (``parallel.pipeline_sim``)
and the step takes as long as the slowest replica. ``efficiency`` = ideal / simulated step time, the ideal being
the replicas' mean work spread evenly over pp ranks with no bubble (so it also counts dp imbalance).

- baseline (today's placement): ViT + projector on stage 0, LLM layers balanced around it, 1F1B, packing
  without a tile target.
- ours: ``best_stage_split`` (ViT layers across the leading stages, balanced per physical rank), 1F1B or
  interleaved 1F1B (2 virtual stages), packing untiled or tile-balanced (``tiles_per_row=-1``: the mix's own
  tiles per row), whichever gives the most useful work per time (efficiency x fill: padding tokens cost LLM
  time too, and the tile target can cost fill); ``goodput_vs_baseline`` is that product over the baseline's. ``vit_pad`` is the share of padded tiles in the ViT activations sent between stages
  (padding to the step's largest micro-batch; communication only, the receiving stage slices it off).

    .venv/bin/python bench/pipeline.py [--config-name internvl1_5_26b_sft] [--gpus 256] [--steps 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

from packing import make_stream  # noqa: E402

from mllm.config import load_run_config  # noqa: E402
from mllm.data.packing import FlopModel, Packer, row_level  # noqa: E402
from mllm.train.flops import TrainedParts  # noqa: E402
from parallel.pipeline_sim import simulate  # noqa: E402
from parallel.stage_split import Split, best_stage_split, unit_costs  # noqa: E402

WARMUP_ROWS = 512


def pack_rows(seed: int, n_rows: int, data, tiles_per_row: int) -> list[list[tuple[int, int]]]:
    """``n_rows`` rows of (tokens, tiles) samples from one replica's stream, after ``WARMUP_ROWS`` rows (the
    packer's buffer settles: hard-to-combine samples accumulate and fill drops over the first few hundred)."""
    n_rows += WARMUP_ROWS
    stream = make_stream(
        seed,
        n_rows * 6 + 2 * data.pack_buffer,
        data.seq_len,
        data.max_tiles_per_row,
        data.num_image_token,
        data.max_dynamic_patch,
    )
    flops = FlopModel(data.llm_flops_per_token, data.llm_attn_flops_per_token_pair, data.vit_flops_per_tile)
    packer = Packer(
        data.seq_len, data.max_tiles_per_row, flops, buffer_size=data.pack_buffer, tiles_per_row=tiles_per_row
    )
    rows, fed = [], 0
    while len(rows) < n_rows:
        while not packer.ready():
            packer.add(fed, *stream[fed])
            fed += 1
        rows.append([stream[p] for p in packer.pop_row(row_level(packer.rows_emitted))])
    return rows[WARMUP_ROWS:]


def micro_batches(rows: list[list[tuple[int, int]]], mbs: int) -> list[tuple[int, float]]:
    """(tiles, mean attention length) of each micro-batch; a text-only micro-batch still runs one dummy tile."""
    out = []
    for i in range(0, len(rows) - mbs + 1, mbs):
        samples = [s for row in rows[i : i + mbs] for s in row]
        tiles = max(1, sum(t for _, t in samples))
        tokens = sum(t for t, _ in samples)
        out.append((tiles, sum(t * t for t, _ in samples) / max(1, tokens)))
    return out


def run_layout(cfg, data, parts, split: Split, schedule: str, virtual: int, replicas: list) -> dict:
    """Simulate every replica's steps; efficiency = sum of ideal steps / sum of simulated (slowest replica)."""
    tokens = data.seq_len * data.micro_batch_size
    ideal_sum = step_sum = 0.0
    pad_num = pad_den = 0.0
    busy = np.zeros(split.pp)
    for step_mbs in zip(*replicas):  # one step: every replica's micro-batches of that step
        sims = []
        for mbs_of_replica in step_mbs:
            costs = [split.stage_costs(unit_costs(cfg, t, tokens, a, parts)) for t, a in mbs_of_replica]
            sims.append(simulate(schedule, split.pp, virtual, costs))
            if sum(1 for n in split.vision_layers if n) > 1:
                budget = max(t for t, _ in mbs_of_replica)
                pad_num += sum(budget - t for t, _ in mbs_of_replica)
                pad_den += budget * len(mbs_of_replica)
        ideal_sum += float(np.mean([sum(s.busy) / split.pp for s in sims]))
        step_sum += max(s.step for s in sims)
        busy += np.mean([s.busy for s in sims], axis=0)
    loads = busy / busy.mean()
    bubble = 1.0 - float(np.mean([sum(s.busy) / (split.pp * s.step) for s in sims]))
    return {
        "efficiency": ideal_sum / step_sum,
        "bubble": bubble,
        "loads": [round(float(x), 3) for x in loads],
        "vit_pad": pad_num / pad_den if pad_den else 0.0,
        "split": f"vit {list(split.vision_layers)} llm {list(split.llm_layers)}",
        "schedule": schedule if virtual == 1 else f"{schedule} v{virtual}",
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config-name", default="internvl1_5_26b_sft")
    ap.add_argument("--gpus", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--pp", type=int, nargs="+", default=[2, 4, 8])
    args = ap.parse_args()
    run = load_run_config(args.config_name)
    cfg, data, pcfg = run.model, run.data, run.parallel
    parts = TrainedParts(
        vision=not pcfg.freeze_vision, projector=not pcfg.freeze_projector, llm=not pcfg.freeze_llm
    )
    results: dict[int, dict] = {}
    for pp in args.pp:
        dp = max(1, args.gpus // (pcfg.tp * pp))
        n_micro = max(1, run.train.global_batch_size // (dp * data.micro_batch_size))
        n_rows = n_micro * data.micro_batch_size * args.steps
        streams, mean_tiles, fill = {}, {}, {}
        for name, target in (("untiled", 0), ("tiled", -1)):
            packed = [pack_rows(7000 + r, n_rows, data, target) for r in range(dp)]
            mbs = [micro_batches(rows, data.micro_batch_size) for rows in packed]
            streams[name] = [[m[i : i + n_micro] for i in range(0, len(m), n_micro)] for m in mbs]
            all_rows = [row for rows in packed for row in rows]
            mean_tiles[name] = float(np.mean([sum(t for _, t in row) for row in all_rows]))
            fill[name] = sum(n for row in all_rows for n, _ in row) / (len(all_rows) * data.seq_len)
        today = best_stage_split(
            cfg, pp, 1, mean_tiles["untiled"], data.seq_len, data.micro_batch_size, False, parts=parts
        )
        base = run_layout(cfg, data, parts, today, "1f1b", 1, streams["untiled"])
        base.update(packing="untiled", fill=fill["untiled"])
        candidates = []
        for virtual, packing in itertools.product((1, 2), ("untiled", "tiled")):
            if cfg.text.num_layers < pp * virtual or (virtual > 1 and n_micro % pp):
                continue
            split = best_stage_split(
                cfg, pp, virtual, mean_tiles[packing], data.seq_len, data.micro_batch_size, parts=parts
            )
            schedule = "1f1b" if virtual == 1 else "interleaved_1f1b"
            res = run_layout(cfg, data, parts, split, schedule, virtual, streams[packing])
            res.update(packing=packing, fill=fill[packing])
            candidates.append(res)
        # Padding tokens run through the LLM too: rank by useful work per time (efficiency x fill).
        ours = max(candidates, key=lambda r: r["efficiency"] * r["fill"])
        results[pp] = {"dp": dp, "n_micro": n_micro, "baseline": base, "ours": ours}
    print(
        f"recipe {args.config_name}: {args.gpus} GPUs, tp {pcfg.tp}, global batch {run.train.global_batch_size}"
    )
    print(
        f"{'pp':>3} {'dp':>3} {'mb':>4} {'layout':<9} {'packing':<8} {'fill':>6} {'eff':>6} {'bubble':>7} "
        f"{'vit_pad':>8}  schedule / split / loads"
    )
    for pp, r in results.items():
        for label in ("baseline", "ours"):
            x = r[label]
            print(
                f"{pp:>3} {r['dp']:>3} {r['n_micro']:>4} {label:<9} {x['packing']:<8} {x['fill']:6.3f} "
                f"{x['efficiency']:6.3f} {x['bubble']:7.3f} "
                f"{x['vit_pad']:8.3f}  {x['schedule']} / {x['split']} / {x['loads']}"
            )
    print(
        json.dumps(
            {
                "efficiency": {str(pp): round(r["ours"]["efficiency"], 4) for pp, r in results.items()},
                "baseline_efficiency": {
                    str(pp): round(r["baseline"]["efficiency"], 4) for pp, r in results.items()
                },
                "bubble": {str(pp): round(r["ours"]["bubble"], 4) for pp, r in results.items()},
                "vit_pad": {str(pp): round(r["ours"]["vit_pad"], 4) for pp, r in results.items()},
                "fill": {str(pp): round(r["ours"]["fill"], 4) for pp, r in results.items()},
                "baseline_fill": {str(pp): round(r["baseline"]["fill"], 4) for pp, r in results.items()},
                "packing": {str(pp): r["ours"]["packing"] for pp, r in results.items()},
                "goodput_vs_baseline": {
                    str(pp): round(
                        r["ours"]["efficiency"]
                        * r["ours"]["fill"]
                        / (r["baseline"]["efficiency"] * r["baseline"]["fill"]),
                        3,
                    )
                    for pp, r in results.items()
                },
            }
        )
    )


if __name__ == "__main__":
    main()
