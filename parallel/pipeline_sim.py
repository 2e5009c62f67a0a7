"""Simulated step time of a pipeline schedule from per-micro-batch, per-stage costs (pure, no process group).

Each pipeline rank runs its operations in the schedule's fixed order and starts one as soon as the rank is
free and its input exists: the forward of stage s after the forward of stage s - 1, the backward of stage s after
the backward of stage s + 1 (and its own forward). A backward costs twice its forward (data and weight
gradients). Point-to-point time is not modelled. The orders are Megatron-LM's (Narayanan et al. 2021):
1F1B warms up with pp - rank - 1 forwards; interleaved 1F1B with (pp - rank - 1) * 2 + (v - 1) * pp, walking
micro-batches in groups of pp per virtual stage; GPipe runs all forwards, then all backwards.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SimResult:
    """step: simulated step time; busy: per-rank busy time (same units as the costs)."""

    step: float
    busy: tuple[float, ...]

    @property
    def bubble(self) -> float:
        """Idle fraction of the pipeline ranks over the step."""
        return 1.0 - sum(self.busy) / (len(self.busy) * self.step)

    @property
    def efficiency(self) -> float:
        """Ideal step (all work spread evenly over the ranks, no bubble) over the simulated step."""
        return sum(self.busy) / len(self.busy) / self.step


def rank_order(schedule: str, pp: int, virtual: int, n_micro: int, rank: int) -> list[tuple[str, int, int]]:
    """(kind "F"/"B", micro-batch, stage) in the order ``rank`` runs them."""
    if schedule == "gpipe":
        return [("F", m, rank) for m in range(n_micro)] + [("B", m, rank) for m in range(n_micro)]
    if schedule == "1f1b":
        warmup = min(pp - rank - 1, n_micro)
        fwd = [("F", m, rank) for m in range(n_micro)]
        bwd = [("B", m, rank) for m in range(n_micro)]
    elif schedule == "interleaved_1f1b":
        if n_micro % pp:
            raise ValueError(f"interleaved_1f1b needs micro-batches ({n_micro}) divisible by pp ({pp})")
        total = n_micro * virtual
        warmup = min((pp - rank - 1) * 2 + (virtual - 1) * pp, total)
        fwd = [("F", *_interleaved(k, pp, virtual, rank, True)) for k in range(total)]
        bwd = [("B", *_interleaved(k, pp, virtual, rank, False)) for k in range(total)]
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    order = fwd[:warmup]
    for i in range(len(fwd) - warmup):
        order += [fwd[warmup + i], bwd[i]]
    return order + bwd[len(fwd) - warmup :]


def _interleaved(k: int, pp: int, virtual: int, rank: int, forward: bool) -> tuple[int, int]:
    group, within = divmod(k, pp * virtual)
    chunk = within // pp
    if not forward:
        chunk = virtual - 1 - chunk
    return group * pp + within % pp, chunk * pp + rank


def simulate(schedule: str, pp: int, virtual: int, costs: list[list[float]]) -> SimResult:
    """Step time for ``costs[m][s]`` = training cost of micro-batch m on stage s (pp * virtual stages)."""
    n_micro, n_stages = len(costs), pp * virtual
    orders = [rank_order(schedule, pp, virtual, n_micro, r) for r in range(pp)]
    done: dict[tuple[str, int, int], float] = {}
    clock, pos, busy = [0.0] * pp, [0] * pp, [0.0] * pp
    remaining = sum(len(o) for o in orders)
    while remaining:
        progressed = False
        for r in range(pp):
            while pos[r] < len(orders[r]):
                kind, m, s = orders[r][pos[r]]
                deps = [("F", m, s - 1)] if kind == "F" and s > 0 else []
                if kind == "B":
                    deps = [("F", m, s)] + ([("B", m, s + 1)] if s < n_stages - 1 else [])
                if any(d not in done for d in deps):
                    break
                duration = costs[m][s] / 3.0 * (1.0 if kind == "F" else 2.0)
                start = max([clock[r]] + [done[d] for d in deps])
                clock[r] = done[(kind, m, s)] = start + duration
                busy[r] += duration
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError(f"{schedule} order deadlocks at pp={pp}, virtual={virtual}")
    return SimResult(step=max(clock), busy=tuple(busy))
