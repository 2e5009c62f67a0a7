"""Resume the data stream with another dp size: the old ranks' states -> one new rank's loader state.

Each old rank's state says exactly which samples it trained: positions before `k_next` of its sample order, minus
those still waiting in its packer buffer. Everything else it had pulled (shuffle buffer, packer buffer) and the rest
of its share of every epoch up to the newest one any old rank started is "unconsumed". Per dataset, the new ranks
first stream the unconsumed samples (the remainder, split into contiguous chunks so ranks keep reading whole
shards), then fresh epochs split for the new dp size. So no sample of an interrupted epoch is skipped or trained
twice; the only re-reads are the samples that sat in packer buffers (read, not yet trained) at the checkpoint.

The result is a plain loader state of the new layout (its sample order carries the remainder as pieces of the old
plans), so a later resume with the same dp size is exact again, and a further dp change works the same way.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from mllm.data.badsamples import BadSampleCounter
from mllm.data.config import DataConfig
from mllm.data.sampling import Piece, Ref, RemainderPlan, SampleOrder, compact, slice_pieces
from mllm.data.sources import Source

STATE_VERSION = 1  # of the loader state (loader.py)
DP_FIELDS = ("dp_rank", "dp_size")


@dataclass
class ElasticSummary:
    old_dp: int
    new_dp: int
    reread: int  # samples read into a packer buffer before the checkpoint but not trained: read again
    remaining: int  # samples of the interrupted epochs streamed before fresh epochs start (all new ranks)


def states_by_dp_rank(states: Sequence[dict], expected_fingerprint: dict) -> list[dict]:
    """The saved states indexed by their dp rank (duplicates from tp/pp peers dropped); one-line errors."""
    by_rank: dict[int, dict] = {}
    sizes = set()
    for state in states:
        if state.get("version") != STATE_VERSION or "fingerprint" not in state:
            raise ValueError(
                f"loader state version {state.get('version')} != {STATE_VERSION}; restart the data stream (no data state)"
            )
        fp = state["fingerprint"]
        diff = {
            k: (fp.get(k), v)
            for k, v in expected_fingerprint.items()
            if k not in DP_FIELDS and fp.get(k) != v
        }
        if diff:
            raise ValueError(
                f"loader state does not match this run (saved, now): {diff}; resume with the same data config"
            )
        sizes.add(int(fp["dp_size"]))
        by_rank.setdefault(int(fp["dp_rank"]), state)
    if len(sizes) != 1:
        raise ValueError(
            f"loader states come from different dp sizes {sorted(sizes)}; pass one checkpoint's states"
        )
    (old_dp,) = sizes
    missing = sorted(set(range(old_dp)) - set(by_rank))
    if missing:
        raise ValueError(
            f"loader states of dp ranks {missing} (of dp size {old_dp}) are missing; pass every dp rank's state"
        )
    return [by_rank[r] for r in range(old_dp)]


@dataclass
class _OldRank:
    order: SampleOrder  # at k_next: cursors and shuffle buffer are what it had pulled
    waiting: list[Ref]  # refs still in its packer buffer (read, not trained)


def _replay(cfg: DataConfig, sources: Sequence[Source], rank: int, world: int, state: dict) -> _OldRank:
    order = SampleOrder(sources, cfg.seed, rank, world, cfg.shuffle_buffer)
    order.load_state_dict(state["order"])
    buffered = set(state["packer"]["pos"])
    waiting = []
    while order.k < int(state["k_next"]):
        k, ref = order.next()
        if k in buffered:
            waiting.append(ref)
    return _OldRank(order, waiting)


def _last_label(order: SampleOrder, d: int) -> int:
    """The newest epoch label this rank pulled from for dataset d (-1: none)."""
    epoch, seq = order.cursors[d]
    return epoch if seq > 0 else epoch - 1


def _base_pieces(old: _OldRank, d: int, epoch: int) -> list[Piece]:
    plan = old.order.plan(d, epoch)
    if isinstance(plan, RemainderPlan):
        return plan.pieces
    return [Piece(epoch, old.order.world, old.order.rank, (), 0, plan.length)]


def _unconsumed(old: _OldRank, d: int, epoch: int) -> list[Piece]:
    """The items of this rank's plan (d, epoch) it has not trained: pulled-but-waiting ones, then the unpulled."""
    waiting = sorted(s for dd, e, s in old.order.buffer + old.waiting if dd == d and e == epoch)
    c_epoch, c_seq = old.order.cursors[d]
    if epoch < c_epoch and not waiting:
        return []
    base = _base_pieces(old, d, epoch)
    length = sum(len(p) for p in base)
    start = c_seq if epoch == c_epoch else (0 if epoch > c_epoch else length)
    return compact([_single(base, s) for s in waiting] + slice_pieces(base, start, length))


def _single(pieces: Sequence[Piece], i: int) -> Piece:
    """Item i as an explicit one-item piece (neighbours of one base plan then join into one explicit list)."""
    (p,) = slice_pieces(pieces, i, i + 1)
    return Piece(p.epoch, p.world, p.rank, (p.seq(0),))


def _remainder(olds: Sequence[_OldRank], d: int) -> tuple[int, list[Piece]]:
    """(label, pieces): everything the old ranks left untrained of dataset d's epochs up to the newest started."""
    labels = [_last_label(o.order, d) for o in olds]
    labels += [o.order.remainder[d][0] for o in olds if o.order.remainder[d] is not None]
    newest = max(labels)
    oldest = min(
        [o.order.cursors[d][0] for o in olds]
        + [e for o in olds for dd, e, _ in o.order.buffer + o.waiting if dd == d]
    )
    pieces = [p for e in range(oldest, newest + 1) for o in olds for p in _unconsumed(o, d, e)]
    return newest, compact(pieces)


def elastic_order_state(
    olds: Sequence[_OldRank], sources: Sequence[Source], rank: int, world: int
) -> tuple[dict, int]:
    """The new rank's sample-order state (its chunk of every remainder first) and the remainder size."""
    cursors, remainder, total = [], [], 0
    for d in range(len(sources)):
        label, pieces = _remainder(olds, d)
        n = sum(len(p) for p in pieces)
        total += n
        mine = slice_pieces(pieces, rank * n // world, (rank + 1) * n // world)
        if label < 0:  # no old rank pulled from this dataset yet
            cursors.append([0, 0])
            remainder.append(None)
        else:
            cursors.append([label, 0] if mine else [label + 1, 0])
            remainder.append({"epoch": label, "pieces": [p.to_json() for p in mine]})
    state = {"k": 0, "pulls": 0, "cursors": cursors, "buffer": [], "remainder": remainder}
    return state, total


def _merged_counters(
    old_states: Sequence[dict], olds: Sequence[_OldRank], sources: Sequence[Source], rank: int, world: int
) -> tuple[dict, dict]:
    """Bad-sample counts of the old ranks r with r % world == rank (so the sum over ranks is kept); samples
    still in packer buffers are un-counted as seen, since they are read (and counted) again."""
    plan, decode = BadSampleCounter(), BadSampleCounter()
    for r, (state, old) in enumerate(zip(old_states, olds)):
        if r % world != rank:
            continue
        for target, key in ((plan, "plan_bad"), (decode, "decode_bad")):
            other = BadSampleCounter()
            other.load_state_dict(state[key])
            target.seen.update(other.seen)
            for dataset, counts in other.bad.items():
                target.bad.setdefault(dataset, Counter()).update(counts)
            for dataset, example in other.examples.items():
                target.examples.setdefault(dataset, example)
        plan.seen.subtract(Counter(sources[d].name for d, _, _ in old.waiting))
    return plan.state_dict(), decode.state_dict()


def elastic_state(
    cfg: DataConfig,
    sources: Sequence[Source],
    old_states: Sequence[dict],
    fingerprint: dict,
    initial_packer: dict,
) -> tuple[dict, ElasticSummary]:
    """The loader state of new dp rank fingerprint['dp_rank'] of fingerprint['dp_size'], from every old dp
    rank's state (indexed by old dp rank, see states_by_dp_rank)."""
    rank, world = int(fingerprint["dp_rank"]), int(fingerprint["dp_size"])
    old_world = len(old_states)
    olds = [_replay(cfg, sources, r, old_world, s) for r, s in enumerate(old_states)]
    order, remaining = elastic_order_state(olds, sources, rank, world)
    plan_bad, decode_bad = _merged_counters(old_states, olds, sources, rank, world)
    state = {
        "version": STATE_VERSION,
        "fingerprint": dict(fingerprint),
        "k_next": 0,
        "order": order,
        "packer": initial_packer,
        "plan_bad": plan_bad,
        "decode_bad": decode_bad,
        "batches": max(int(s["batches"]) for s in old_states),
    }
    reread = sum(len(o.waiting) for o in olds)
    return state, ElasticSummary(old_world, world, reread, remaining)
