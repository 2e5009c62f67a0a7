"""The global sample order: InternVL's epochs over the concatenation of datasets, mixed, with a shuffle buffer.

There is one order for the whole run, the same on every rank of every layout (no dp rank enters it): the global
batch of step N is a function of (seed, data) only, and ranks split the packed rows afterwards (loader.py).

Semantics (InternVL's `build_datasets` + `LazySupervisedDataset`): a dataset with `repeat_time` r < 1 keeps its
first int(n * r) annotation lines (the subset is cut in sources.py), an integer r > 1 repeats its lines r times;
an epoch is every item of the concatenation exactly once. Within an epoch the datasets are interleaved uniformly at
random (each pull draws dataset d with probability remaining_d / remaining, a random interleaving of the
concatenation), each dataset's pass streams its units (shards) in a seeded random order, and a shuffle buffer
mixes locally. With `use_data_resampling` datasets are drawn with weights sqrt(items per epoch) instead, each
cycling its own passes (InternVL's weighted mode); an "epoch" is then as many pulls as the concatenation holds.

Everything works on integer references `(dataset, pass, seq)`, so the order is cheap, identical in every loader
worker, and its state (counters + buffer references) fits a checkpoint. Randomness is counter-based (a hash of
seed and a counter): there is no RNG object to save.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence

import numpy as np

from mllm.data.sources import RawSample, Source

Ref = tuple[int, int, int]  # (dataset index, pass over the dataset's lines, seq within that pass)
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
    """One pass over a dataset's units in a seeded random unit order: seq -> (unit, index in unit)."""

    def __init__(self, counts: Sequence[int], seed: int, dataset: int, epoch: int):
        self.units = np.random.default_rng([seed, dataset, epoch]).permutation(len(counts)).tolist()
        self.starts = np.cumsum([0] + [counts[u] for u in self.units]).tolist()
        self.length = self.starts[-1]

    def locate(self, seq: int) -> tuple[int, int]:
        pos = bisect.bisect_right(self.starts, seq) - 1
        return self.units[pos], seq - self.starts[pos]


def epoch_items(source: Source) -> int:
    """Items of one dataset in one epoch of the concatenation: its (subset) lines times its repeats."""
    return source.length * source.repeats


class SampleOrder:
    """The run's stream of references; `next()` returns (position, ref), or None once `epochs` are done."""

    def __init__(
        self,
        sources: Sequence[Source],
        seed: int,
        shuffle_buffer: int,
        resample: bool = False,
        epochs: int | None = None,
    ) -> None:
        self.lengths = [s.length for s in sources]
        self.counts = [list(s.unit_counts) for s in sources]
        self.per_epoch = [epoch_items(s) for s in sources]
        self.epoch_size = sum(self.per_epoch)
        self.resample = resample
        weights = np.sqrt(np.asarray(self.per_epoch, dtype=np.float64))
        self.cum_weights = (np.cumsum(weights) / weights.sum()).tolist()
        self.seed = seed
        self.buffer_size = max(1, shuffle_buffer)
        self.total_pulls = None if epochs is None else epochs * self.epoch_size
        self.k = 0  # next position to emit
        self.pulls = 0  # references pulled from the mixed stream
        self.drawn = [0 for _ in sources]  # references drawn from each dataset so far
        self.buffer: list[Ref] = []
        self._plans: dict[tuple[int, int], EpochPlan] = {}

    @property
    def epoch(self) -> int:
        """The epoch of the concatenation the next pull belongs to."""
        return self.pulls // self.epoch_size

    def plan(self, dataset: int, epoch: int) -> EpochPlan:
        key = (dataset, epoch)
        if key not in self._plans:
            if len(self._plans) >= 64:  # few live passes
                self._plans.clear()
            self._plans[key] = EpochPlan(self.counts[dataset], self.seed, dataset, epoch)
        return self._plans[key]

    def next_ref(self, d: int) -> Ref:
        """The reference the next draw from dataset d yields."""
        n = self.drawn[d]
        return (d, n // self.lengths[d], n % self.lengths[d])

    def _choose(self) -> int:
        u = hash_uniform(self.seed, self.pulls, 1)
        if self.resample:
            return min(bisect.bisect_right(self.cum_weights, u), len(self.cum_weights) - 1)
        epoch = self.epoch
        remaining = [(epoch + 1) * n - k for n, k in zip(self.per_epoch, self.drawn)]
        target = math.floor(u * sum(remaining))
        for d, r in enumerate(remaining):
            if target < r:
                return d
            target -= r
        raise AssertionError("unreachable: the epoch has items left")

    def _pull(self) -> Ref | None:
        if self.total_pulls is not None and self.pulls >= self.total_pulls:
            return None
        d = self._choose()
        ref = self.next_ref(d)
        self.drawn[d] += 1
        self.pulls += 1
        return ref

    def next(self) -> tuple[int, Ref] | None:
        while len(self.buffer) < self.buffer_size:
            ref = self._pull()
            if ref is None:
                break
            self.buffer.append(ref)
        if not self.buffer:
            return None
        j = int(hash_uniform(self.seed, self.k, 2) * len(self.buffer))
        ref = self.buffer[j]
        nxt = self._pull()
        if nxt is None:
            self.buffer.pop(j)
        else:
            self.buffer[j] = nxt
        k = self.k
        self.k += 1
        return k, ref

    def state_dict(self) -> dict:
        return {
            "k": self.k,
            "pulls": self.pulls,
            "drawn": list(self.drawn),
            "buffer": [list(r) for r in self.buffer],
        }

    def load_state_dict(self, state: dict) -> None:
        self.k, self.pulls = int(state["k"]), int(state["pulls"])
        self.drawn = [int(x) for x in state["drawn"]]
        self.buffer = [tuple(r) for r in state["buffer"]]
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
        # Per dataset: the (pass, seq) of the next record the open stream yields, and that stream.
        self.pos: list[tuple[int, int]] = [(0, 0) for _ in sources]
        self.streams: list = [None for _ in sources]

    def start_at_pending(self) -> None:
        """After loading an order state: start each dataset's stream at its earliest pending reference."""
        for d in range(len(self.sources)):
            pending = [(e, s) for dd, e, s in self.order.buffer if dd == d] + [self.order.next_ref(d)[1:]]
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
