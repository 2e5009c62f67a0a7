"""Megatron-style tensor, sequence, pipeline and data parallelism for InternVL on ``torch.distributed``.

Every layout computes what one device computes (tests/parallel prove it on CPU/gloo against the single-device
model). Model code in ``mllm.model`` is written for one device; this package replaces its linears, embedding,
output layer and attention blocks by tensor-parallel versions with the same names, prunes the model to a rank's
pipeline stages, and runs the training step.

Typical use (the trainer)::

    pcfg = ParallelConfig(tp=2, pp=2, sequence_parallel=True, shard_optimizer=True)
    validate_layout(model_cfg, pcfg, world_size)          # one-line ValueError before any heavy work
    mesh = build_mesh(pcfg)                               # (pp, dp, tp) DeviceMesh; gloo on CPU, NCCL on GPU
    pm = parallelize(model_cfg, pcfg, mesh, device, init_state_dict=full_sd, seed=0)
    opt = build_optimizer(pm, lr=1e-5, weight_decay=0.05) # AdamW; ZeRO-1 over dp with shard_optimizer
    print(format_memory_report([pm.memory_report(opt)]))  # per-rank params / grads / optimizer bytes
    for step in ...:
        result = pm.forward_backward(micro_batches)       # this dp rank's micro-batches, grads synced
        grad_norm = pm.clip_grad_norm_(1.0)               # global norm over tp/pp, replicas counted once
        opt.step(); pm.zero_grad()
    full = pm.full_state_dict(all_stages=True)            # single-device names and shapes, for export

Public API
----------
``ParallelConfig`` (parallel.config): tp, pp (dp = world // (tp * pp)), sequence_parallel, pp_schedule
    ("1f1b" | "interleaved_1f1b" | "gpipe"), virtual_stages, layers_per_stage (list or None = balanced by
    FLOPs with the ViT counted on stage 0), shard_optimizer, activation_checkpointing_vision / _llm,
    freeze_vision / freeze_projector / freeze_llm / freeze_vit_layers_below, loss_mode ("token" | "sample" |
    "square"), layer_backend ("torch" | "te"), cp (reserved, 1), dp_shard, fsdp_param_dtype,
    fsdp_reduce_dtype, reduce_grads_every_micro_batch, bucket_size_mb, layout ("manual" | "auto"),
    gpu_memory_gib.
``validate_layout(model_cfg, pcfg, world_size) -> None``: raises for impossible layouts (world size, tp not
    dividing kv heads / heads / ffn, layers per stage, schedule options). Uneven ViT head counts are valid.
``build_mesh(pcfg, device_type=None) -> ParallelMesh``: sizes, this rank's coordinates (tp_rank, pp_rank,
    dp_rank) and the tp / pp / dp process groups. Rank order is pp-major, tp-minor.
``parallelize(model_cfg, pcfg, mesh, device="cpu", init_state_dict=None, seed=0, dtype=fp32) -> ParallelModel``:
    builds the rank's shard on the meta device and fills it from full single-device tensors (or a seeded,
    layout-independent init); never allocates the full model.
``ParallelModel``:
    ``forward_backward(micro_batches) -> StepResult(loss, num_tokens, total_weight)``. Micro-batches are
        mappings with input_ids and labels (already shifted, -100 = ignore) [B, S], optional segment_ids and
        position_ids [B, S], pixel_values [N, 3, H, W] and image_flags [N] (each micro-batch its own tiles).
        All ranks of one dp replica get the same micro-batches. The loss is sum(w * CE) / sum(w) over the
        whole global batch (the normalizer is all-reduced over dp before any backward), so gradients are the
        single-device gradients of the global batch; ``loss`` is that global loss on every rank.
    ``clip_grad_norm_(max_norm) -> Tensor``, ``zero_grad()``, ``train(mode)``.
    ``named_parameters()`` / ``trainable_parameters()``: local shards under full-model names; ``specs``
        (name -> ``ShardSpec``) and ``tp`` (``TPInfo``) describe the sharding for checkpoint code
        (``parallel.shard.gather_full_tensor`` / ``shard_full_tensor`` move optimizer state the same way).
    ``full_state_dict(all_stages=False)``, ``full_grads(all_stages=False)``: unsharded tensors, padding
        stripped (collective over tp, and pp with all_stages). ``load_full_state_dict(sd)``: shard back.
    ``memory_report(optimizer=None) -> RankMemory``.
``build_optimizer(pm, lr, weight_decay=0, betas, eps, shard_state=None) -> Optimizer`` (parallel.optim); its
    ``param_groups`` decay only tensors with ndim >= 2.
``memory_report(model_cfg, pcfg, world_size, param_dtype, grad_dtype) -> list[RankMemory]`` and
    ``format_memory_report`` (parallel.memory): any preset and layout on the meta device, e.g. 26B on 64 GPUs.

Design notes
------------
- Tensor parallel (parallel.tensor_parallel): column-parallel q/k/v, gate/up, fc1; row-parallel o_proj/proj,
  down, fc2; vocab-parallel embedding and output layer with a vocab-parallel cross-entropy (parallel.loss), so
  full-vocabulary logits are never gathered. The vocabulary is zero-padded to a multiple of tp (padding
  logits masked to -inf). InternLM2 GQA: tp must divide the kv head count (whole kv groups per rank).
- InternViT with a head count tp does not divide (25 at tp 2/4/8) gets zero dummy heads at the end; their
  q/k/v rows, QK-norm weights and proj columns stay exactly zero (gradients masked after backward), and
  export strips them. QK-norm spans the full width: the sum of squares is all-reduced over tp and divided
  by the real width. The ViT runs without sequence parallelism (1025 tokens per tile).
- Sequence parallel (LLM only): hidden states between layers are split over the sequence; column layers
  all-gather, row layers reduce-scatter; SP-region parameters (norm weights) all-reduce their gradients
  over tp. The sequence length must be divisible by tp (clear error otherwise).
- Communication is in small named autograd functions (parallel.comm) over explicit groups.
- Pipeline (parallel.pipeline): stages built by hand and run by torch.distributed.pipelining schedules
  (1F1B, interleaved 1F1B, GPipe); stage 0 = ViT + projector + embedding + first layers. Packed-row
  metadata (segment_ids, position_ids) reaches every stage as per-micro-batch keyword arguments (a side
  channel: every rank holds the micro-batches), only activations travel between stages. Under pp all
  micro-batches of a step share one [B, S].
- Data parallel: gradients are summed over dp once, by bucketed all-reduces launched during the last
  micro-batch's backward (parallel.overlap). ``shard_optimizer`` partitions AdamW state over dp (ZeRO-1 via
  ``ZeroRedundancyOptimizer``). ``dp_shard`` > 1: FSDP2 ``fully_shard`` over dp_shard ranks (HSDP with
  dp / dp_shard replicas), composed with tp and pp (parallel.fsdp); parameters become DTensors over dp.
- Layer-backend seam (parallel.layers): ``column_linear`` / ``row_linear`` / ``core_attention`` factories;
  the torch backend is the reference, ``parallel.te_backend`` provides Transformer Engine modules holding
  the same local shards.
"""

from parallel.config import ParallelConfig, validate_layout
from parallel.memory import RankMemory, format_memory_report, memory_report
from parallel.mesh import ParallelMesh, build_mesh
from parallel.model import ParallelModel, StepResult, parallelize
from parallel.optim import build_optimizer

__all__ = [
    "ParallelConfig",
    "ParallelMesh",
    "ParallelModel",
    "RankMemory",
    "StepResult",
    "build_mesh",
    "build_optimizer",
    "format_memory_report",
    "memory_report",
    "parallelize",
    "validate_layout",
]
