"""The loader the trainer iterates: packed, FLOP-balanced, resumable micro-batches for one dp rank.

    loader = PackedLoader(cfg, dp_rank, dp_size)
    loader.load_state_dict(saved)        # optional: resume exactly (same dp size)
    loader.load_state_dicts(all_saved)   # or: every old dp rank's state; also works after a dp size change
    for batch in loader: ...             # PackedBatch, infinite
    state = loader.state_dict()          # after the last batch taken; JSON-able

State is captured at micro-batch boundaries: the sample-order state at (or before) the oldest sample still in the
packer buffer, the packer buffer itself (positions and sizes), the next position and the bad-sample counts.
Resuming replays the sample order from that snapshot (integers only), re-runs the cheap stage 1 for the buffered
positions, and continues: the resumed run yields exactly the micro-batches of an uninterrupted one.
With another dp size, `load_state_dicts` continues the stream from all old ranks' states (see elastic.py).
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch.utils.data

from mllm.data.badsamples import BadSampleCounter
from mllm.data.batch import PackedBatch, SampleTensors, build_batch
from mllm.data.config import DataConfig
from mllm.data.conversation import Rejected
from mllm.data.elastic import STATE_VERSION, elastic_state, states_by_dp_rank
from mllm.data.packing import FlopModel, Packer, row_level
from mllm.data.pipeline import (
    SampleProcessor,
    Stage1Dataset,
    Stage1Result,
    identity,
    load_tokenizer,
    stage1_stream,
)
from mllm.data.sampling import SampleOrder
from mllm.data.sources import open_sources

log = logging.getLogger("mllm.data")

SNAPSHOT_EVERY = 64  # positions between sample-order snapshots (bounds the replay on resume)
# Config fields that must match for a saved state to be meaningful.
FINGERPRINT_FIELDS = (
    "path",
    "seed",
    "seq_len",
    "micro_batch_size",
    "shuffle_buffer",
    "pack_buffer",
    "template",
)


class PackedLoader:
    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1) -> None:
        cfg.validate()
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.cfg, self.rank, self.world = cfg, dp_rank, dp_size
        self.sources = open_sources(cfg.path)
        self.processor = SampleProcessor(cfg, self.sources, dp_rank)
        tok = load_tokenizer(cfg.tokenizer)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        self.flops = FlopModel(
            cfg.llm_flops_per_token, cfg.llm_attn_flops_per_token_pair, cfg.vit_flops_per_tile
        )
        self._resume: dict | None = None
        self._last_state: dict | None = None
        self._running = False
        self._executor: ThreadPoolExecutor | None = None
        self._stream = None
        self.bad_samples = BadSampleCounter(cfg.max_bad_fraction, cfg.min_samples_for_bad_check)
        self.elastic_summary = None  # set by load_state_dicts after a dp size change

    # ---- public API -------------------------------------------------------------------------------------
    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> PackedBatch:
        if not self._running:
            self._start(self._resume)
        while len(self._pending) <= max(0, self.cfg.prefetch_batches):
            self._pending.append(self._submit(*self._plan_batch()))
        rows, futures, state = self._pending.popleft()
        batch = self._assemble(rows, futures)
        state["decode_bad"] = self._decode_bad.state_dict()
        state["batches"] = self._batches = self._batches + 1
        self._last_state = state
        self.bad_samples = self._merged_bad(state)
        self.bad_samples.check()
        return batch

    def state_dict(self) -> dict:
        """JSON-able state after the last micro-batch taken (or the loaded / initial state)."""
        if self._last_state is not None:
            return _copy(self._last_state)
        return _copy(self._resume) if self._resume is not None else self._initial_state()

    def load_state_dict(self, state: dict) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(
                f"loader state version {state.get('version')} != {STATE_VERSION}; restart the data stream"
            )
        expected = self._fingerprint()
        if state["fingerprint"] != expected:
            diff = {
                k: (state["fingerprint"].get(k), v)
                for k, v in expected.items()
                if state["fingerprint"].get(k) != v
            }
            raise ValueError(
                f"loader state does not match this run (saved, now): {diff}; resume with the same data config "
                "(after a dp size change pass every dp rank's state to load_state_dicts)"
            )
        self.close()
        self._resume = _copy(state)
        self._last_state = None
        self.bad_samples = self._merged_bad(state)

    def load_state_dicts(self, states: Sequence[dict]) -> None:
        """Resume from the states saved by every dp rank of a checkpoint (any order; copies from tp/pp peers
        are fine). Same dp size: exactly this rank's state. Another dp size: the data stream continues where the
        old ranks were, together, and logs how many buffered samples are read again (see elastic.py)."""
        old = states_by_dp_rank(states, self._fingerprint())
        if len(old) == self.world:
            self.load_state_dict(old[self.rank])
            return
        state, summary = elastic_state(
            self.cfg, self.sources, old, self._fingerprint(), self._new_packer().state_dict()
        )
        if self.rank == 0:
            log.info(
                "data stream resumed with dp %d -> %d: %d samples re-read (they were in packer buffers), "
                "%d untrained samples of the interrupted epochs go first",
                summary.old_dp,
                summary.new_dp,
                summary.reread,
                summary.remaining,
            )
        self.elastic_summary = summary
        self.load_state_dict(state)

    def metrics(self) -> dict[str, float]:
        return self.bad_samples.metrics()

    def close(self) -> None:
        self._stream = None  # drops the DataLoader iterator, which shuts its workers down
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        self._running = False

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ---- state --------------------------------------------------------------------------------------------
    def _fingerprint(self) -> dict:
        fp = {k: getattr(self.cfg, k) for k in FINGERPRINT_FIELDS}
        fp.update(dp_rank=self.rank, dp_size=self.world)
        return fp

    def _initial_state(self) -> dict:
        order = SampleOrder(self.sources, self.cfg.seed, self.rank, self.world, self.cfg.shuffle_buffer)
        counter = BadSampleCounter()
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "k_next": 0,
            "order": order.state_dict(),
            "packer": self._new_packer().state_dict(),
            "plan_bad": counter.state_dict(),
            "decode_bad": counter.state_dict(),
            "batches": 0,
        }

    def _new_packer(self) -> Packer:
        cfg = self.cfg
        return Packer(cfg.seq_len, cfg.max_tiles_per_row, self.flops, buffer_size=cfg.pack_buffer)

    def _merged_bad(self, state: dict) -> BadSampleCounter:
        merged = BadSampleCounter(self.cfg.max_bad_fraction, self.cfg.min_samples_for_bad_check)
        merged.load_state_dict(state["plan_bad"])
        decode = state["decode_bad"]
        for dataset, counts in decode["bad"].items():
            merged.bad.setdefault(dataset, type(merged.seen)()).update(counts)
        for dataset, example in decode["examples"].items():
            merged.examples.setdefault(dataset, example)
        return merged

    def _capture(self) -> dict:
        k_min = min(self.packer.pos, default=self.k_next)
        while len(self._snapshots) > 1 and self._snapshots[1]["k"] <= k_min:
            self._snapshots.popleft()
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "k_next": self.k_next,
            "order": _copy(self._snapshots[0]),
            "packer": self.packer.state_dict(),
            "plan_bad": self._plan_bad.state_dict(),
        }

    # ---- pipeline -----------------------------------------------------------------------------------------
    def _start(self, state: dict | None) -> None:
        state = state or self._initial_state()
        cfg = self.cfg
        self.k_next = int(state["k_next"])
        self._batches = int(state["batches"])
        self.packer = self._new_packer()
        self.packer.load_state_dict(state["packer"])
        self._plan_bad = BadSampleCounter()
        self._plan_bad.load_state_dict(state["plan_bad"])
        self._decode_bad = BadSampleCounter()
        self._decode_bad.load_state_dict(state["decode_bad"])
        self.order = SampleOrder(self.sources, cfg.seed, self.rank, self.world, cfg.shuffle_buffer)
        self.order.load_state_dict(state["order"])
        self._snapshots = deque([self.order.state_dict()])
        self._store: dict[int, Stage1Result] = {}
        self._pending: deque = deque()
        args = (
            self.sources,
            cfg,
            self.rank,
            self.world,
            state["order"],
            frozenset(self.packer.pos),
            self.k_next,
        )
        if cfg.num_workers > 0:
            loader = torch.utils.data.DataLoader(
                Stage1Dataset(*args),
                batch_size=None,
                num_workers=cfg.num_workers,
                collate_fn=identity,
                prefetch_factor=16,
            )
            self._stream = iter(loader)
        else:
            self._stream = stage1_stream(*args)
        if cfg.decode_threads > 0:
            self._executor = ThreadPoolExecutor(cfg.decode_threads, thread_name_prefix="mllm-decode")
        self._running = True

    def _consume_one(self) -> None:
        if self.order.k % SNAPSHOT_EVERY == 0 and self.order.k > self._snapshots[-1]["k"]:
            self._snapshots.append(self.order.state_dict())
        k, _ = self.order.next()  # lockstep copy of the workers' order, for snapshots
        item: Stage1Result = next(self._stream)
        if item.pos != k:
            raise RuntimeError(f"loader workers out of order: got position {item.pos}, expected {k}")
        if item.skip:
            return
        if k < self.k_next:  # resume: refill the packer buffer
            self._store[k] = item
            return
        self.k_next = k + 1
        if item.reason is not None:
            self._plan_bad.record_bad(item.dataset, item.reason, item.key, item.detail)
            return
        self._plan_bad.record_ok(item.dataset)
        if item.truncated:
            self._plan_bad.record_truncated(item.dataset)
        self._store[k] = item
        self.packer.add(k, item.tokens, item.tiles)

    def _plan_batch(self) -> tuple[list[list[Stage1Result]], dict]:
        rows = []
        for _ in range(self.cfg.micro_batch_size):
            while not self.packer.ready():
                self._consume_one()
            positions = self.packer.pop_row(row_level(self.packer.rows_emitted))
            rows.append([self._store.pop(p) for p in positions])
        return rows, self._capture()

    def _submit(self, rows: list[list[Stage1Result]], state: dict) -> tuple:
        if self._executor is None:
            futures = [[_done(self._decode, item) for item in row] for row in rows]
        else:
            futures = [[self._executor.submit(self._decode, item) for item in row] for row in rows]
        return rows, futures, state

    def _decode(self, item: Stage1Result):
        try:
            return self.processor.stage2(item)
        except Rejected as e:
            return e

    def _assemble(self, rows: list[list[Stage1Result]], futures: list[list[Future]]) -> PackedBatch:
        out_rows = []
        for row, row_futures in zip(rows, futures):
            out = []
            for item, fut in zip(row, row_futures):
                tiles = fut.result()
                if isinstance(tiles, Rejected):  # the sample leaves its row; the row keeps the rest
                    self._decode_bad.record_bad(
                        item.dataset, tiles.reason, item.key, tiles.detail, count_seen=False
                    )
                    continue
                out.append(SampleTensors(item.key, item.input_ids, item.targets, tiles))
            out_rows.append(out)
        return build_batch(out_rows, self.cfg.seq_len, self.pad_id, self.cfg.tile_size)


def build_loader(
    cfg: DataConfig,
    dp_rank: int = 0,
    dp_size: int = 1,
    state: dict | None = None,
    all_states: Sequence[dict] | None = None,
) -> PackedLoader:
    """A loader for one dp rank; `state` (from `state_dict()`) resumes it exactly; `all_states` (every old dp
    rank's state) resumes it with the same or another dp size."""
    loader = PackedLoader(cfg, dp_rank, dp_size)
    if state is not None and all_states is not None:
        raise ValueError("build_loader: pass state or all_states, not both")
    if state is not None:
        loader.load_state_dict(state)
    if all_states is not None:
        loader.load_state_dicts(all_states)
    return loader


def _done(fn, *args) -> Future:
    fut: Future = Future()
    fut.set_result(fn(*args))
    return fut


def _copy(state: dict | None) -> dict | None:
    return copy.deepcopy(state)
