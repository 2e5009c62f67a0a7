"""The training loop: parallel model + AdamW groups + schedule + checkpoints + metrics, with exact resume.

Exactness: the state after step N is (weights, AdamW state, schedule step, RNG states, data-loader state), all
saved; every step is a pure function of that state, so N steps + resume + N steps reproduces 2N straight steps
bit for bit (fp32, CPU, same layout). Non-finite steps are skipped identically on every rank because the loss
and the gradient norm are all-reduced before the decision.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from mllm.train import signals
from mllm.train import state as ckpt_state
from mllm.train.batches import BatchSource, MicroBatchStats, PixelFeeder, micro_batch_stats, model_inputs
from mllm.train.checkpoint import (
    CheckpointManager,
    latest_checkpoint,
    list_checkpoints,
    pause_before_commit_from_env,
    read_meta,
    resolve_resume,
    rng_state,
    set_rng_state,
)
from mllm.train.config import RunConfig
from mllm.train.export import checkpoint_config_files
from mllm.train.fast_path import apply_fast_path, forward_context, fp8_amax_group, validate_fast_path
from mllm.train.flops import TrainedParts, peak_tflops_for, step_flops
from mllm.train.metrics import peak_memory_gib
from mllm.train.optim import LRSchedule, build_adamw, build_param_groups, build_sharded_adamw
from mllm.train.reporting import RunReporter
from mllm.train.setup import compute_dtype, load_initial_state, rank_seed, resolve_device, seed_everything
from parallel.mesh import ParallelMesh, build_mesh
from parallel.model import ParallelModel, parallelize

SAVE_AND_EXIT_FILE = signals.STOP_FILE
DONE_FILE = "DONE"


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a NaN/inf loss or gradient norm."""


class Trainer:
    """One rank's trainer. Every rank constructs it and calls ``fit`` (torch.distributed already initialized)."""

    def __init__(
        self, run: RunConfig, make_batches: Callable[[RunConfig, ParallelMesh], BatchSource]
    ) -> None:
        self.run = run
        self.device = resolve_device(run)
        self.dtype = compute_dtype(run, self.device)
        self.mesh = build_mesh(run.parallel, self.device.type)
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.run_dir = Path(run.train.run_dir)
        seed_everything(rank_seed(run.train.seed, self.mesh.dp_rank, self.mesh.pp_rank))
        self.pm: ParallelModel = parallelize(
            run.model,
            run.parallel,
            self.mesh,
            self.device,
            load_initial_state(run),
            run.train.seed,
            compute_dtype=self.dtype,
        )
        self.pm.train()
        validate_fast_path(run, self.device.type)
        self.fast_path = apply_fast_path(self.pm, run)  # FP8, then compile; before the optimizer exists
        te_fp8 = run.fp8.enabled and run.parallel.layer_backend == "te"
        self.fp8_amax_group = fp8_amax_group(self.mesh) if te_fp8 else None
        groups = build_param_groups(self.pm.named_parameters(), run.optim, run.model.vision.num_layers)
        if run.parallel.shard_optimizer and self.mesh.dp > 1:
            self.optimizer = build_sharded_adamw(groups, run.optim, self.mesh.dp_group)
        else:
            self.optimizer = build_adamw(groups, run.optim)
        ckpt_state.init_optimizer_state(self.optimizer)
        self.config_files = checkpoint_config_files(run)
        self.batches = make_batches(run, self.mesh)
        if run.train.epochs is not None:  # the data as it will be packed decides the schedule's length
            run.train.steps = self.batches.count_steps()
        self.schedule = LRSchedule(run.optim, run.train.steps)
        self.pixels = PixelFeeder(self.device, run.train.pixels_ahead, runs_vision=self.pm.runs_vision)
        self.grad_accum = run.train.global_batch_size // (run.data.micro_batch_size * self.mesh.dp)
        self.ckpt = CheckpointManager(
            run.checkpoint.dir or self.run_dir / "checkpoints",
            run.checkpoint.keep_last,
            # An asynchronous save runs DCP's collectives in a background thread while training runs its
            # own: they need a process group of their own (gloo: DCP only exchanges plans and metadata).
            group=dist.new_group(backend="gloo") if run.checkpoint.async_save else None,
            async_save=run.checkpoint.async_save,
        )
        self.ckpt.before_commit = pause_before_commit_from_env(self.run_dir, self.rank)
        self.stops = signals.StopRequests(self.run_dir)
        self.step = 0  # optimizer steps done
        self.skipped = 0
        self.consecutive_nonfinite = 0
        self.trained = TrainedParts(
            vision=not run.parallel.freeze_vision,
            projector=not run.parallel.freeze_projector,
            llm=not run.parallel.freeze_llm,
            vision_adapters=run.model.lora.vision > 0,
            llm_adapters=run.model.lora.llm > 0,
        )
        self.peak_tflops = peak_tflops_for(
            torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            run.logging.peak_tflops,
        )

    # -- checkpoints ---------------------------------------------------------------------------------------
    def layout(self) -> dict[str, int]:
        layout = {"tp": self.mesh.tp, "pp": self.mesh.pp, "dp": self.mesh.dp, "world": self.world}
        if self.mesh.dp_shard > 1:
            layout["dp_shard"] = self.mesh.dp_shard
        return layout

    def save(self) -> Path:
        extra = {
            "rng": rng_state(),
            "data": self.batches.state_dict(),
            "dp_rank": self.mesh.dp_rank,
            "counters": {"skipped": self.skipped, "consecutive_nonfinite": self.consecutive_nonfinite},
        }
        meta = {"layout": self.layout(), "backend": self.run.parallel.layer_backend}
        state = ckpt_state.checkpoint_state(self.pm, self.optimizer)
        return self.ckpt.save(self.step, state.tensors, extra, meta, state.chunks, self.config_files)

    def resume(self, path: Path) -> None:
        """Load weights/optimizer into this layout, the data state (see ``_resume_data``), RNG and counters when
        the layout matches."""
        state = ckpt_state.checkpoint_state(self.pm, self.optimizer)
        extra, meta = self.ckpt.load(path, state.tensors, state.chunks)
        ckpt_state.restore(state)
        self.step = int(meta["step"])
        self.schedule.load_state_dict({"step": self.step})
        same_layout = meta["layout"] == self.layout()
        self._resume_data(path, meta)
        if same_layout and extra is None:
            print(
                f"warning: rank {self.rank}: {path}/extra/rank_{self.rank:05d}.pt is missing: this rank's RNG "
                "states (python, numpy, torch) are re-seeded from the step and its skip counters restart at 0",
                file=sys.stderr,
            )
        if same_layout and extra is not None:
            set_rng_state(extra["rng"])
            self.skipped = extra["counters"]["skipped"]
            self.consecutive_nonfinite = extra["counters"]["consecutive_nonfinite"]
        else:  # another layout: RNG streams cannot be mapped; reseed deterministically from the step
            seed_everything(rank_seed(self.run.train.seed + self.step, self.mesh.dp_rank, self.mesh.pp_rank))

    def _resume_data(self, path: Path, meta: dict) -> None:
        """Data-loader state from every rank's extra file (this rank's own may not exist after a layout
        change): sources with ``load_all_states`` resume exactly under any layout; others get this dp rank's
        state at the same dp size, else the step to restart from."""
        extras = [torch.load(f, weights_only=False) for f in sorted((path / "extra").glob("rank_*.pt"))]
        load_all = getattr(self.batches, "load_all_states", None)
        if load_all is not None:
            load_all([e["data"] for e in extras])
            return
        mine = [e["data"] for e in extras if e["dp_rank"] == self.mesh.dp_rank]
        if meta["layout"]["dp"] == self.mesh.dp and mine:
            self.batches.load_state_dict(mine[0])
        else:
            self.batches.load_state_dict({"resume_global_step": self.step, "layout": meta["layout"]})

    # -- the loop -----------------------------------------------------------------------------------------
    def fit(self) -> dict:
        run = self.run
        self.stops.install()
        resume_from = resolve_resume(run.checkpoint.resume, self.ckpt.root, self.ckpt.group)
        if resume_from is not None:
            self.resume(resume_from)
        logger = RunReporter(self, resume_from)  # banner (with the resume point), metric sinks, validation
        if run.train.epochs is not None:
            logger.message(f"train.epochs={run.train.epochs}: {run.train.steps} optimizer steps")
        last_loss = float("nan")
        try:
            while self.step < run.train.steps:
                reason = self._stop_requested()
                if reason:
                    why = "train.stop_after" if reason < 0 else signals.REASONS[reason]
                    logger.message(f"stopping ({why}): checkpointing step {self.step}")
                    self.ckpt.finalize()  # an asynchronous save of this very step needs no second save
                    if (
                        not list_checkpoints(self.ckpt.root)
                        or read_meta(latest_checkpoint(self.ckpt.root))["step"] != self.step
                    ):
                        self.save()
                    self.ckpt.finalize()
                    if reason > 0:
                        self.stops.acknowledge(self.rank, self.step, reason)
                    result = {"step": self.step, "loss": last_loss, "stopped": True, "stop_reason": why}
                    logger.finish(result)
                    return result
                record = self.train_step()
                last_loss = record["loss"]
                if self.rank == 0:
                    signals.beat(self.run_dir, self.step)
                if self.step % run.logging.every == 0 or self.step == run.train.steps:
                    logger.log_step(record)
                logger.after_step(self.step)  # validation when due
                if run.checkpoint.every and self.step % run.checkpoint.every == 0:
                    self.save()
            if run.checkpoint.save_final and (not run.checkpoint.every or self.step % run.checkpoint.every):
                self.save()
            self.ckpt.finalize()
            logger.finish({"step": self.step, "loss": last_loss, "stopped": False})
        finally:
            self.stops.restore()
            logger.close()
        if self.rank == 0:
            (self.run_dir / DONE_FILE).write_text(f"{self.step}\n")
        return {"step": self.step, "loss": last_loss, "stopped": False}

    def train_step(self) -> dict:
        """One optimizer step over the global batch; returns the metrics record."""
        t0 = time.perf_counter()
        micro = self.batches.next_micro_batches(self.grad_accum)
        stats = sum((micro_batch_stats(mb) for mb in micro), MicroBatchStats())
        lr = self.schedule.apply(self.optimizer, self.step)
        autocast = torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with autocast, forward_context(self.run, self.fp8_amax_group):
            result = self.pm.forward_backward(self.pixels.wrap([model_inputs(mb) for mb in micro]))
        clip = self.run.optim.grad_clip if self.run.optim.grad_clip > 0 else float("inf")
        grad_norm = float(self.pm.clip_grad_norm_(clip))
        loss = float(result.loss)
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.consecutive_nonfinite = 0
        else:
            self._on_nonfinite(loss, grad_norm, stats)
        self.pm.zero_grad()
        self.step += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        step_time = time.perf_counter() - t0
        return self._record(loss, grad_norm, lr, stats, step_time)

    def _on_nonfinite(self, loss: float, grad_norm: float, stats: MicroBatchStats) -> None:
        self.skipped += 1
        self.consecutive_nonfinite += 1
        k = self.run.train.max_consecutive_nonfinite
        ids: list = [None] * self.world
        dist.all_gather_object(ids, stats.sample_ids)
        if self.rank == 0:  # ids as in samples.jsonl: "<dataset>:<annotation line>"
            samples = sorted({i for rank_ids in ids for i in rank_ids}, key=str)
            print(
                f"step {self.step + 1}: loss {loss} / grad norm {grad_norm} non-finite, skipped; samples {samples}"
            )
        if self.consecutive_nonfinite < k:
            return
        raise NonFiniteError(
            f"step {self.step}: loss {loss} / grad norm {grad_norm} non-finite for {k} consecutive steps "
            f"(train.max_consecutive_nonfinite={k}); this step's micro-batches hold sample ids "
            f"{sorted({i for rank_ids in ids for i in rank_ids}, key=str)}; check those samples or lower optim.lr"
        )

    def _record(
        self, loss: float, grad_norm: float, lr: float, stats: MicroBatchStats, step_time: float
    ) -> dict:
        # Counts are summed over data-parallel replicas (tp/pp ranks of one replica see the same batches).
        counts = torch.tensor(
            [
                stats.tokens,
                stats.tiles,
                stats.samples,
                self.batches.bad_samples(),
                self.batches.truncated_samples(),
            ],
            dtype=torch.float64,
            device=self.device,
        )
        if self.mesh.dp > 1:
            dist.all_reduce(counts, group=self.mesh.dp_group)
        local_flops = step_flops(
            self.run.model, [(n, 0) for n in stats.sample_lengths] + [(0, stats.all_tiles)], self.trained
        ).total
        flops = torch.tensor([local_flops], dtype=torch.float64, device=self.device)
        if self.mesh.dp > 1:
            dist.all_reduce(flops, group=self.mesh.dp_group)
        tflops = float(flops.item()) / max(step_time, 1e-9) / self.world / 1e12
        tokens, tiles, samples, bad, truncated = (int(x) for x in counts.tolist())
        return {
            "step": self.step,
            "loss": loss,
            "grad_norm": grad_norm,
            "lr": lr,
            "tokens": tokens,
            "tiles": tiles,
            "samples": samples,
            "bad_samples": bad,
            "truncated_samples": truncated,
            "skipped_steps": self.skipped,
            "step_time": step_time,
            "tokens_per_s": tokens / max(step_time, 1e-9),
            "tflops_per_device": tflops,
            "mfu": tflops / self.peak_tflops if self.peak_tflops else 0.0,
            "peak_mem": peak_memory_gib(self.device),
            "vision_pad": self.pm.vision_pad_fraction,  # padded share of tiles sent between ViT stages
        }

    def _stop_requested(self) -> int:
        """-1: ``train.stop_after`` reached; > 0: a stop signal or the stop file (``signals.REASONS``), agreed
        on by every rank in the step's one all-reduce, which also commits a finished asynchronous save."""
        if self.run.train.stop_after is not None and self.step >= self.run.train.stop_after:
            return -1
        reason, save_in_flight = signals.agree(
            self.stops.local_reason(), self.ckpt.save_in_flight(), self.device
        )
        if not save_in_flight:
            self.ckpt.finalize()  # finished on every rank: commit now, not at the next save
        return reason
