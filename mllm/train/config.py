"""Typed configuration of a training run (no Hydra here: ``mllm.config`` registers these with ConfigStore).

A run is ``RunConfig(model, parallel, data, optim, train, checkpoint, logging, fp8)``. The override keys that
external scripts rely on are kept stable: ``train.steps``, ``train.run_dir``, ``train.seed``, ``data.path``,
``parallel.tp``, ``parallel.pp``, ``checkpoint.every``, ``checkpoint.resume``, ``model.init_from``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from mllm.data.config import DataConfig
from mllm.kernels.fp8 import FP8Config
from mllm.model.config import ModelConfig
from mllm.model.lora import LoraConfig, resolve_lora
from parallel.config import ParallelConfig


@dataclass
class OptimConfig:
    """AdamW with parameter groups and a warmup + decay schedule.

    Defaults are InternVL 1.5's: AdamW (0.9, 0.999, 1e-8), weight decay 0.05, cosine with 3% warmup.
    """

    lr: float = 2e-5
    min_lr_ratio: float = 0.0  # the schedule decays to lr * min_lr_ratio
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.05
    # fnmatch patterns on parameter names that get no weight decay (biases, norms, layer scale).
    no_decay: list[str] = field(default_factory=lambda: ["*.bias", "*norm*", "*.ls1", "*.ls2"])
    # lr multiplier per module name prefix, e.g. {"vision": 0.1}; the longest matching prefix wins.
    lr_mult: dict[str, float] = field(default_factory=dict)
    # Layer-wise lr decay for the ViT (BEiT style): block i of L gets decay^(L - i), embeddings decay^(L + 1).
    vit_layer_decay: float = 1.0
    schedule: str = "cosine"  # "cosine" | "linear" | "constant" (after warmup)
    warmup_ratio: float = 0.03
    warmup_steps: int | None = None  # overrides warmup_ratio when set
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping (the norm is still reported)
    # AdamW kernels (mllm.kernels.optim): auto (fused on CUDA, foreach otherwise) | fused | foreach | for_loop
    implementation: str = "auto"


@dataclass
class TrainConfig:
    steps: int = 100  # optimizer steps (the schedule's length)
    # InternVL's num_train_epochs: when set, replaces steps by the optimizer steps of this many epochs of the
    # data as it is packed (after repeat_time); every sample of an epoch is trained exactly once.
    epochs: int | None = None
    stop_after: int | None = None  # end this invocation (with a checkpoint) after this many steps in total
    run_dir: str = "runs/default"
    seed: int = 0
    # Packed rows per optimizer step over all data-parallel ranks; gradient accumulation is derived from it
    # as global_batch_size / (data.micro_batch_size * dp).
    global_batch_size: int = 8
    # Which parts train is set in parallel.freeze_{vision,projector,llm} (the parallel model applies it).
    dtype: str = "auto"  # "auto" (bf16 on GPU, fp32 on CPU) | "bf16" | "fp32"; master weights are fp32
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    init_vision_from: str | None = None  # separate InternViT HF checkpoint (stage-1 start)
    init_llm_from: str | None = None  # separate LLM HF checkpoint (stage-1 start)
    max_consecutive_nonfinite: int = 3  # stop after this many skipped (NaN/inf) steps in a row
    dry_run: bool = False  # print layout, memory and FLOPs on the meta device, then exit
    compile: bool = False  # torch.compile every ViT block and decoder layer (mllm.kernels.compile)
    # Pixels just in time: micro-batches whose tiles are copied to the device ahead of the running one
    # (mllm.train.batches.PixelFeeder); only ranks that run the ViT receive tiles.
    pixels_ahead: int = 1


@dataclass
class CheckpointConfig:
    every: int = 0  # save every N steps (0: only at the end)
    keep_last: int = 3  # retention; older complete checkpoints are deleted
    resume: str = "none"  # "none" | "auto" (latest complete one in the run dir) | a checkpoint directory
    async_save: bool = False
    save_final: bool = True
    dir: str | None = None  # default RUN_DIR/checkpoints


@dataclass
class LoggingConfig:
    every: int = 1  # write metrics every N steps
    tensorboard: bool = True
    progress: str = "auto"  # "auto" (only on a terminal) | "on" | "off"
    peak_tflops: float = 0.0  # per-device peak for MFU; 0: from the device name (0 on CPU)
    run_name: str = ""  # shown in the banner and used as the W&B run name; default: the recipe's name
    print_every: int = 10  # a console line every N steps (and at the last step), terminal or not
    wandb: bool = False  # also log to Weights & Biases (`pip install 'mllm[wandb]'`)
    wandb_project: str = "mllm"
    wandb_mode: str = "online"  # "online" | "offline" (no network; `wandb sync` later) | "disabled"


@dataclass
class EvalConfig:
    """Validation loss over a fixed held-out set (``mllm.train.validation``); off unless data_path is set."""

    data_path: str | None = None  # a meta JSON or a prepared shard directory, read like data.path
    every: int = 0  # evaluate every N steps (0 with a data_path: only after the last step)
    batches: int = 8  # packed micro-batches (data.micro_batch_size rows each) in the held-out set
    per_dataset: bool = True  # also val_loss/<dataset> (one forward+backward pass per dataset instead of one)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    fp8: FP8Config = field(default_factory=FP8Config)  # FP8 training (mllm.kernels.fp8 / TE recipes)
    eval: EvalConfig = field(default_factory=EvalConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)  # lora.vision / lora.llm = rank; becomes model.lora

    def __post_init__(self) -> None:
        self.model.lora = resolve_lora(self.lora, self.model.lora)
