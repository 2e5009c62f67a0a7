"""The per-rank sample order: units split by dp rank, weighted mixing of datasets, seeded shuffle buffer.

Everything here works on small integer references `(dataset, epoch, seq)`, so the order is cheap to compute,
identical in every loader worker, and its state (cursors + buffer references) fits a checkpoint. Randomness is
counter-based (a hash of seed, rank and a counter), so there is no RNG object to save.

After a resume with another dp size (elastic.py) a dataset's interrupted epochs continue as one "remainder" epoch:
a `RemainderPlan` listing this rank's share of the not-yet-trained samples as pieces of the old ranks' plans.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mllm.data.sources import RawSample, Source

Ref = tuple[int, int, int]  # (dataset index, epoch, seq within this rank's epoch of that dataset)
MASK64 = (1 << 64) - 1


def hash_uniform(*keys: int) -> float:
    """A deterministic uniform [0, 1) from integer keys (splitmix64 chain)."""
    x = 0x9E3779B97F4A7C15
    for k in keys:
        x = (x ^ (k & MASK64)) * 0xBF58476D1CE4E5B9 & MASK64
        x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK64
        x ^= x >> 31
    return (x >> 11) / float(1 << 53)


class EpochPlan:
    """Which (unit, index) this rank reads at each seq of one epoch of one dataset."""

    def __init__(self, counts: Sequence[int], seed: int, dataset: int, epoch: int, rank: int, world: int):
        perm = np.random.default_rng([seed, dataset, epoch]).permutation(len(counts)).tolist()
        mine = perm[rank::world]
        if len(counts) >= world and sum(counts[u] for u in mine) > 0:
            # Enough units: whole shards per rank, so each rank streams only its own shards.
            self.units, self.offset, self.stride = mine, 0, 1
            self.length = sum(counts[u] for u in mine)
        else:
            # Few units (small dataset): every rank reads all of them and keeps every world-th sample.
            total = sum(counts)
            self.units, self.stride = perm, world
            self.offset = rank if rank < total else rank % total
            self.length = max(1, (total - self.offset + world - 1) // world)
        self.starts = np.cumsum([0] + [counts[u] for u in self.units]).tolist()

    def locate(self, seq: int) -> tuple[int, int]:
        g = self.offset + seq * self.stride
        pos = bisect.bisect_right(self.starts, g) - 1
        return self.units[pos], g - self.starts[pos]


@dataclass(frozen=True)
class Piece:
    """Items of the base plan EpochPlan(epoch, rank, world): the explicit seqs, then the seqs in [start, end)."""

    epoch: int
    world: int
    rank: int
    seqs: tuple[int, ...] = ()
    start: int = 0
    end: int = 0

    def __len__(self) -> int:
        return len(self.seqs) + self.end - self.start

    def seq(self, i: int) -> int:
        n = len(self.seqs)
        return self.seqs[i] if i < n else self.start + i - n

    def slice(self, a: int, b: int) -> Piece:
        """Items [a, b) of this piece, as a piece of the same base plan."""
        n = len(self.seqs)
        lo, hi = self.start + max(a - n, 0), self.start + max(b - n, 0)
        return Piece(self.epoch, self.world, self.rank, self.seqs[a:b], lo, hi)

    def same_base(self, other: Piece) -> bool:
        return (self.epoch, self.world, self.rank) == (other.epoch, other.world, other.rank)

    def to_json(self) -> list:
        return [self.epoch, self.world, self.rank, list(self.seqs), self.start, self.end]

    @classmethod
    def from_json(cls, x: list) -> Piece:
        return cls(int(x[0]), int(x[1]), int(x[2]), tuple(int(s) for s in x[3]), int(x[4]), int(x[5]))


def slice_pieces(pieces: Sequence[Piece], a: int, b: int) -> list[Piece]:
    """Items [a, b) of the concatenation of pieces."""
    out, offset = [], 0
    for p in pieces:
        n = len(p)
        if offset + n > a and offset < b:
            out.append(p.slice(max(a - offset, 0), min(b - offset, n)))
        offset += n
    return compact(out)


def compact(pieces: Sequence[Piece]) -> list[Piece]:
    """Drop empty pieces and join neighbours of one base plan (explicit items then a range, or two ranges)."""
    out: list[Piece] = []
    for p in pieces:
        if len(p) == 0:
            continue
        last = out[-1] if out else None
        if last is not None and last.same_base(p) and last.start == last.end:
            out[-1] = Piece(p.epoch, p.world, p.rank, last.seqs + p.seqs, p.start, p.end)
        elif last is not None and last.same_base(p) and not p.seqs and last.end == p.start:
            out[-1] = Piece(p.epoch, p.world, p.rank, last.seqs, last.start, p.end)
        else:
            out.append(p)
    return out


class RemainderPlan:
    """A rank's share of a dataset's interrupted epochs after a dp change: pieces of the old ranks' plans."""

    def __init__(self, counts: Sequence[int], seed: int, dataset: int, pieces: Sequence[Piece]) -> None:
        self.counts, self.seed, self.dataset = counts, seed, dataset
        self.pieces = list(pieces)
        self.starts = np.cumsum([0] + [len(p) for p in self.pieces]).tolist()
        self.length = self.starts[-1]
        self._bases: dict[tuple[int, int, int], EpochPlan] = {}

    def origin(self, seq: int) -> tuple[int, int, int]:
        """(original epoch, unit, index in unit) of the seq-th item."""
        i = bisect.bisect_right(self.starts, seq) - 1
        p = self.pieces[i]
        key = (p.epoch, p.rank, p.world)
        if key not in self._bases:
            self._bases[key] = EpochPlan(self.counts, self.seed, self.dataset, *key)
        return (p.epoch, *self._bases[key].locate(p.seq(seq - self.starts[i])))

    def locate(self, seq: int) -> tuple[int, int]:
        return self.origin(seq)[1:]


class SampleOrder:
    """Infinite stream of references for one dp rank; `next()` returns (position, ref)."""

    def __init__(
        self, sources: Sequence[Source], seed: int, rank: int, world: int, shuffle_buffer: int
    ) -> None:
        self.counts = [list(s.unit_counts) for s in sources]
        weights = np.asarray([s.weight for s in sources], dtype=np.float64)
        self.cum_weights = (np.cumsum(weights) / weights.sum()).tolist()
        self.seed, self.rank, self.world = seed, rank, world
        self.buffer_size = max(1, shuffle_buffer)
        self.k = 0  # next position to emit
        self.pulls = 0  # references pulled from the mixed stream
        self.cursors = [(0, 0) for _ in sources]  # next (epoch, seq) per dataset
        self.buffer: list[Ref] = []
        # Per dataset, after an elastic resume: (epoch label, pieces) of the interrupted epochs, else None.
        self.remainder: list[tuple[int, list[Piece]] | None] = [None for _ in sources]
        self._plans: dict[tuple[int, int], EpochPlan | RemainderPlan] = {}

    def plan(self, dataset: int, epoch: int) -> EpochPlan | RemainderPlan:
        key = (dataset, epoch)
        if key not in self._plans:
            if len(self._plans) >= 64:  # few live epochs
                self._plans.clear()
            rem = self.remainder[dataset]
            if rem is not None and rem[0] == epoch:
                self._plans[key] = RemainderPlan(self.counts[dataset], self.seed, dataset, rem[1])
            else:
                self._plans[key] = EpochPlan(
                    self.counts[dataset], self.seed, dataset, epoch, self.rank, self.world
                )
        return self._plans[key]

    def _pull(self) -> Ref:
        u = hash_uniform(self.seed, self.rank, self.pulls, 1)
        self.pulls += 1
        d = min(bisect.bisect_right(self.cum_weights, u), len(self.cum_weights) - 1)
        epoch, seq = self.cursors[d]
        nxt = seq + 1
        self.cursors[d] = (epoch, nxt) if nxt < self.plan(d, epoch).length else (epoch + 1, 0)
        return (d, epoch, seq)

    def next(self) -> tuple[int, Ref]:
        while len(self.buffer) < self.buffer_size:
            self.buffer.append(self._pull())
        j = int(hash_uniform(self.seed, self.rank, self.k, 2) * len(self.buffer))
        ref = self.buffer[j]
        self.buffer[j] = self._pull()
        k = self.k
        self.k += 1
        return k, ref

    def state_dict(self) -> dict:
        state = {
            "k": self.k,
            "pulls": self.pulls,
            "cursors": [list(c) for c in self.cursors],
            "buffer": [list(r) for r in self.buffer],
        }
        if any(r is not None for r in self.remainder):
            state["remainder"] = [
                None if r is None else {"epoch": r[0], "pieces": [p.to_json() for p in r[1]]}
                for r in self.remainder
            ]
        return state

    def load_state_dict(self, state: dict) -> None:
        self.k, self.pulls = int(state["k"]), int(state["pulls"])
        self.cursors = [tuple(c) for c in state["cursors"]]
        self.buffer = [tuple(r) for r in state["buffer"]]
        remainder = state.get("remainder") or [None] * len(self.counts)
        self.remainder = [
            None if r is None else (int(r["epoch"]), [Piece.from_json(p) for p in r["pieces"]])
            for r in remainder
        ]
        self._plans.clear()


class Fetcher:
    """Reads the samples of references by streaming each dataset's units forward.

    Records read but not yet requested are cached only while the order still holds them (its shuffle buffer),
    so the cache is bounded by the shuffle buffer. Positions owned by other workers are `forget`-ed.
    """

    def __init__(self, sources: Sequence[Source], order: SampleOrder) -> None:
        self.sources = sources
        self.order = order
        self.cache: dict[Ref, RawSample] = {}
        # Per dataset: the (epoch, seq) of the next record the open stream yields, and that stream.
        self.pos: list[tuple[int, int]] = [(0, 0) for _ in sources]
        self.streams: list = [None for _ in sources]

    def start_at_pending(self) -> None:
        """After loading an order state: start each dataset's stream at its earliest pending reference."""
        for d in range(len(self.sources)):
            pending = [(e, s) for dd, e, s in self.order.buffer if dd == d] + [self.order.cursors[d]]
            self._reopen(d, min(pending))

    def forget(self, ref: Ref) -> None:
        self.cache.pop(ref, None)

    def get(self, ref: Ref) -> RawSample:
        if ref in self.cache:
            return self.cache.pop(ref)
        d, epoch, seq = ref
        if (epoch, seq) < self.pos[d]:
            self._reopen(d, (epoch, seq))
        pending = set(self.order.buffer)
        while self.pos[d] <= (epoch, seq):
            here = (d, *self.pos[d])
            sample = self._read_next(d)
            if here == ref:
                return sample
            if here in pending:
                self.cache[here] = sample
        raise AssertionError("unreachable")

    def _reopen(self, d: int, at: tuple[int, int]) -> None:
        self.pos[d] = at
        self.streams[d] = None

    def _read_next(self, d: int) -> RawSample:
        """The record at self.pos[d], then advance; a record missing from its unit is an explicit error."""
        epoch, seq = self.pos[d]
        plan = self.order.plan(d, epoch)
        unit, idx = plan.locate(seq)
        self.pos[d] = (epoch, seq + 1) if seq + 1 < plan.length else (epoch + 1, 0)
        stream = self.streams[d]
        if stream is None or stream[0] != (epoch, unit) or stream[2] > idx:
            stream = [(epoch, unit), self.sources[d].read_unit(unit), -1, None]
            self.streams[d] = stream
        while stream[2] < idx:
            item = next(stream[1], None)
            if item is None:
                stream[2] = 1 << 62  # exhausted: every later index of this unit is missing
                break
            stream[2], stream[3] = item
        if stream[2] == idx:
            return stream[3]
        name = self.sources[d].name
        return RawSample(
            name,
            f"{name}:unit{unit}#{idx}",
            error=("unreadable_shard", f"sample {idx} of unit {unit} missing"),
        )
