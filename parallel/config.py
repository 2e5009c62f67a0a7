"""``ParallelConfig`` and the layout validation that runs before any process group or model exists."""

from __future__ import annotations

from dataclasses import dataclass, field

from mllm.model.config import ModelConfig

PP_SCHEDULES = ("1f1b", "interleaved_1f1b", "gpipe", "interleaved_zero_bubble")
VIRTUAL_SCHEDULES = ("interleaved_1f1b", "interleaved_zero_bubble")
STAGE_SPLITS = ("llm", "joint")
LOSS_MODES = ("token", "sample", "square")


@dataclass
class ParallelConfig:
    """How the model is split. ``dp`` is derived: world_size // (tp * pp).

    layers_per_stage: LLM decoder layers per pipeline stage (pp * virtual_stages entries, in stage order), or
    None to balance by estimated FLOPs (per pipeline rank: the sum of its virtual stages).
    vision_layers_per_stage: ViT layers per stage (nonzero on a leading run of stages; the last of them also
    runs the projector and the token embedding); needs layers_per_stage. None: as stage_split says.
    stage_split: "llm" keeps the ViT and projector on stage 0 and balances LLM layers; "joint" balances ViT and
    LLM layers together (``parallel.stage_split.best_stage_split``), the ViT spanning the leading stages when
    that is better. Balancing assumes micro-batches whose ``balance_image_token_fraction`` of
    ``balance_seq_len`` tokens are image tokens (tile-balanced packing, ``data.tiles_per_row``, keeps it so).
    shard_optimizer: ZeRO-1, AdamW state partitioned over dp (``torch.distributed.optim.ZeroRedundancyOptimizer``).
    freeze_vit_layers_below: freeze the ViT embeddings and layers with index < k (0 = none).
    loss_mode: "token" (mean over all supervised tokens of the global batch), "sample" (mean of per-sample
    means), "square" (InternVL 2.5: per-token weight 1/sqrt(supervised tokens of its sample)).
    dp_shard: FSDP2 (``fully_shard``) sharding degree inside dp: parameters, gradients and AdamW state are
    sharded over dp_shard ranks, dp / dp_shard replicas (HSDP when both > 1); 1 keeps the DDP / ZeRO-1 path
    (``parallel.fsdp``). fsdp_param_dtype: the dtype parameters are gathered in for compute ("auto": the
    run's compute dtype, bf16 on GPU); master weights, gradients and AdamW state stay fp32.
    fsdp_reduce_dtype: the dtype gradients are reduced in. reduce_grads_every_micro_batch: reduce-scatter
    after every micro-batch (ZeRO-3 style, sharded gradient memory) instead of accumulating unsharded
    gradients and reducing once, after the last micro-batch (less communication, more memory).
    bucket_size_mb: gradient all-reduce bucket size of the dp_shard=1 path, launched during the last
    micro-batch's backward (``parallel.overlap``).
    frozen_dtype: "fp32" keeps frozen parameters as fp32 like trainable ones; "compute" holds them in the run's
    compute dtype (bf16 on GPU; ``parallel.frozen``): half the memory, no master copy needed.
    layout / gpu_memory_gib: ``layout=auto`` replaces tp, pp, virtual stages, dp_shard and activation
    checkpointing by the planner's fastest layout that fits ``gpu_memory_gib`` (0: the device's memory).
    """

    tp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    pp_schedule: str = "1f1b"
    virtual_stages: int = 1
    layers_per_stage: list[int] | None = None
    balance_image_token_fraction: float = 0.5  # share of LLM tokens that are image tokens, for auto balance
    balance_seq_len: int = 4096  # tokens per micro-batch assumed by the auto balance (attention term)
    vision_layers_per_stage: list[int] | None = None
    stage_split: str = "llm"  # "llm" | "joint"
    vision_sequence_parallel: bool = False  # ViT tile tokens split over tp between GEMMs (parallel.vision_sp)
    shard_optimizer: bool = False
    activation_checkpointing_vision: bool = False
    activation_checkpointing_llm: bool = False
    freeze_vision: bool = False
    freeze_projector: bool = False
    freeze_llm: bool = False
    freeze_vit_layers_below: int = 0
    loss_mode: str = "token"
    layer_backend: str = "torch"  # "torch" | "te" (parallel.te_backend)
    cp: int = 1  # context parallel: reserved, must be 1
    dp_shard: int = 1
    fsdp_param_dtype: str = "auto"  # "auto" | "bf16" | "fp32"
    fsdp_reduce_dtype: str = "fp32"  # "fp32" | "bf16"
    reduce_grads_every_micro_batch: bool = False
    bucket_size_mb: float = 25.0
    layout: str = "manual"  # "manual" | "auto" (mllm.train.planner)
    gpu_memory_gib: float = 0.0
    frozen_dtype: str = "fp32"  # "fp32" | "compute" (parallel.frozen)
    extra: dict = field(default_factory=dict)  # free-form knobs for backends (e.g. TE options)

    @property
    def num_stages(self) -> int:
        return self.pp * self.virtual_stages

    def dp_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp * self.cp)

    def dp_replicate(self, world_size: int) -> int:
        return self.dp_size(world_size) // self.dp_shard


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def validate_layout(model_cfg: ModelConfig, pcfg: ParallelConfig, world_size: int) -> None:
    """Raise a one-line ``ValueError`` for a layout that cannot run; cheap, no process group needed."""
    model_cfg.validate()
    v, t = model_cfg.vision, model_cfg.text
    tp, pp = pcfg.tp, pcfg.pp
    _check(tp >= 1 and pp >= 1 and pcfg.virtual_stages >= 1, "parallel.tp, pp, virtual_stages must be >= 1")
    _check(pcfg.cp == 1, "parallel.cp (context parallel) is reserved and must be 1")
    _check(
        world_size % (tp * pp) == 0,
        f"world size {world_size} is not divisible by tp*pp = {tp}*{pp}: choose tp and pp whose product "
        f"divides the number of ranks",
    )
    _check(
        t.num_kv_heads % tp == 0,
        f"parallel.tp={tp} must divide model.text.num_kv_heads={t.num_kv_heads}: tensor parallelism splits "
        f"whole GQA kv groups (use tp in {_divisors(t.num_kv_heads)})",
    )
    _check(t.num_heads % tp == 0, f"parallel.tp={tp} must divide model.text.num_heads={t.num_heads}")
    _check(
        t.intermediate_size % tp == 0,
        f"parallel.tp={tp} must divide model.text.intermediate_size={t.intermediate_size}",
    )
    _check(t.hidden_size % tp == 0, f"parallel.tp={tp} must divide model.text.hidden_size={t.hidden_size}")
    _check(
        v.intermediate_size % tp == 0,
        f"parallel.tp={tp} must divide model.vision.intermediate_size={v.intermediate_size}",
    )
    _check(pcfg.pp_schedule in PP_SCHEDULES, f"parallel.pp_schedule must be one of {PP_SCHEDULES}")
    _check(pcfg.loss_mode in LOSS_MODES, f"parallel.loss_mode must be one of {LOSS_MODES}")
    if pcfg.pp_schedule in VIRTUAL_SCHEDULES:
        _check(pcfg.virtual_stages >= 2, f"parallel.pp_schedule={pcfg.pp_schedule} needs virtual_stages >= 2")
    else:
        _check(
            pcfg.virtual_stages == 1,
            f"parallel.virtual_stages={pcfg.virtual_stages} needs pp_schedule=interleaved_1f1b or "
            "interleaved_zero_bubble",
        )
    _check(
        not (t.tie_word_embeddings and pp > 1),
        "model.text.tie_word_embeddings with parallel.pp > 1 is not supported (embedding and output layer "
        "live on different stages)",
    )
    stages = pcfg.num_stages
    _check(
        t.num_layers >= stages,
        f"model.text.num_layers={t.num_layers} < {stages} pipeline stages: every stage needs a decoder layer",
    )
    if pcfg.layers_per_stage is not None:
        lps = list(pcfg.layers_per_stage)
        _check(
            len(lps) == stages,
            f"parallel.layers_per_stage has {len(lps)} entries but pp*virtual_stages = {stages}",
        )
        _check(
            sum(lps) == t.num_layers,
            f"parallel.layers_per_stage {lps} sums to {sum(lps)}, the model has {t.num_layers} LLM layers",
        )
        if pcfg.vision_layers_per_stage is None:
            _check(min(lps) >= 1, f"parallel.layers_per_stage {lps}: every stage needs at least one layer")
    if pcfg.vision_sequence_parallel and tp > 1:
        _check(
            v.drop_path_rate == 0.0,
            f"parallel.vision_sequence_parallel with model.vision.drop_path_rate={v.drop_path_rate}: drop path "
            "draws one mask per tile, which a token chunk cannot; set drop_path_rate=0 or turn it off",
        )
        _check(
            pcfg.layer_backend == "torch",
            "parallel.vision_sequence_parallel needs parallel.layer_backend=torch",
        )
    _check(pcfg.stage_split in STAGE_SPLITS, f"parallel.stage_split must be one of {STAGE_SPLITS}")
    if pcfg.vision_layers_per_stage is not None:
        _validate_vision_split(model_cfg, pcfg)
    _check(
        0 <= pcfg.freeze_vit_layers_below <= v.num_layers,
        f"parallel.freeze_vit_layers_below={pcfg.freeze_vit_layers_below} out of range 0..{v.num_layers}",
    )
    _check(pcfg.layer_backend in ("torch", "te"), "parallel.layer_backend must be 'torch' or 'te'")
    _check(
        not (model_cfg.lora.enabled and pcfg.layer_backend == "te"),
        "lora.vision / lora.llm need parallel.layer_backend=torch (TE linears take no adapters)",
    )
    validate_dp_shard(pcfg, world_size)


def validate_dp_shard(pcfg: ParallelConfig, world_size: int) -> None:
    """FSDP2 keys: dp_shard divides dp, no ZeRO-1 on top of it, known dtypes."""
    dp = pcfg.dp_size(world_size)
    _check(
        pcfg.dp_shard >= 1 and dp % pcfg.dp_shard == 0,
        f"parallel.dp_shard={pcfg.dp_shard} must divide dp = {dp} (world {world_size} / (tp {pcfg.tp} * pp "
        f"{pcfg.pp})): use one of {_divisors(dp)}",
    )
    _check(
        not (pcfg.dp_shard > 1 and pcfg.shard_optimizer),
        "parallel.shard_optimizer (ZeRO-1) and parallel.dp_shard > 1 (FSDP2, which shards the optimizer state "
        "already) exclude each other: set parallel.shard_optimizer=false",
    )
    _check(
        not (pcfg.dp_shard > 1 and pcfg.layer_backend == "te"),
        "parallel.dp_shard > 1 is not supported with parallel.layer_backend=te yet: use the torch backend",
    )
    _check(
        pcfg.fsdp_param_dtype in ("auto", "bf16", "fp32"),
        "parallel.fsdp_param_dtype must be auto, bf16 or fp32",
    )
    _check(pcfg.fsdp_reduce_dtype in ("bf16", "fp32"), "parallel.fsdp_reduce_dtype must be fp32 or bf16")
    _check(pcfg.bucket_size_mb > 0, f"parallel.bucket_size_mb={pcfg.bucket_size_mb} must be > 0")
    _check(pcfg.layout in ("manual", "auto"), f"parallel.layout={pcfg.layout!r} must be manual or auto")
    _check(
        pcfg.frozen_dtype in ("fp32", "compute"),
        f"parallel.frozen_dtype={pcfg.frozen_dtype!r} must be fp32 or compute",
    )


def _validate_vision_split(model_cfg: ModelConfig, pcfg: ParallelConfig) -> None:
    """Explicit ViT layers per stage: a leading run of stages, every stage busy, stage 0 trainable."""
    vis, stages = list(pcfg.vision_layers_per_stage), pcfg.num_stages
    key = f"parallel.vision_layers_per_stage {vis}"
    _check(pcfg.layers_per_stage is not None, f"{key} needs parallel.layers_per_stage (LLM layers per stage)")
    _check(len(vis) == stages, f"{key} has {len(vis)} entries but pp*virtual_stages = {stages}")
    sel = model_cfg.select_layer
    n_run = sel if sel >= 0 else model_cfg.vision.num_layers + 1 + sel
    _check(sum(vis) == n_run, f"{key} sums to {sum(vis)}, the model runs {n_run} ViT layers (select_layer)")
    used = [s for s, n in enumerate(vis) if n > 0]
    _check(
        min(vis) >= 0 and used == list(range(len(used))),
        f"{key}: ViT layers must fill a leading run of stages",
    )
    lps = list(pcfg.layers_per_stage)
    _check(
        all(v + n > 0 for v, n in zip(vis, lps)) and lps[-1] > 0,
        f"{key} with layers_per_stage {lps}: every stage needs a layer and the last stage an LLM layer",
    )
    _check(
        not any(lps[: len(used) - 1]),
        f"{key} with layers_per_stage {lps}: LLM layers come after the projector, i.e. from stage {len(used) - 1} on",
    )
    if len(used) > 1:
        # A stage-0 output without autograd history cannot take the next stage's gradient.
        _check(
            not pcfg.freeze_vision and pcfg.freeze_vit_layers_below < vis[0],
            f"{key}: the ViT spans stages but stage 0's ViT layers are all frozen; keep the frozen ViT layers "
            f"on stage 0 with trainable ones (freeze_vit_layers_below < {vis[0]}) or use one ViT stage",
        )


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
