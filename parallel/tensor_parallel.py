"""Apply Megatron tensor (and sequence) parallelism to the single-device modules by replacing submodules.

Module and parameter names stay those of ``mllm.model`` so full checkpoints map one to one. Every function
returns the ``ShardSpec`` of each parameter it split, keyed by full parameter name. Call these under
``torch.device("meta")`` and materialize afterwards: nothing full-size is ever allocated.

- InternViT: q/k/v column-parallel over heads, proj row-parallel, fc1 column / fc2 row. Heads that tp does not
  divide are padded with zero dummy heads at the end (25 -> 32 at tp 8, as Megatron); QK-norm becomes
  ``TensorParallelRMSNorm`` (sum of squares reduced over tp, divided by the real width). Optional sequence
  parallelism over the flattened tile tokens, padded to a multiple of tp (``parallel.vision_sp``).
- Projector: fc1 column, fc2 row.
- LLM: q/k/v column (whole GQA kv groups per rank), o_proj row, gate/up column, down row; optional sequence
  parallelism between layers (norms on sequence shards). Embedding and output layer split the (padded)
  vocabulary; the output layer's logits stay split for the vocab-parallel cross-entropy.
"""

from __future__ import annotations

import torch
from torch import nn

from mllm.model.config import ModelConfig, TextConfig, VisionConfig
from mllm.model.internvl import InternVLModel
from mllm.model.llm import add_head_norms, attend
from mllm.model.projector import Projector
from mllm.model.vision import InternViT
from parallel.layers import TensorParallelRMSNorm, TPInfo, VocabParallelEmbedding
from parallel.shard import ShardSpec, pad_to
from parallel.vision_sp import apply_vision_sequence_parallel

Specs = dict[str, ShardSpec]


def padded_vision_heads(cfg: VisionConfig, tp_size: int) -> int:
    """Head count after zero dummy heads: the next multiple of tp (25 -> 26 at tp 2, 28 at tp 4, 32 at tp 8)."""
    return pad_to(cfg.num_heads, tp_size)


def padded_vocab(cfg: TextConfig, tp_size: int) -> int:
    return pad_to(cfg.vocab_size, tp_size)


def _linear_specs(prefix: str, kind: str, full: int, padded: int, bias: bool) -> Specs:
    """Column: weight rows and bias split. Row: weight columns split, bias replicated."""
    if kind == "column":
        specs = {f"{prefix}.weight": ShardSpec(0, full, padded)}
        if bias:
            specs[f"{prefix}.bias"] = ShardSpec(0, full, padded)
        return specs
    return {f"{prefix}.weight": ShardSpec(1, full, padded)}


def parallelize_vision_tp(
    vision: InternViT,
    cfg: VisionConfig,
    tp: TPInfo,
    backend,
    attention_backend: str,
    prefix: str = "vision",
    vision_sp: bool = False,
) -> Specs:
    width, head_dim = cfg.hidden_size, cfg.head_dim
    padded = padded_vision_heads(cfg, tp.size) * head_dim
    specs: Specs = {}
    sp = vision_sp
    for i, block in enumerate(vision.layers):
        attn, mlp, p = block.attn, block.mlp, f"{prefix}.layers.{i}"
        for name in ("q_proj", "k_proj", "v_proj"):
            setattr(
                attn,
                name,
                backend.column_linear(width, padded, bias=cfg.qkv_bias, tp=tp, sequence_parallel=sp),
            )
            specs.update(_linear_specs(f"{p}.attn.{name}", "column", width, padded, cfg.qkv_bias))
        if cfg.qk_norm:
            for name in ("q_norm", "k_norm"):
                local = padded // tp.size
                setattr(attn, name, TensorParallelRMSNorm(local, width, cfg.norm_eps, tp=tp))
                specs[f"{p}.attn.{name}.weight"] = ShardSpec(0, width, padded)
        attn.proj = backend.row_linear(padded, width, bias=True, tp=tp, sequence_parallel=sp)
        specs.update(_linear_specs(f"{p}.attn.proj", "row", width, padded, True))
        attn.core_attention = backend.core_attention(attention_backend, tp=tp)
        inter = cfg.intermediate_size
        mlp.fc1 = backend.column_linear(width, inter, bias=True, tp=tp, sequence_parallel=sp)
        mlp.fc2 = backend.row_linear(inter, width, bias=True, tp=tp, sequence_parallel=sp)
        specs.update(_linear_specs(f"{p}.mlp.fc1", "column", inter, inter, True))
        specs.update(_linear_specs(f"{p}.mlp.fc2", "row", inter, inter, True))
    return specs


def parallelize_projector_tp(projector: Projector, tp: TPInfo, backend, prefix: str = "projector") -> Specs:
    in_width, out_width = projector.fc1.in_features, projector.fc1.out_features
    projector.fc1 = backend.column_linear(in_width, out_width, bias=True, tp=tp)
    projector.fc2 = backend.row_linear(out_width, out_width, bias=True, tp=tp)
    specs = _linear_specs(f"{prefix}.fc1", "column", out_width, out_width, True)
    specs.update(_linear_specs(f"{prefix}.fc2", "row", out_width, out_width, True))
    return specs


class TensorParallelAttention(nn.Module):
    """InternLM2/Llama attention on local heads; reads the sequence length after the column layers, so the
    input may be a sequence shard (sequence parallelism) while attention sees the whole sequence."""

    def __init__(
        self, cfg: TextConfig, tp: TPInfo, backend, sequence_parallel: bool, attention_backend: str
    ) -> None:
        super().__init__()
        self.head_dim = hd = cfg.resolved_head_dim
        width, q_width, kv_width = cfg.hidden_size, cfg.num_heads * hd, cfg.num_kv_heads * hd
        sp = sequence_parallel
        self.q_proj = backend.column_linear(width, q_width, bias=cfg.qkv_bias, tp=tp, sequence_parallel=sp)
        self.k_proj = backend.column_linear(width, kv_width, bias=cfg.qkv_bias, tp=tp, sequence_parallel=sp)
        self.v_proj = backend.column_linear(width, kv_width, bias=cfg.qkv_bias, tp=tp, sequence_parallel=sp)
        self.o_proj = backend.row_linear(q_width, width, bias=cfg.o_bias, tp=tp, sequence_parallel=sp)
        add_head_norms(self, cfg)  # per head: local heads need no communication (gradients are partial sums)
        self.core_attention = backend.core_attention(attention_backend, tp=tp)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mask) -> torch.Tensor:
        q = self.q_proj(x)
        b, s = q.shape[:2]
        return self.o_proj(attend(self, q, x, rope, mask).reshape(b, s, -1))


def parallelize_llm_tp(
    model: InternVLModel, cfg: ModelConfig, tp: TPInfo, backend, sequence_parallel: bool
) -> tuple[Specs, set[str]]:
    """Decoder layers, embedding and output layer. Also returns the names of replicated parameters whose
    gradients are partial sums over tp (norm weights and row-parallel biases in the sequence-parallel region,
    Qwen3's per-head q/k norms): they are all-reduced over tp after backward."""
    t, sp = cfg.text, sequence_parallel
    hd = t.resolved_head_dim
    specs: Specs = {}
    sp_params: set[str] = set()
    for i, layer in enumerate(model.llm.layers):
        p = f"llm.layers.{i}"
        layer.self_attn = TensorParallelAttention(t, tp, backend, sp, cfg.attention_backend)
        q_width, kv_width = t.num_heads * hd, t.num_kv_heads * hd
        specs.update(_linear_specs(f"{p}.self_attn.q_proj", "column", q_width, q_width, t.qkv_bias))
        specs.update(_linear_specs(f"{p}.self_attn.k_proj", "column", kv_width, kv_width, t.qkv_bias))
        specs.update(_linear_specs(f"{p}.self_attn.v_proj", "column", kv_width, kv_width, t.qkv_bias))
        specs.update(_linear_specs(f"{p}.self_attn.o_proj", "row", q_width, q_width, t.o_bias))
        mlp, inter = layer.mlp, t.intermediate_size
        mlp.gate_proj = backend.column_linear(t.hidden_size, inter, bias=False, tp=tp, sequence_parallel=sp)
        mlp.up_proj = backend.column_linear(t.hidden_size, inter, bias=False, tp=tp, sequence_parallel=sp)
        mlp.down_proj = backend.row_linear(inter, t.hidden_size, bias=False, tp=tp, sequence_parallel=sp)
        for name in ("gate_proj", "up_proj"):
            specs.update(_linear_specs(f"{p}.mlp.{name}", "column", inter, inter, False))
        specs.update(_linear_specs(f"{p}.mlp.down_proj", "row", inter, inter, False))
        if t.qk_norm and tp.size > 1:  # replicated weights applied to this rank's heads only
            sp_params |= {f"{p}.self_attn.q_norm.weight", f"{p}.self_attn.k_norm.weight"}
        if sp:
            sp_params |= {f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"}
            if t.o_bias:
                sp_params.add(f"{p}.self_attn.o_proj.bias")
    if sp:
        sp_params.add("llm.norm.weight")
    vocab = padded_vocab(t, tp.size)
    model.llm.embed_tokens = VocabParallelEmbedding(vocab, t.hidden_size, tp=tp)
    model.lm_head = backend.column_linear(t.hidden_size, vocab, bias=False, tp=tp, sequence_parallel=sp)
    if t.tie_word_embeddings:
        model.lm_head.weight = model.llm.embed_tokens.weight
    specs["llm.embed_tokens.weight"] = ShardSpec(0, t.vocab_size, vocab)
    specs["lm_head.weight"] = ShardSpec(0, t.vocab_size, vocab)
    return specs, sp_params


def parallelize_model_tp(
    model: InternVLModel,
    cfg: ModelConfig,
    tp: TPInfo,
    backend,
    sequence_parallel: bool,
    vision_sequence_parallel: bool = False,
) -> tuple[Specs, set[str]]:
    """All of the above on a whole (meta) model (``parallel.vision_sp`` for the ViT's sequence parallelism)."""
    vision_sp = vision_sequence_parallel and tp.size > 1
    specs = parallelize_vision_tp(
        model.vision, cfg.vision, tp, backend, cfg.attention_backend, vision_sp=vision_sp
    )
    specs.update(parallelize_projector_tp(model.projector, tp, backend))
    llm_specs, sp_params = parallelize_llm_tp(model, cfg, tp, backend, sequence_parallel)
    specs.update(llm_specs)
    if vision_sp:
        sp_params |= apply_vision_sequence_parallel(model.vision, cfg.vision.num_patches + 1)
    return specs, sp_params
