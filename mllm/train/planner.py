"""The layout planner: device memory per rank and an estimated step time for a (run, layout, world size).

Pure functions of (run config, world size, GPU memory): nothing is allocated and no process group exists. One
meta-device build of the model per tp degree gives every parameter's local size (padding included) and
whether it trains; every layout is then summed from those counts. ``mllm.train.planner_search`` enumerates
layouts and ranks them; ``--dry-run`` prints one plan (``mllm.train.plan_report``).

Every pipeline rank holds the ViT and LLM layers the layout's split gives its stages (``parallel.pipeline.resolve_split``:
``stage_split=llm`` keeps the ViT on stage 0, ``joint`` spreads it over the leading stages), as the trainer builds it.

Memory of one rank (bytes), by category (``RankPlan.bytes``):

- ``weights``: fp32 master weights (all local parameters; / dp_shard under FSDP2); with
  ``parallel.frozen_dtype=compute`` frozen parameters (but the token embedding) in the compute dtype instead
  (``parallel.frozen``);
- ``gathered``: FSDP2 compute copies in ``fsdp_param_dtype``: the stage root (embeddings, projector, head,
  kept from forward to backward) plus two units (the running one and the prefetched one); under pp the
  pipeline keeps a stage's units gathered between micro-batches (``PipelineStage`` turns resharding off until
  the step's last backward), so all of them;
- ``grads``: fp32 gradients of trainable parameters (/ dp_shard);
- ``grad_buffers``: under FSDP2 the unsharded fp32 accumulation buffer between micro-batches when gradients
  are reduced once per step (no pipeline: ``reduce_grads_every_micro_batch=false`` with accumulation > 1;
  pipeline: always), else two units' unsharded gradients being reduced;
- ``optimizer``: AdamW's two fp32 moments of trainable parameters (/ dp_shard, or / dp with ZeRO-1);
- ``activations``: ``mllm.train.dry_run.activation_bytes`` (Korthikanti et al., checkpointing, micro-batches in
  flight of the schedule);
- ``logits``: the last stage's vocab-parallel output of one micro-batch: bf16 logits plus the fp32 copy, its
  shifted exponentials and the saved softmax of the cross-entropy (14 bytes per logit);
- ``pixels``: ranks of stage 0 only: the tiles of ``pixels_in_flight`` micro-batches as uint8 plus the
  running micro-batch's normalized fp32 tiles and their compute-dtype copy;
- ``overhead``: the documented allowance: ``CUDA_CONTEXT_GIB`` for the CUDA context and kernels,
  ``NCCL_GIB`` for NCCL's communicator buffers, and ``FRAGMENTATION`` of everything else for the caching
  allocator's fragmentation.

Step time (an estimate, assumptions in ``Hardware``): model FLOPs plus recomputation at ``mfu`` of the peak,
stretched by the pipeline bubble ((pp - 1) / (virtual stages x micro-batches)) and the busiest pipeline rank's
share under the layout's stage split (``mllm.train.planner_split``),
plus the exposed communication: tensor-parallel collectives (never overlapped), pipeline sends, and the part
of the data-parallel gradient reduction / FSDP all-gathers that does not fit under the compute they overlap
with. Links: within a node ``intra_node_gbps`` per GPU, across nodes ``inter_node_gbps`` per GPU; a group
crosses nodes when its ranks are further apart than one node (rank order pp, dp, tp; tp innermost).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from mllm.train.config import RunConfig
from mllm.train.dry_run import activation_bytes, flops_per_step
from mllm.train.planner_split import layout_split, rank_imbalance, recompute_stretch, vision_layer_ids
from parallel.config import ParallelConfig, validate_layout
from parallel.pipeline import stage_layer_indices, stages_of_pp_rank
from parallel.stage_split import Split

GIB = 2**30
CUDA_CONTEXT_GIB = (
    1.0  # CUDA context, cuBLAS/cuDNN workspaces and kernel images of one process (H100, torch 2.x)
)
NCCL_GIB = 1.0  # NCCL communicator buffers of a rank's tp / pp / dp groups (several channels x 4 MiB each)
FRAGMENTATION = 0.05  # caching-allocator fragmentation, a share of everything allocated
TILE_BYTES_PER_PIXEL_CHANNEL = 1  # tiles travel as uint8


@dataclass(frozen=True)
class Hardware:
    """The machine a plan is for; every number is printed with the estimate."""

    gpu_memory_gib: float = 80.0
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    mfu: float = 0.40  # achieved share of the peak for model FLOPs plus recomputation
    intra_node_gbps: float = 300.0  # GB/s per GPU, NVLink collectives (bus bandwidth, H100 NVLink 4)
    inter_node_gbps: float = 25.0  # GB/s per GPU, one 200 Gb/s InfiniBand HCA per GPU
    gpus_per_node: int = 8

    def describe(self) -> str:
        return (
            f"{self.gpu_memory_gib:g} GiB per GPU, peak {self.peak_tflops:g} TFLOP/s at MFU {self.mfu:.0%}, "
            f"{self.intra_node_gbps:g} GB/s per GPU within a node of {self.gpus_per_node}, "
            f"{self.inter_node_gbps:g} GB/s per GPU across nodes"
        )


@dataclass
class RankPlan:
    pp_rank: int
    stages: list[int]
    params: int  # local parameter elements before FSDP sharding (padding included)
    trainable: int
    bytes: dict[str, float] = field(default_factory=dict)
    llm_layers: int = 0  # decoder layers of the rank's stages
    vision_layers: int = 0  # ViT layers of the rank's stages

    @property
    def total_bytes(self) -> float:
        return sum(self.bytes.values())

    def to_json(self) -> dict:
        out = {
            "pp_rank": self.pp_rank,
            "stages": self.stages,
            "params": self.params,
            "trainable": self.trainable,
            "llm_layers": self.llm_layers,
            "vision_layers": self.vision_layers,
        }
        out.update({f"{k}_gib": round(v / GIB, 3) for k, v in self.bytes.items()})
        out["total_gib"] = round(self.total_bytes / GIB, 3)
        return out


@dataclass
class LayoutPlan:
    pcfg: ParallelConfig
    world: int
    ranks: list[RankPlan]
    flops_per_step: float
    time: dict[str, float]  # seconds: compute, bubble, tp_comm, pp_comm, dp_comm_exposed, total
    hardware: Hardware

    @property
    def dp(self) -> int:
        return self.pcfg.dp_size(self.world)

    @property
    def max_rank_bytes(self) -> float:
        return max(r.total_bytes for r in self.ranks)

    @property
    def fits(self) -> bool:
        return self.max_rank_bytes <= self.hardware.gpu_memory_gib * GIB

    @property
    def est_step_s(self) -> float:
        return self.time["total"]

    def layout(self) -> dict:
        p = self.pcfg
        return {
            "world": self.world,
            "tp": p.tp,
            "pp": p.pp,
            "dp": self.dp,
            "dp_shard": p.dp_shard,
            "dp_replicate": self.dp // p.dp_shard,
            "virtual_stages": p.virtual_stages,
            "pp_schedule": p.pp_schedule,
            "stage_split": p.stage_split,
            "vision_sequence_parallel": p.vision_sequence_parallel,
            "sequence_parallel": p.sequence_parallel,
            "shard_optimizer": p.shard_optimizer,
            "activation_checkpointing_vision": p.activation_checkpointing_vision,
            "activation_checkpointing_llm": p.activation_checkpointing_llm,
            "reduce_grads_every_micro_batch": p.reduce_grads_every_micro_batch,
        }

    def to_json(self) -> dict:
        return {
            "layout": self.layout(),
            "max_rank_gib": round(self.max_rank_bytes / GIB, 3),
            "fits": self.fits,
            "gpu_memory_gib": self.hardware.gpu_memory_gib,
            "ranks": [r.to_json() for r in self.ranks],
            "flops_per_step": self.flops_per_step,
            "est_step_s": round(self.est_step_s, 4),
            "est_time_s": {k: round(v, 4) for k, v in self.time.items()},
        }


# -- parameter counts -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PartCounts:
    """Local (tp rank 0, padding included) parameter elements of one part: (all, trainable)."""

    total: int
    trainable: int


@dataclass(frozen=True)
class ModelCounts:
    vision_embeddings: PartCounts
    vision_layers: tuple[PartCounts, ...]
    vision_other: PartCounts  # anything of the ViT outside embeddings and blocks
    projector: PartCounts
    embed_tokens: PartCounts
    llm_layers: tuple[PartCounts, ...]
    head: PartCounts  # final norm + lm_head


_COUNTS: dict[tuple[str, str], ModelCounts] = {}


def _count_parts(model_cfg, pcfg: ParallelConfig) -> ModelCounts:
    from parallel.build import build_rank_skeleton
    from parallel.mesh import meta_mesh

    one_stage = dataclasses.replace(pcfg, pp=1, virtual_stages=1, layers_per_stage=None, pp_schedule="1f1b")
    skeleton = build_rank_skeleton(model_cfg, one_stage, meta_mesh(one_stage, one_stage.tp))
    sums: dict[str, list[int]] = {}
    for name, p in skeleton.module.named_parameters():
        parts = name.split(".")
        if name.startswith("vision.layers."):
            key = f"vl{parts[2]}"
        elif name.startswith("vision.embeddings."):
            key = "ve"
        elif name.startswith("vision."):
            key = "vo"
        elif name.startswith("llm.layers."):
            key = f"ll{parts[2]}"
        elif name.startswith("llm.embed_tokens."):
            key = "emb"
        elif name.startswith("projector."):
            key = "proj"
        else:
            key = "head"
        acc = sums.setdefault(key, [0, 0])
        acc[0] += p.numel()
        acc[1] += p.numel() if p.requires_grad else 0

    def part(key: str) -> PartCounts:
        return PartCounts(*sums.get(key, [0, 0]))

    return ModelCounts(
        vision_embeddings=part("ve"),
        vision_layers=tuple(part(f"vl{i}") for i in range(model_cfg.vision.num_layers)),
        vision_other=part("vo"),
        projector=part("proj"),
        embed_tokens=part("emb"),
        llm_layers=tuple(part(f"ll{i}") for i in range(model_cfg.text.num_layers)),
        head=part("head"),
    )


def model_counts(run: RunConfig, pcfg: ParallelConfig) -> ModelCounts:
    """Per-part local parameter counts at ``pcfg.tp`` (cached per model, tp and freezing)."""
    p = pcfg
    key = (p.tp, p.layer_backend, p.sequence_parallel, p.freeze_vision, p.freeze_projector, p.freeze_llm,
           p.freeze_vit_layers_below)  # fmt: skip
    cache_key = (repr(run.model), repr(key))
    if cache_key not in _COUNTS:
        _COUNTS[cache_key] = _count_parts(run.model, pcfg)
    return _COUNTS[cache_key]


def _add(*parts: PartCounts) -> PartCounts:
    return PartCounts(sum(p.total for p in parts), sum(p.trainable for p in parts))


# -- memory -----------------------------------------------------------------------------------------------------
def compute_dtype_bytes(run: RunConfig) -> int:
    fp32 = run.train.dtype == "fp32" or (run.train.dtype == "auto" and run.train.device == "cpu")
    return 4 if fp32 else 2


def gathered_dtype_bytes(run: RunConfig, pcfg: ParallelConfig) -> int:
    if pcfg.fsdp_param_dtype == "auto":
        return compute_dtype_bytes(run)
    return 2 if pcfg.fsdp_param_dtype == "bf16" else 4


def accumulation(run: RunConfig, pcfg: ParallelConfig, world: int) -> int:
    return max(1, run.train.global_batch_size // (run.data.micro_batch_size * pcfg.dp_size(world)))


def weight_bytes(
    run: RunConfig, pcfg: ParallelConfig, part: PartCounts, embedding: PartCounts | None
) -> float:
    """Bytes of ``part``'s weights before FSDP sharding: fp32, or under ``parallel.frozen_dtype=compute`` its
    frozen parameters in the compute dtype except a frozen token ``embedding`` (kept fp32, ``parallel.frozen``)."""
    if pcfg.frozen_dtype != "compute":
        return 4.0 * part.total
    kept = embedding.total - embedding.trainable if embedding is not None else 0
    frozen = part.total - part.trainable - kept
    return 4.0 * (part.trainable + kept) + compute_dtype_bytes(run) * frozen


def pixels_in_flight(run: RunConfig, pcfg: ParallelConfig, world: int) -> int:
    """Micro-batches whose tiles sit on the device at once: ``train.pixels_ahead`` ahead plus the running one
    (``mllm.train.batches.PixelFeeder``), at most the step's accumulation."""
    ahead = getattr(run.train, "pixels_ahead", None)
    accum = accumulation(run, pcfg, world)
    if ahead is None:
        return accum
    return min(accum, ahead + 1)


def pixel_bytes(run: RunConfig, pcfg: ParallelConfig, world: int) -> float:
    d, v = run.data, run.model.vision
    tiles = d.max_tiles_per_row * d.micro_batch_size
    per_tile = 3 * v.image_size * v.image_size
    resident = pixels_in_flight(run, pcfg, world) * tiles * per_tile * TILE_BYTES_PER_PIXEL_CHANNEL
    return float(resident + tiles * per_tile * (4 + compute_dtype_bytes(run)))


def logits_bytes(run: RunConfig, pcfg: ParallelConfig) -> float:
    t = run.model.text
    vocab_local = -(-t.vocab_size // pcfg.tp)
    tokens = run.data.seq_len * run.data.micro_batch_size
    return float(tokens * vocab_local * (compute_dtype_bytes(run) + 12))


@dataclass
class RankParts:
    """What one pipeline rank holds under a split: stage roots (kept gathered under FSDP2), FSDP units, the
    decoder layers and the ViT layers its stages run, and whether it holds the token embedding."""

    root: PartCounts
    units: list[PartCounts]
    llm_layers: int
    vision_layers: list[int]
    has_embedding: bool


def rank_parts(counts: ModelCounts, split: Split, stage_ids: list[int]) -> RankParts:
    """The parts of a pp rank's stages, as ``parallel.build.build_rank_skeleton`` prunes them: ViT layers
    where the split puts them (the patch embedding on stage 0), the projector, token embedding and any ViT
    layers past ``select_layer`` on the projector stage, the head on the last stage."""
    roots, units, layers, vit = [], [], 0, []
    last, proj = split.num_stages - 1, split.projector_stage
    n_run = sum(split.vision_layers)
    for sid in stage_ids:
        idx = stage_layer_indices(list(split.llm_layers), sid)
        layers += len(idx)
        units += [counts.llm_layers[i] for i in idx]
        vit += vision_layer_ids(split, sid)
        units += [counts.vision_layers[i] for i in vision_layer_ids(split, sid)]
        if sid == 0:
            units.append(counts.vision_embeddings)
        if sid == proj:
            units += list(counts.vision_layers[n_run:])
            roots += [counts.vision_other, counts.projector, counts.embed_tokens]
        if sid == last:
            roots.append(counts.head)
    return RankParts(_add(*roots), units, layers, vit, proj in stage_ids)


def rank_plans(run: RunConfig, pcfg: ParallelConfig, world: int) -> list[RankPlan]:
    """One ``RankPlan`` per pipeline rank (tp ranks and dp ranks of a stage hold the same amounts)."""
    counts = model_counts(run, pcfg)
    split = layout_split(run, pcfg)
    dp, ds = pcfg.dp_size(world), pcfg.dp_shard
    fsdp = ds > 1
    gathered_b = gathered_dtype_bytes(run, pcfg)
    accum = accumulation(run, pcfg, world)
    sized = dataclasses.replace(run, parallel=pcfg)
    plans = []
    for pp_rank in range(pcfg.pp):
        stage_ids = stages_of_pp_rank(pp_rank, pcfg)
        held = rank_parts(counts, split, stage_ids)
        root, units = held.root, held.units
        total = _add(root, *units)
        b: dict[str, float] = {}
        b["weights"] = (
            weight_bytes(run, pcfg, total, counts.embed_tokens if held.has_embedding else None) / ds
        )
        if fsdp:
            if pcfg.pp > 1:
                b["gathered"] = float(gathered_b * total.total)
            else:
                top = sorted((u.total for u in units), reverse=True)[:2]
                b["gathered"] = float(gathered_b * (root.total + sum(top)))
        else:
            b["gathered"] = 0.0
        b["grads"] = 4.0 * total.trainable / ds
        once_per_step = pcfg.pp > 1 or (accum > 1 and not pcfg.reduce_grads_every_micro_batch)
        if fsdp and once_per_step:
            b["grad_buffers"] = 4.0 * total.trainable  # unsharded accumulation between micro-batches
        elif fsdp:
            b["grad_buffers"] = 2 * 4.0 * max((u.trainable for u in units), default=0)  # units being reduced
        else:
            b["grad_buffers"] = 0.0
        optim = 8.0 * total.trainable / ds
        if pcfg.shard_optimizer and not fsdp:
            optim /= dp
        b["optimizer"] = optim
        b["activations"] = activation_bytes(
            sized, world, held.llm_layers, bool(held.vision_layers), pp_rank, held.vision_layers
        )
        b["logits"] = logits_bytes(run, pcfg) if pcfg.num_stages - 1 in stage_ids else 0.0
        b["pixels"] = pixel_bytes(run, pcfg, world) if 0 in stage_ids else 0.0
        b["overhead"] = (CUDA_CONTEXT_GIB + NCCL_GIB) * GIB + FRAGMENTATION * sum(b.values())
        plans.append(
            RankPlan(
                pp_rank, stage_ids, total.total, total.trainable, b, held.llm_layers, len(held.vision_layers)
            )
        )
    return plans


# -- time -------------------------------------------------------------------------------------------------------
def _bandwidth(hw: Hardware, span: int) -> float:
    """Bytes/s per GPU of a group whose ranks span ``span`` consecutive global ranks."""
    return (hw.intra_node_gbps if span <= hw.gpus_per_node else hw.inter_node_gbps) * 1e9


def _ring(bytes_: float, n: int, bw: float, all_reduce: bool = False) -> float:
    """Seconds of a ring all-gather / reduce-scatter (or all-reduce: twice) of ``bytes_`` over n ranks."""
    if n <= 1:
        return 0.0
    return (2.0 if all_reduce else 1.0) * (n - 1) / n * bytes_ / bw


def step_time(run: RunConfig, pcfg: ParallelConfig, world: int, ranks: list[RankPlan], hw: Hardware) -> dict:
    m, d = run.model, run.data
    tp, pp, dp, ds = pcfg.tp, pcfg.pp, pcfg.dp_size(world), pcfg.dp_shard
    accum = accumulation(run, pcfg, world)
    flops = flops_per_step(run)
    rate = hw.peak_tflops * 1e12 * hw.mfu
    stretch = recompute_stretch(run, pcfg)
    frac_img = pcfg.balance_image_token_fraction
    # Busiest pipeline rank vs the mean, under the layout's split (the ViT on stage 0 or spread, joint).
    compute = flops * stretch / (world * rate) * rank_imbalance(run, pcfg, layout_split(run, pcfg))
    bubble = compute * (pp - 1) / (pcfg.virtual_stages * accum) if pp > 1 else 0.0
    act = compute_dtype_bytes(run)
    tokens = d.seq_len * d.micro_batch_size
    tp_bw = _bandwidth(hw, tp)
    per_mb_tp = 0.0
    if tp > 1:  # the busiest rank's collectives (ViT sequence parallel: all-gather + reduce-scatter, half)
        calls = 4 + (2 if pcfg.activation_checkpointing_llm else 0)  # fwd 2, bwd 2, recompute 2
        llm_call = _ring(tokens * m.text.hidden_size * act, tp, tp_bw, True)
        vit_tokens = d.max_tiles_per_row * d.micro_batch_size * (m.vision.num_patches + 1) * frac_img
        vit_call = _ring(
            vit_tokens * m.vision.hidden_size * act, tp, tp_bw, not pcfg.vision_sequence_parallel
        )
        per_mb_tp = max(r.llm_layers * calls * llm_call + r.vision_layers * 4 * vit_call for r in ranks)
    tp_comm = per_mb_tp * accum
    pp_comm = 0.0
    if pp > 1:
        hop = tokens * m.text.hidden_size * act / (tp if pcfg.sequence_parallel else 1)
        pp_comm = 2 * accum * hop / _bandwidth(hw, tp * dp * pp)
    # Data parallel: the group spans dp * tp ranks (shards: dp_shard * tp).
    worst = max(ranks, key=lambda r: r.trainable)
    dp_bw, shard_bw = _bandwidth(hw, dp * tp), _bandwidth(hw, ds * tp)
    backward_last = compute / accum * 2 / 3
    if ds == 1:
        grads = 4.0 * worst.trainable
        reduce = _ring(grads, dp, dp_bw, all_reduce=True)
        exposed = max(0.0, reduce - backward_last)
        if pcfg.shard_optimizer:
            exposed += _ring(grads, dp, dp_bw)  # updated parameters broadcast from their owners
    else:
        gather_b = gathered_dtype_bytes(run, pcfg)
        gathers = (2 * accum if pp == 1 else accum + 1) * _ring(gather_b * worst.params, ds, shard_bw)
        reductions = accum if (pp == 1 and pcfg.reduce_grads_every_micro_batch) else 1
        reduce_b = 4.0 if pcfg.fsdp_reduce_dtype == "fp32" else 2.0
        reduce = reductions * _ring(reduce_b * worst.trainable, ds, shard_bw)
        reduce += _ring(reduce_b * worst.trainable / ds, dp // ds, dp_bw, all_reduce=True)  # HSDP replicas
        window = backward_last * reductions
        exposed = max(0.0, gathers - compute) + max(0.0, reduce - window)
    total = compute + bubble + tp_comm + pp_comm + exposed
    return {
        "compute": compute,
        "bubble": bubble,
        "tp_comm": tp_comm,
        "pp_comm": pp_comm,
        "dp_comm_exposed": exposed,
        "total": total,
    }


def plan(
    run: RunConfig, world: int, hw: Hardware | None = None, pcfg: ParallelConfig | None = None
) -> LayoutPlan:
    """The plan of ``pcfg`` (default: the run's own layout) on ``world`` ranks of ``hw``."""
    hw = hw or Hardware()
    pcfg = pcfg or run.parallel
    validate_layout(run.model, pcfg, world)
    ranks = rank_plans(run, pcfg, world)
    sized = dataclasses.replace(run, parallel=pcfg)
    return LayoutPlan(pcfg, world, ranks, flops_per_step(sized), step_time(sized, pcfg, world, ranks, hw), hw)
