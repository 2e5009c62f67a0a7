"""Pipeline stage costs and the best split of ViT + LLM layers over stages: pure functions, no process group.

A model is a chain of units in graph order: the ViT layers that run (``select_layer``; the patch embedding rides
with the first), the projector (with the token embedding and the image splice; it closes the ViT's last stage),
the LLM decoder layers, and the output layer (final norm + ``lm_head`` + loss, on the last stage). A split gives
every stage (``pp * virtual`` of them, stage s on pipeline rank s % pp) a contiguous run of units: ViT layers
only on a leading prefix of stages, LLM layers after. The cost of a unit is training FLOPs of one micro-batch
from ``mllm.train.flops`` (the project's FLOP model, frozen parts charged 2x or 1x their forward).

``best_stage_split`` minimizes the busiest **pipeline rank** (the sum of its virtual stages, which is what a
rank spends per micro-batch), then the costliest single stage (what the schedule's critical path sees), then
the spread. It is what ``parallel.stage_split=joint`` uses, and what a layout planner can call to compare
placements without building anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from mllm.model.config import ModelConfig
from mllm.train.flops import (
    TrainedParts,
    llm_forward_flops,
    multipliers_for,
    projector_forward_flops_per_tile,
    vision_forward_flops_per_tile,
)
from parallel.pipeline_sim import simulate


@dataclass(frozen=True)
class UnitCosts:
    """Training FLOPs of one micro-batch in each unit: ``vit_layer`` per ViT layer (``vit_embed`` extra on the
    first), ``projector`` once, ``llm_layer`` per decoder layer, ``head`` for the output layer and loss."""

    vit_layers: int
    llm_layers: int
    vit_embed: float
    vit_layer: float
    projector: float
    llm_layer: float
    head: float

    def units(self) -> list[float]:
        """Cost of every unit in graph order: ViT layers, projector, LLM layers, output layer."""
        vit = [self.vit_layer] * self.vit_layers
        if vit:
            vit[0] += self.vit_embed
        return [*vit, self.projector, *([self.llm_layer] * self.llm_layers), self.head]

    @property
    def total(self) -> float:
        return sum(self.units())


def unit_costs(
    cfg: ModelConfig,
    tiles: float,
    tokens: float,
    sample_tokens: float | None = None,
    parts: TrainedParts | None = None,
) -> UnitCosts:
    """Per-unit training FLOPs of a micro-batch of ``tokens`` LLM tokens (row length times rows: the LLM runs
    over padding too) and ``tiles`` ViT tiles, its samples ``sample_tokens`` long on average (attention is
    per sample; default: one sample per row)."""
    mult = multipliers_for(parts or TrainedParts())
    v, t = cfg.vision, cfg.text
    n_vit = vit_layers_run(cfg)
    vit_gemm, vit_attn = vision_forward_flops_per_tile(v)
    patch = 2 * v.num_patches * (v.num_channels * v.patch_size**2) * v.hidden_size
    per_layer_gemm, per_layer_attn = (vit_gemm - patch) / v.num_layers, vit_attn / v.num_layers
    sample_tokens = tokens if sample_tokens is None else sample_tokens
    # llm_forward_flops(cfg, n) charges n^2 attention for one sample of n tokens: scale to the samples.
    gemm_one, attn_one = llm_forward_flops(t, 1)
    logits = 2 * t.hidden_size * t.vocab_size
    layer_gemm = (gemm_one - logits) / t.num_layers * tokens
    layer_attn = attn_one / t.num_layers * sample_tokens * tokens
    m_v, m_p, m_l = mult["vision"], mult["projector"], mult["llm"]
    return UnitCosts(
        vit_layers=n_vit,
        llm_layers=t.num_layers,
        vit_embed=tiles * m_v.gemm * patch,
        vit_layer=tiles * (m_v.gemm * per_layer_gemm + m_v.attention * per_layer_attn),
        projector=tiles * m_p.gemm * projector_forward_flops_per_tile(cfg),
        llm_layer=m_l.gemm * layer_gemm + m_l.attention * layer_attn,
        head=m_l.gemm * logits * tokens,
    )


def vit_layers_run(cfg: ModelConfig) -> int:
    n = cfg.vision.num_layers
    return cfg.select_layer if cfg.select_layer >= 0 else n + 1 + cfg.select_layer


@dataclass(frozen=True)
class Split:
    """ViT and LLM layers per pipeline stage (stage order; stage s runs on pipeline rank s % pp).

    vision_layers: nonzero only on a leading run of stages; the last of them also holds the projector and the
    token embedding (stage 0 when the ViT has no layer to run). llm_layers: decoder layers per stage.
    """

    pp: int
    vision_layers: tuple[int, ...]
    llm_layers: tuple[int, ...]

    @property
    def num_stages(self) -> int:
        return len(self.llm_layers)

    @property
    def projector_stage(self) -> int:
        nonzero = [s for s, n in enumerate(self.vision_layers) if n]
        return nonzero[-1] if nonzero else 0

    def stage_costs(self, costs: UnitCosts) -> list[float]:
        """Training FLOPs of one micro-batch on each stage."""
        out = []
        for s, (nv, nl) in enumerate(zip(self.vision_layers, self.llm_layers)):
            first_vit = sum(self.vision_layers[:s]) == 0 and nv > 0
            cost = nv * costs.vit_layer + (costs.vit_embed if first_vit else 0.0) + nl * costs.llm_layer
            cost += costs.projector if s == self.projector_stage else 0.0
            cost += costs.head if s == self.num_stages - 1 else 0.0
            out.append(cost)
        return out

    def rank_costs(self, costs: UnitCosts) -> list[float]:
        """Per pipeline rank: the sum of its virtual stages."""
        ranks = [0.0] * self.pp
        for s, c in enumerate(self.stage_costs(costs)):
            ranks[s % self.pp] += c
        return ranks

    def balance(self, costs: UnitCosts) -> float:
        """Ideal (total / pp) over the busiest rank: 1.0 is a perfect static split."""
        ranks = self.rank_costs(costs)
        return sum(ranks) / self.pp / max(ranks)


def split_from_cuts(cuts: list[int], costs: UnitCosts, pp: int) -> Split:
    """A split from unit boundaries (stage s owns units cuts[s]..cuts[s+1]-1 of ``costs.units()``)."""
    nv = costs.vit_layers
    vision, llm = [], []
    for a, b in zip(cuts[:-1], cuts[1:]):
        vision.append(max(0, min(b, nv) - min(a, nv)))
        llm.append(max(0, min(b, nv + 1 + costs.llm_layers) - max(a, nv + 1)))
    return Split(pp, tuple(vision), tuple(llm))


def _valid(cuts: list[int], costs: UnitCosts) -> bool:
    """Every stage holds a layer (ViT or LLM); the last stage holds an LLM layer."""
    split = split_from_cuts(cuts, costs, 1)
    if any(v + n == 0 for v, n in zip(split.vision_layers, split.llm_layers)):
        return False
    return split.llm_layers[-1] > 0


def _min_max_cuts(units: list[float], num_stages: int) -> list[int]:
    """Contiguous split of ``units`` minimizing the costliest stage (then the sum of squares): exact DP."""
    n = len(units)
    prefix = [0.0]
    for u in units:
        prefix.append(prefix[-1] + u)
    inf = (float("inf"), float("inf"))
    best = [[inf] * (n + 1) for _ in range(num_stages + 1)]
    arg = [[0] * (n + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0.0, 0.0)
    for s in range(1, num_stages + 1):
        for k in range(s, n + 1):
            for j in range(s - 1, k):
                c = prefix[k] - prefix[j]
                prev = best[s - 1][j]
                value = (max(prev[0], c), prev[1] + c * c)
                if value < best[s][k]:
                    best[s][k], arg[s][k] = value, j
    cuts, k = [n], n
    for s in range(num_stages, 0, -1):
        k = arg[s][k]
        cuts.append(k)
    return cuts[::-1]


def _joint_cuts(costs: UnitCosts, num_stages: int, pp: int) -> list[int]:
    """DP start (min-max stage), then the per-rank refinement: with virtual stages the busiest rank, not the
    busiest stage, bounds the step."""
    units = costs.units()
    # The projector may not start a stage of its own ahead of the ViT's last layer: merge it into that layer.
    nv = costs.vit_layers
    merged = units[: nv - 1] + [units[nv - 1] + units[nv]] + units[nv + 1 :] if nv else units
    cuts = _min_max_cuts(merged, num_stages)
    cuts = [c + 1 if nv and c >= nv else c for c in cuts]  # back to unit indices (projector re-inserted)
    cuts[-1] = len(units)
    if not _valid(cuts, costs):
        return _llm_only_cuts(costs, num_stages, pp)
    return _refine(cuts, costs, pp, first_cut_min=1)


def _refine(cuts: list[int], costs: UnitCosts, pp: int, first_cut_min: int) -> list[int]:
    """Per-rank local search from the stage-balanced ``cuts`` with the costliest stage capped at 0, 5, 10%
    above its optimum or not at all; the candidate with the shortest simulated step on identical micro-batches
    wins (a perfect per-rank balance that piles work onto one stage stalls the schedule)."""
    units = costs.units()
    cap = max(sum(units[a:b]) for a, b in zip(cuts[:-1], cuts[1:]))
    candidates = [cuts] + [
        _improve_per_rank(cuts, costs, pp, first_cut_min, cap * tol) for tol in (1.0, 1.05, 1.1, float("inf"))
    ]
    virtual = (len(cuts) - 1) // pp
    schedule = "1f1b" if virtual == 1 else "interleaved_1f1b"

    def step(c: list[int]) -> float:
        per_stage = split_from_cuts(c, costs, pp).stage_costs(costs)
        return simulate(schedule, pp, virtual, [per_stage] * (4 * pp)).step

    return min(candidates, key=step)


def _improve_per_rank(
    cuts: list[int], costs: UnitCosts, pp: int, first_cut_min: int, stage_cap: float
) -> list[int]:
    """Move one or two stage boundaries by one unit while the (busiest rank, costliest stage, spread)
    objective drops (pairs matter with virtual stages: a unit leaves a rank only through a neighbouring stage).
    Stage 0 keeps at least ``first_cut_min`` units; the projector never starts a stage (it stays with the ViT).
    """
    units, nv = costs.units(), costs.vit_layers
    prefix = [0.0]
    for u in units:
        prefix.append(prefix[-1] + u)

    def objective(c: list[int]) -> tuple[float, float, float]:
        stages = [prefix[b] - prefix[a] for a, b in zip(c[:-1], c[1:])]
        ranks = [sum(stages[r::pp]) for r in range(pp)]
        return (max(ranks), max(stages), sum(x * x for x in stages))

    def ok(c: list[int]) -> bool:
        ordered = all(a < b for a, b in zip(c[:-1], c[1:]))
        capped = all(prefix[b] - prefix[a] <= stage_cap for a, b in zip(c[:-1], c[1:]))
        return (
            ordered and capped and c[1] >= first_cut_min and not (nv and nv in c[1:-1]) and _valid(c, costs)
        )

    inner = range(1, len(cuts) - 1)
    moves = [((i, d),) for i in inner for d in (-1, 1)]
    moves += [((i, d), (j, e)) for i in inner for j in inner if i < j for d in (-1, 1) for e in (-1, 1)]
    best = objective(cuts)
    improved = True
    while improved:
        improved = False
        for move in moves:
            trial = list(cuts)
            for i, d in move:
                trial[i] += d
            if ok(trial) and (value := objective(trial)) < best:
                best, cuts, improved = value, trial, True
    return cuts


def _llm_only_cuts(costs: UnitCosts, num_stages: int, pp: int) -> list[int]:
    """Today's placement: the whole ViT, the projector and a decoder layer on stage 0, LLM layers balanced."""
    nv = costs.vit_layers
    units = costs.units()
    head = [sum(units[: nv + 2])] + units[nv + 2 :]  # ViT + projector + first LLM layer as one unit
    cuts = _min_max_cuts(head, num_stages)
    cuts = [0] + [c + nv + 1 for c in cuts[1:]]
    return _refine(cuts, costs, pp, first_cut_min=nv + 2)


def best_stage_split(
    model_cfg: ModelConfig,
    pp: int,
    virtual: int = 1,
    tiles_per_row: float = 8.0,
    seq_len: int = 4096,
    micro_batch_size: int = 1,
    vision_across_stages: bool = True,
    sample_tokens: float | None = None,
    parts: TrainedParts | None = None,
) -> Split:
    """The static split of ``pp * virtual`` stages for micro-batches of ``micro_batch_size`` rows of
    ``seq_len`` tokens with ``tiles_per_row`` tiles each (tile-balanced packing makes this nearly constant).

    ``vision_across_stages=False`` gives today's placement (ViT and projector on stage 0, LLM layers balanced).
    Pure and cheap (milliseconds): a planner can call it for every candidate layout.
    """
    num_stages = pp * virtual
    if model_cfg.text.num_layers < num_stages and not vision_across_stages:
        raise ValueError(f"{model_cfg.text.num_layers} LLM layers cannot fill {num_stages} stages")
    costs = unit_costs(
        model_cfg,
        tiles_per_row * micro_batch_size,
        seq_len * micro_batch_size,
        sample_tokens if sample_tokens is not None else seq_len,
        parts,
    )
    cuts = (
        _joint_cuts(costs, num_stages, pp) if vision_across_stages else _llm_only_cuts(costs, num_stages, pp)
    )
    return split_from_cuts(cuts, costs, pp)
