"""``ParallelModel``: one rank's shard of InternVL plus the training step over micro-batches."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from mllm.model.config import ModelConfig
from mllm.model.internvl import default_position_ids
from mllm.model.loss import IGNORE_INDEX, loss_weights
from parallel.build import RankSkeleton, build_rank_skeleton, materialize
from parallel.comm import all_reduce_no_grad
from parallel.config import ParallelConfig, validate_layout
from parallel.frozen import hold_frozen_in
from parallel.fsdp import apply_fsdp, copy_rows_, full_tp_local, resolve_dtype, set_micro_batch_sync, to_local
from parallel.grads import clip_grad_norm_, finish_grad_sync
from parallel.loss import vocab_parallel_cross_entropy
from parallel.memory import RankMemory, rank_memory
from parallel.mesh import ParallelMesh
from parallel.optim import optimizer_state_bytes
from parallel.pipeline import StageModule, build_schedule, run_schedule
from parallel.shard import gather_full_tensor, shard_full_tensor

MicroBatch = Mapping[str, torch.Tensor]


@dataclass
class StepResult:
    """loss: the global-batch loss (same on every rank, detached); num_tokens: supervised tokens in the global
    batch; total_weight: the loss normalizer (= num_tokens in "token" mode)."""

    loss: torch.Tensor
    num_tokens: int
    total_weight: float


class ParallelModel:
    """This rank's model shard (``module``, full-model parameter names) and its pipeline stage(s)."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        pcfg: ParallelConfig,
        mesh: ParallelMesh,
        skeleton: RankSkeleton,
        device,
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        self.model_cfg, self.pcfg, self.mesh, self.device = model_cfg, pcfg, mesh, torch.device(device)
        self.module = skeleton.module
        self.specs, self.sp_params, self.tp = skeleton.specs, skeleton.sp_params, skeleton.tp
        self.stage_ids = skeleton.stage_ids
        last, projector = pcfg.num_stages - 1, skeleton.projector_stage
        self.vision_spans_stages = projector > 0
        self.stages = [
            StageModule(self.module, layers, sid == 0, sid == last, self.tp, pcfg, vision, sid == projector)
            for sid, layers, vision in zip(
                skeleton.stage_ids, skeleton.stage_layers, skeleton.stage_vision_layers
            )
        ]
        self._schedules: dict[tuple, object] = {}
        self.grad_reducer = None
        if mesh.dp_shard > 1:
            apply_fsdp(
                self.stages,
                mesh,
                resolve_dtype(pcfg.fsdp_param_dtype, compute_dtype),
                resolve_dtype(pcfg.fsdp_reduce_dtype, torch.float32),
            )
        elif mesh.dp > 1:
            from parallel.overlap import GradReducer

            self.grad_reducer = GradReducer(self.trainable_parameters(), mesh.dp_group, pcfg.bucket_size_mb)
        self.vision_pad_fraction = 0.0  # of the last step's tile activations sent between ViT stages
        # Ranks that need a micro-batch's tiles (the ViT) or its image flags (the projector stage). When the
        # ViT spans stages every rank needs the tile counts too: the step's tile budget keys the pipeline
        # schedule, which all stages must rebuild together (an uncalled DevicePixels copies nothing).
        self.runs_vision = self.vision_spans_stages or any(
            stage.runs_vision or stage.has_projector for stage in self.stages
        )

    # -- parameters ---------------------------------------------------------------------------------------
    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """Local shards under full-model names (only this pipeline rank's parameters)."""
        return self.module.named_parameters()

    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.module.named_parameters() if p.requires_grad]

    def zero_grad(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def train(self, mode: bool = True) -> ParallelModel:
        self.module.train(mode)
        return self

    # -- training step ------------------------------------------------------------------------------------
    def forward_backward(self, micro_batches: Sequence[MicroBatch]) -> StepResult:
        """Forward and backward over this data-parallel rank's micro-batches; gradients end up synchronized.

        Every rank of one data-parallel replica (all its tp and pp ranks) must get the same micro-batches.
        Each micro-batch: input_ids, labels (already shifted) [B, S]; optional segment_ids, position_ids [B, S],
        pixel_values [N, 3, H, W] (or a callable returning them on first use: tiles just in time) and
        image_flags [N] (its own tiles). Gradients accumulate into ``.grad``
        (call ``zero_grad`` between optimizer steps) as d(global loss)/d(param) for the global batch.
        """
        mbs = [self._prepare(mb) for mb in micro_batches]
        if self.grad_reducer is not None:
            self.grad_reducer.start(len(mbs))
        stats = torch.stack([torch.stack([mb["weights"].sum(), mb["n_tokens"]]) for mb in mbs]).sum(0)
        all_reduce_no_grad(stats, self.mesh.dp_group)
        total_weight = stats[0].clamp(min=1e-12)

        def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
            return self._weighted_loss_sum(logits, target) / total_weight

        # The pipeline schedule wants one tensor per micro-batch as the loss target: labels (exact in fp32,
        # ids < 2^24) stacked with the per-token weights.
        targets = [torch.stack([mb["labels"].float(), mb["weights"]]) for mb in mbs]
        if self.mesh.pp == 1:
            local_loss = self._run_no_pipeline(mbs, targets, loss_fn)
        else:
            local_loss = self._run_pipeline(mbs, targets, loss_fn)
        finish_grad_sync(self)
        loss = local_loss.detach().float().reshape(()).to(self.device)
        all_reduce_no_grad(loss, self.mesh.pp_group)
        all_reduce_no_grad(loss, self.mesh.dp_group)
        return StepResult(loss=loss, num_tokens=int(stats[1].item()), total_weight=float(stats[0].item()))

    def _prepare(self, mb: MicroBatch) -> dict[str, torch.Tensor]:
        out = {k: (v.to(self.device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()}
        if "input_ids" not in out or "labels" not in out:
            raise KeyError("each micro-batch needs 'input_ids' and 'labels' (already shifted)")
        seq = out["input_ids"].shape[1]
        if self.pcfg.sequence_parallel and seq % self.mesh.tp:
            raise ValueError(
                f"sequence length {seq} is not divisible by tp={self.mesh.tp}: pad packed rows to a multiple of "
                f"tp when parallel.sequence_parallel is on"
            )
        if out.get("position_ids") is None:
            out["position_ids"] = default_position_ids(out["input_ids"], out.get("segment_ids"))
        if isinstance(out.get("pixel_values"), torch.Tensor):
            out["pixel_values"] = out["pixel_values"].to(next(self.module.parameters()).dtype)
        out["weights"] = loss_weights(out["labels"], out.get("segment_ids"), self.pcfg.loss_mode)
        out["n_tokens"] = (out["labels"] != IGNORE_INDEX).sum().float()
        return out

    @staticmethod
    def _stage_kwargs(mb: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
        keys = ("segment_ids", "position_ids", "pixel_values", "image_flags", "input_ids")
        return {k: mb.get(k) for k in keys}

    def _weighted_loss_sum(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        labels, weights = target[0].long(), target[1]
        vocab_start = self.tp.rank * logits.shape[-1]
        per_token = vocab_parallel_cross_entropy(
            logits, labels, vocab_start, self.tp.group, self.model_cfg.text.vocab_size
        )
        return (per_token * weights).sum()

    def _run_no_pipeline(self, mbs, targets, loss_fn) -> torch.Tensor:
        stage = self.stages[0]
        total = torch.zeros((), device=self.device)
        for i, (mb, target) in enumerate(zip(mbs, targets)):
            if self.mesh.dp_shard > 1:
                last = i == len(mbs) - 1
                set_micro_batch_sync(self.stages, last or self.pcfg.reduce_grads_every_micro_batch, last)
            loss = loss_fn(stage(mb["input_ids"], **self._stage_kwargs(mb)), target)
            loss.backward()
            total += loss.detach()
        return total

    def _run_pipeline(self, mbs, targets, loss_fn) -> torch.Tensor:
        shapes = {tuple(mb["input_ids"].shape) for mb in mbs}
        if len(shapes) != 1:
            raise ValueError(
                f"under pipeline parallelism all micro-batches need one [B, S] shape, got {shapes}"
            )
        n = len(mbs)
        if self.pcfg.virtual_stages > 1 and n % self.mesh.pp:
            raise ValueError(
                f"{self.pcfg.pp_schedule} needs a micro-batch count divisible by pp={self.mesh.pp}, got {n}"
            )
        key = (n, shapes.pop(), self.pcfg.sequence_parallel, self._set_tile_budget(mbs))
        if key not in self._schedules:
            self._schedules[key] = build_schedule(
                self.stages, self.stage_ids, self.pcfg, self.mesh, self.device, n, loss_fn
            )
        schedule = self._schedules[key]
        schedule._loss_fn = loss_fn  # the normalizer changes every step; the schedule reads it per call
        losses: list[torch.Tensor] = []
        run_schedule(
            schedule,
            [(mb["input_ids"],) for mb in mbs],
            [self._stage_kwargs(mb) for mb in mbs],
            targets,
            losses,
        )
        if not losses:
            return torch.zeros((), device=self.device)
        return torch.stack([loss.detach().reshape(()) for loss in losses]).sum()

    def _set_tile_budget(self, mbs) -> int:
        """With the ViT over several stages, tile activations travel padded to the step's largest micro-batch
        (``vision_pad_fraction`` of them is padding: communication only). Returns the budget (0: no ViT hop)."""
        if not self.vision_spans_stages:
            return 0
        if any(mb.get("pixel_values") is None for mb in mbs):
            raise ValueError(
                "the ViT spans pipeline stages: every micro-batch needs pixel_values (a dummy tile with "
                "image_flags 0 for text-only micro-batches, as the packed loader sends)"
            )
        tiles = [mb["pixel_values"].shape[0] for mb in mbs]
        budget = max(tiles)
        self.vision_pad_fraction = 1.0 - sum(tiles) / (budget * len(tiles))
        for stage in self.stages:
            stage.tile_budget = budget
        return budget

    # -- gradients ----------------------------------------------------------------------------------------
    def clip_grad_norm_(self, max_norm: float) -> torch.Tensor:
        """Clip by the global L2 norm over all tp/pp shards (replicated parameters counted once)."""
        return clip_grad_norm_(self, max_norm)

    # -- start-up report ----------------------------------------------------------------------------------
    def memory_report(self, optimizer: torch.optim.Optimizer | None = None) -> RankMemory:
        """This rank's parameter / gradient / optimizer-state bytes (the optimizer's real state if given and
        already initialized, else the AdamW estimate of ``parallel.memory``)."""
        params = list(self.module.parameters())
        trainable = [p for p in params if p.requires_grad]
        dtype = params[0].dtype if params else torch.float32
        report = rank_memory(
            sum(to_local(p).numel() for p in params),
            sum(to_local(p).numel() for p in trainable),
            self.pcfg,
            self.mesh.dp,
            dtype,
            dtype,
            self.mesh.pp_rank,
            self.mesh.tp_rank,
            self.stage_ids,
        )
        if optimizer is not None and optimizer_state_bytes(optimizer):
            report.optimizer_bytes = optimizer_state_bytes(optimizer)
        return report

    # -- full tensors for checkpoints and export ---------------------------------------------------------
    def full_state_dict(self, all_stages: bool = False) -> dict[str, torch.Tensor]:
        """Unsharded parameters under single-device names, padding stripped. Collective over tp (and pp with
        ``all_stages``, which merges every pipeline rank's parameters on every rank)."""
        full = {
            n: gather_full_tensor(full_tp_local(p), self.specs.get(n), self.tp)
            for n, p in self.named_parameters()
        }
        return self._merge_stages(full) if all_stages else full

    def full_grads(self, all_stages: bool = False) -> dict[str, torch.Tensor]:
        """Unsharded gradients of trainable parameters (zeros where none was produced)."""
        full = {}
        for name, p in self.trainable_parameters():
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            full[name] = gather_full_tensor(full_tp_local(grad), self.specs.get(name), self.tp)
        return self._merge_stages(full) if all_stages else full

    @torch.no_grad()
    def load_full_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Copy this rank's shards out of full tensors (extra names, e.g. other stages', are ignored)."""
        for name, param in self.named_parameters():
            if name not in state_dict:
                raise KeyError(f"state dict has no tensor {name!r} needed by {self.mesh.describe()}")
            copy_rows_(
                param, shard_full_tensor(state_dict[name].to(self.device), self.specs.get(name), self.tp)
            )

    def _merge_stages(self, full: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.mesh.pp == 1:
            return full
        parts: list = [None] * self.mesh.pp
        dist.all_gather_object(parts, {k: v.cpu() for k, v in full.items()}, group=self.mesh.pp_group)
        merged: dict[str, torch.Tensor] = {}
        for part in parts:
            merged.update(part)
        return merged


def parallelize(
    model_cfg: ModelConfig,
    pcfg: ParallelConfig,
    mesh: ParallelMesh,
    device: torch.device | str = "cpu",
    init_state_dict: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    compute_dtype: torch.dtype | None = None,
) -> ParallelModel:
    """Build this rank's shard of the model directly from full tensors (or a seeded, layout-independent
    init): nothing full-size is allocated beyond one tensor at a time from ``init_state_dict``. With
    ``pcfg.dp_shard`` > 1 the stages are then FSDP2-sharded, gathering parameters in ``compute_dtype`` when
    ``pcfg.fsdp_param_dtype`` is "auto" (default ``dtype``)."""
    validate_layout(model_cfg, pcfg, mesh.tp * mesh.pp * mesh.dp)
    skeleton = build_rank_skeleton(model_cfg, pcfg, mesh)
    materialize(skeleton, model_cfg, torch.device(device), init_state_dict, seed, dtype)
    if pcfg.frozen_dtype == "compute" and compute_dtype is not None:
        hold_frozen_in(skeleton.module, compute_dtype)
    return ParallelModel(model_cfg, pcfg, mesh, skeleton, device, compute_dtype or dtype)
