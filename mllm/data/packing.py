"""FLOP-balanced packing of samples into fixed-length rows.

Every rank packs the same global stream into the same rows (no communication), so the rows do not depend on the
layout; `assign_rows` then deals each step's rows to the dp ranks. Balance comes from making every row cost about
the same FLOPs: rows are filled to the row length and steered toward a FLOP target, counting vision tiles (a 448
tile through InternViT-6B costs about as much as its 256 LLM tokens) and the per-sample attention term, not
tokens alone, and the dealing puts the heaviest rows on different ranks.

With a tile target (``tiles_per_row``), rows also aim at that many vision tiles (within +-1 whenever the buffer
allows): every micro-batch then costs the vision stages about the same, so a static pipeline split of the ViT
across stages stays balanced. A row holds at most target + 1 tiles unless one sample alone has more.

Each row starts with the oldest buffered sample, so no sample waits more than `buffer_size` rows and the
packer's state stays small (positions and sizes only).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class FlopModel:
    """Training FLOPs of a sample: linear LLM term + causal attention within the sample + vision tiles."""

    llm_per_token: float = 6 * 19.86e9
    attn_per_token_pair: float = 1.77e6
    vit_per_tile: float = 35.8e12

    def sample(self, tokens: np.ndarray | int, tiles: np.ndarray | int) -> np.ndarray | float:
        tokens = np.asarray(tokens, dtype=np.float64)
        return (
            self.llm_per_token * tokens
            + self.attn_per_token_pair * tokens**2
            + self.vit_per_tile * np.asarray(tiles)
        )


class Packer:
    """Buffers (position, tokens, tiles) and emits rows as lists of positions."""

    def __init__(
        self,
        seq_len: int,
        max_tiles_per_row: int,
        flops: FlopModel | None = None,
        buffer_size: int = 256,
        size_bonus: float = 0.02,
        slack: int | None = None,
        max_wait: int | None = None,
        tiles_per_row: int = 0,
    ) -> None:
        self.seq_len = seq_len
        self.max_tiles = max_tiles_per_row
        self.flops = flops or FlopModel()
        self.buffer_size = max(2, buffer_size)
        self.size_bonus = size_bonus
        # Tokens a row may leave empty and still count as complete (0.4% of the row by default).
        self.slack = slack if slack is not None else max(1, seq_len // 256)
        self.max_wait = max_wait if max_wait is not None else self.buffer_size
        # 0: no tile target; -1: the mix's own tiles per row (running tiles per token x seq_len); k: k tiles.
        self.tiles_per_row = tiles_per_row
        self.pos: list[int] = []
        self.tokens: list[int] = []
        self.tiles: list[int] = []
        self.born: list[int] = []  # rows emitted when the sample arrived (its age bounds its wait)
        self.rows_emitted = 0
        # Running totals of everything added: their ratio is the FLOPs per token a full row should have.
        self.sum_flops = 0.0
        self.sum_tokens = 0
        self.sum_tiles = 0

    def __len__(self) -> int:
        return len(self.pos)

    def add(self, pos: int, tokens: int, tiles: int) -> None:
        if tokens > self.seq_len or tiles > self.max_tiles:
            raise ValueError(f"sample {pos} ({tokens} tokens, {tiles} tiles) cannot fit a row")
        self.pos.append(pos)
        self.tokens.append(tokens)
        self.tiles.append(tiles)
        self.born.append(self.rows_emitted)
        self.sum_flops += float(self.flops.sample(tokens, tiles))
        self.sum_tokens += tokens
        self.sum_tiles += tiles

    def ready(self) -> bool:
        return len(self.pos) >= self.buffer_size

    def density(self) -> float:
        """Average FLOPs per token of everything seen: a full row at level 1.0 costs density * seq_len."""
        return self.sum_flops / max(1, self.sum_tokens)

    def tile_target(self) -> int:
        """Tiles a row aims at (0: no target)."""
        if self.tiles_per_row >= 0:
            return self.tiles_per_row
        return max(1, round(self.sum_tiles / max(1, self.sum_tokens) * self.seq_len))

    def _tile_penalty(self, final_tiles: np.ndarray, target: int) -> np.ndarray:
        """0 inside target +- 1, one FLOP-miss unit per tile outside; a small pull toward the target inside."""
        if not target:
            return np.zeros(np.shape(final_tiles))
        miss = np.abs(np.asarray(final_tiles, dtype=np.float64) - target)
        return np.maximum(miss - 1.0, 0.0) + 0.01 * miss

    def pop_row(self, level: float = 1.0) -> list[int]:
        """Choose one row (positions) whose FLOPs approach level * density * seq_len.

        Seed: the oldest sample once it has waited `max_wait` rows, else the sample that best suits the level.
        Then, whenever one sample or a pair completes the row (to within `slack` tokens), the completion whose
        final FLOPs are closest to the target; otherwise the sample that keeps the predicted final FLOPs
        closest to the target, preferring larger samples. Stops when nothing fits.
        """
        if not self.pos:
            return []
        tokens = np.asarray(self.tokens, dtype=np.int64)
        tiles = np.asarray(self.tiles, dtype=np.int64)
        flops = np.asarray(self.flops.sample(tokens, tiles))
        density = self.density()
        target_tiles = self.tile_target()
        row = _Row(self.seq_len, self.max_tiles, level * density * self.seq_len)
        free = np.ones(len(tokens), dtype=bool)
        oldest = int(np.argmin(self.born))
        if self.rows_emitted - self.born[oldest] >= self.max_wait:
            row.add(oldest, tokens, tiles, flops, free)
        while True:
            tile_room = row.tile_room
            if target_tiles and row.members:  # the seed may be any size; then at most target + 1 in all
                tile_room = min(tile_room, max(0, target_tiles + 1 - row.tiles))
            cand = np.flatnonzero(free & (tokens <= row.room) & (tiles <= tile_room))
            if cand.size == 0:
                break
            picked = self._completion(row, cand, tokens, tiles, flops, target_tiles) if row.members else None
            if picked is None:
                predicted = row.flops + flops[cand] + density * (row.room - tokens[cand])
                score = self._miss(predicted, row.target) - self.size_bonus * tokens[cand] / row.room
                if target_tiles:
                    fill = (row.room - tokens[cand]) * target_tiles / self.seq_len
                    score = score + self._tile_penalty(row.tiles + tiles[cand] + fill, target_tiles)
                picked = [int(cand[np.argmin(score)])]
            for i in picked:
                row.add(i, tokens, tiles, flops, free)
        out = [self.pos[i] for i in row.members]
        keep = np.flatnonzero(free).tolist()
        self.pos = [self.pos[i] for i in keep]
        self.tokens = [self.tokens[i] for i in keep]
        self.tiles = [self.tiles[i] for i in keep]
        self.born = [self.born[i] for i in keep]
        self.rows_emitted += 1
        return out

    @staticmethod
    def _miss(flops: np.ndarray, target: float) -> np.ndarray:
        return np.abs(flops / target - 1.0)

    def _completion(
        self,
        row: _Row,
        cand: np.ndarray,
        tokens: np.ndarray,
        tiles: np.ndarray,
        flops: np.ndarray,
        target_tiles: int = 0,
    ) -> list[int] | None:
        """One or two candidates that fill the row to within `slack`, best final FLOPs (and tiles) first."""
        lo = row.room - self.slack
        t, n, f = tokens[cand], tiles[cand], flops[cand]
        single = t >= lo
        if target_tiles:  # only completions that land within target +- 1 tiles
            single &= np.abs(row.tiles + n - target_tiles) <= 1
        if single.any():
            idx = np.flatnonzero(single)
            miss = self._miss(row.flops + f[idx], row.target)
            miss = miss + self._tile_penalty(row.tiles + n[idx], target_tiles)
            return [int(cand[idx[np.argmin(miss)]])]
        pair_t = t[:, None] + t[None, :]
        tile_room = row.tile_room
        if target_tiles:
            tile_room = min(tile_room, max(0, target_tiles + 1 - row.tiles))
        ok = (pair_t >= lo) & (pair_t <= row.room) & (n[:, None] + n[None, :] <= tile_room)
        if target_tiles:
            ok &= np.abs(row.tiles + n[:, None] + n[None, :] - target_tiles) <= 1
        ok &= np.triu(np.ones_like(ok), 1)
        if not ok.any():
            return None
        i, j = np.nonzero(ok)
        miss = self._miss(row.flops + f[i] + f[j], row.target)
        miss = miss + self._tile_penalty(row.tiles + n[i] + n[j], target_tiles)
        best = int(np.argmin(miss))
        return [int(cand[i[best]]), int(cand[j[best]])]

    def state_dict(self) -> dict:
        return {
            "pos": list(self.pos),
            "tokens": list(self.tokens),
            "tiles": list(self.tiles),
            "born": list(self.born),
            "rows_emitted": self.rows_emitted,
            "sum_flops": self.sum_flops,
            "sum_tokens": self.sum_tokens,
            "sum_tiles": self.sum_tiles,
        }

    def load_state_dict(self, state: dict) -> None:
        self.pos = [int(x) for x in state["pos"]]
        self.tokens = [int(x) for x in state["tokens"]]
        self.tiles = [int(x) for x in state["tiles"]]
        self.born = [int(x) for x in state["born"]]
        self.rows_emitted = int(state["rows_emitted"])
        self.sum_flops = float(state["sum_flops"])
        self.sum_tokens = int(state["sum_tokens"])
        self.sum_tiles = int(state.get("sum_tiles", 0))  # absent in states written before tile targets


class _Row:
    """A row being filled (indices into the packer's buffer arrays)."""

    def __init__(self, seq_len: int, max_tiles: int, target: float) -> None:
        self.room, self.tile_room, self.target = seq_len, max_tiles, target
        self.flops = 0.0
        self.tiles = 0
        self.members: list[int] = []

    def add(self, i: int, tokens: np.ndarray, tiles: np.ndarray, flops: np.ndarray, free: np.ndarray) -> None:
        self.members.append(i)
        free[i] = False
        self.room -= int(tokens[i])
        self.tile_room -= int(tiles[i])
        self.tiles += int(tiles[i])
        self.flops += float(flops[i])


GOLDEN = 0.6180339887498949
LEVEL_SPREAD = 0.15  # measured best on the SFT-like mix of bench/packing.py


def row_level(step: int, spread: float = LEVEL_SPREAD) -> float:
    """FLOP level of the rows of the step-th step: a low-discrepancy sweep of 1 +- spread.

    All rows of a step target the same level (the loader passes the step index), so any split of the step among
    dp ranks is balanced, and rows that cannot be made average (a long text with few tiles, say) go to light
    steps on every rank at once instead of unbalancing a step.
    """
    return 1.0 + spread * (2.0 * ((step * GOLDEN) % 1.0) - 1.0)


def assign_rows(flops: list[float], ranks: int) -> list[list[int]]:
    """Deal one step's rows (their FLOPs) to `ranks` data-parallel ranks: equal counts, largest row first to the
    least loaded rank (ties: lower rank), each rank's rows in step order. The rows are packed without knowing the
    layout; only this split depends on it."""
    per_rank = len(flops) // ranks
    loads = [0.0] * ranks
    out: list[list[int]] = [[] for _ in range(ranks)]
    for i in sorted(range(len(flops)), key=lambda i: (-flops[i], i)):
        r = min((r for r in range(ranks) if len(out[r]) < per_rank), key=lambda r: (loads[r], r))
        out[r].append(i)
        loads[r] += flops[i]
    return [sorted(rows) for rows in out]
