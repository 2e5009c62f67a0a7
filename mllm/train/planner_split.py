"""The stage split a planned layout runs, and its per-rank compute, for ``mllm.train.planner``.

The split is the trainer's own (``parallel.pipeline.resolve_split``: explicit layers per stage, or
``best_stage_split`` for ``parallel.stage_split=llm|joint``), cached per model and split-relevant keys: a layout
search asks for the same few splits thousands of times.
"""

from __future__ import annotations

from mllm.train.config import RunConfig
from mllm.train.flops import TrainedParts
from parallel.config import ParallelConfig
from parallel.pipeline import resolve_split
from parallel.stage_split import Split, UnitCosts, unit_costs

_SPLITS: dict[tuple, Split] = {}


def layout_split(run: RunConfig, pcfg: ParallelConfig) -> Split:
    """``resolve_split`` of ``pcfg`` (raises its ``ValueError`` for a split the run cannot use)."""
    p = pcfg
    key = (repr(run.model), p.pp, p.virtual_stages, p.stage_split, repr(p.layers_per_stage),
           repr(p.vision_layers_per_stage), p.balance_image_token_fraction, p.balance_seq_len, p.freeze_vision,
           p.freeze_projector, p.freeze_llm, p.freeze_vit_layers_below)  # fmt: skip
    if key not in _SPLITS:
        _SPLITS[key] = resolve_split(run.model, pcfg)
    return _SPLITS[key]


def vision_layer_ids(split: Split, stage: int) -> list[int]:
    """The ViT layers ``stage`` runs."""
    start = sum(split.vision_layers[:stage])
    return list(range(start, start + split.vision_layers[stage]))


def run_unit_costs(run: RunConfig, pcfg: ParallelConfig) -> UnitCosts:
    """Training FLOPs per unit of one of the run's micro-batches (``data.seq_len`` x micro batch tokens,
    ``balance_image_token_fraction`` of them image tokens)."""
    m, d = run.model, run.data
    tokens = d.seq_len * d.micro_batch_size
    tiles = tokens * pcfg.balance_image_token_fraction / m.num_image_token
    parts = TrainedParts(not pcfg.freeze_vision, not pcfg.freeze_projector, not pcfg.freeze_llm,
                         vision_adapters=m.lora.vision > 0, llm_adapters=m.lora.llm > 0)  # fmt: skip
    return unit_costs(m, tiles, tokens, d.seq_len, parts)


def recompute_stretch(run: RunConfig, pcfg: ParallelConfig) -> float:
    """1 + the share of extra FLOPs activation checkpointing costs: one more forward (1/3 of a trained layer)
    of the checkpointed parts (a frozen ViT keeps nothing, so nothing is recomputed)."""
    c = run_unit_costs(run, pcfg)
    vit = c.vit_layers * c.vit_layer + c.vit_embed
    llm = c.llm_layers * c.llm_layer
    extra = (vit / 3 if pcfg.activation_checkpointing_vision and not pcfg.freeze_vision else 0.0) + (
        llm / 3 if pcfg.activation_checkpointing_llm else 0.0
    )
    return 1.0 + extra / c.total


def rank_imbalance(run: RunConfig, pcfg: ParallelConfig, split: Split) -> float:
    """The busiest pipeline rank's training FLOPs of a micro-batch over the mean rank's (1.0: balanced)."""
    ranks = split.rank_costs(run_unit_costs(run, pcfg))
    return max(ranks) / (sum(ranks) / len(ranks))
