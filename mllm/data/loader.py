"""The loader the trainer iterates: packed, FLOP-balanced, resumable micro-batches for one dp rank.

    loader = PackedLoader(cfg, dp_rank, dp_size, rows_per_step=G)
    loader.load_state_dict(saved)        # optional: resume exactly; a state saved under any layout
    for batch in loader: ...             # PackedBatch; infinite, or finite with epochs=E
    state = loader.state_dict()          # after the last batch taken; JSON-able

Layout invariance: every rank runs the same global sample order (sampling.py), the cheap stage 1 of every sample
(tokens, image sizes) and the same packer, so all ranks build the same packed rows. Step s's global batch is rows
[s*G, (s+1)*G); `assign_rows` deals them to the dp ranks and each rank decodes (stage 2) only its own rows. So the
samples of step s are the same for every tp/pp/dp layout, and the state at a step boundary is the same on every
rank: a checkpoint resumes exactly under any other layout.

State is captured per step: the sample-order state at (or before) the oldest sample still in the packer buffer,
the packer buffer itself (positions and sizes), the next position, the steps done and the bad-sample counts;
mid-step (between a step's micro-batches) also the micro-batches already taken. Resuming replays the sample order
from that snapshot (integers only), re-runs stage 1 for the buffered positions, and continues bit-identically.
"""

from __future__ import annotations

import copy
import logging
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch.utils.data

from mllm.data.badsamples import BadSampleCounter
from mllm.data.batch import PackedBatch, SampleTensors, build_batch
from mllm.data.config import DataConfig
from mllm.data.conversation import Rejected
from mllm.data.packing import FlopModel, Packer, assign_rows, row_level
from mllm.data.pipeline import (
    SampleProcessor,
    Stage1Dataset,
    Stage1Result,
    identity,
    load_tokenizer,
    sample_order,
    stage1_stream,
)
from mllm.data.sources import open_sources

log = logging.getLogger("mllm.data")

STATE_VERSION = 2  # 1: per-dp-rank streams
SNAPSHOT_EVERY = 64  # positions between sample-order snapshots (bounds the replay on resume)
# Config fields that must match for a saved state to be meaningful.
FINGERPRINT_FIELDS = (
    "path",
    "seed",
    "seq_len",
    "shuffle_buffer",
    "pack_buffer",
    "template",
    "use_data_resampling",
)
# A sample rejected while decoding: (stream position, dataset, reason, key, detail).
Rejection = tuple[int, str, str, str, str]


def local_only(rejections: list[Rejection]) -> list[Rejection]:
    return rejections


@dataclass(frozen=True)
class DecodeSplit:
    """Decoding shared by the `peers` ranks that train the same rows (one dp replica's tp and pp ranks): this
    rank decodes the micro-batch's samples i with i % peers == index, and `gather` (an all-gather over the peers,
    in the main thread) returns every peer's {sample index: tiles or Rejected}. So each image is decoded once
    per replica, and all peers drop the same rejected samples."""

    index: int
    peers: int
    gather: Callable[[dict], list[dict]]


@dataclass
class _Step:
    """One planned step: this rank's micro-batches (rows of stage-1 results, decode futures), the state before
    and after it (without bad-sample counts), the stage-1 outcomes consumed while planning it, and the ids of
    its whole global batch."""

    before: dict
    after: dict
    # (position, dataset, reason or None, key, detail, truncated) of each sample consumed
    outcomes: list[tuple[int, str, str | None, str, str, bool]]
    micro: list[tuple[list[list[Stage1Result]], list[list[Future]]]]
    samples: list[str]


class PackedLoader:
    def __init__(
        self,
        cfg: DataConfig,
        dp_rank: int = 0,
        dp_size: int = 1,
        rows_per_step: int | None = None,
        epochs: int | None = None,
        exchange: Callable[[list[Rejection]], list[Rejection]] = local_only,
        decode_split: DecodeSplit | None = None,
    ) -> None:
        """rows_per_step: packed rows per optimizer step over all dp ranks (default one micro-batch per rank);
        epochs: end the stream after this many epochs of the data; exchange: shares the step's decode-time
        rejections among all ranks (the trainer all-gathers them), so that every rank counts the same."""
        cfg.validate()
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        self.cfg, self.rank, self.world = cfg, dp_rank, dp_size
        self.rows_per_step = rows_per_step or cfg.micro_batch_size * dp_size
        if self.rows_per_step % (cfg.micro_batch_size * dp_size):
            raise ValueError(
                f"{self.rows_per_step} rows per step do not split into micro-batches of {cfg.micro_batch_size} "
                f"rows on {dp_size} dp ranks; make train.global_batch_size a multiple of micro_batch_size * dp"
            )
        self.micro_per_step = self.rows_per_step // (cfg.micro_batch_size * dp_size)
        self.epochs = epochs
        self.exchange = exchange
        self.decode_split = decode_split
        self.sources = open_sources(cfg.path)
        self.processor = SampleProcessor(cfg, self.sources)
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
        self.bad_samples = self._new_counter()
        self.last_step_samples: list[str] = []  # ids of the global batch of the last step taken completely

    # ---- public API -------------------------------------------------------------------------------------
    def __iter__(self) -> PackedLoader:
        return self

    def __next__(self) -> PackedBatch:
        if not self._running:
            self._start(self._resume)
        while len(self._pending) <= max(0, self.cfg.prefetch_batches) and not self._ended:
            self._plan_step()
        if not self._pending:
            raise StopIteration
        step, j = self._pending.popleft()
        rows, futures = step.micro[j]
        batch = self._assemble(rows, futures)
        if j + 1 < len(step.micro):
            self._last_state = {**step.before, "bad": self.bad_samples.state_dict(), "taken": j + 1}
            return batch
        self._finish_step(step)
        return batch

    @property
    def steps(self) -> int:
        """Optimizer steps whose micro-batches were all taken (the saved state's `steps`)."""
        return int(self.state_dict()["steps"])

    def state_dict(self) -> dict:
        """JSON-able state after the last micro-batch taken (or the loaded / initial state)."""
        if self._last_state is not None:
            return _copy(self._last_state)
        return _copy(self._resume) if self._resume is not None else self._initial_state()

    def load_state_dict(self, state: dict) -> None:
        """A state saved by any rank of any layout (at a step boundary; mid-step only with the same split)."""
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
                f"loader state does not match this run (saved, now): {diff}; resume with the same data config"
            )
        if state.get("taken", 0) and state["micro_per_step"] != self.micro_per_step:
            raise ValueError(
                "loader state was saved in the middle of a step with another layout; resume from a state saved "
                "at a step boundary (every trainer checkpoint is)"
            )
        self.close()
        self._resume = _copy(state)
        self._last_state = None
        self.bad_samples = self._new_counter(state["bad"])

    def load_state_dicts(self, states: Sequence[dict]) -> None:
        """The states saved by every rank of a checkpoint (any layout, any order): at a step boundary they are
        all the same global state, so any one of them resumes exactly."""
        steps = {int(s.get("steps", -1)) for s in states}
        if len(steps) != 1:
            raise ValueError(
                f"loader states from different steps {sorted(steps)}; pass one checkpoint's states"
            )
        self.load_state_dict(states[0])

    def count_steps(self) -> int:
        """Optimizer steps in the whole (finite: `epochs`) stream, from a planning pass over all of it (stage 1
        only: tokens and image sizes, no decoding). The last step may hold fewer rows than `rows_per_step`."""
        if self.epochs is None:
            raise ValueError("count_steps needs a finite stream: give epochs")
        probe = PackedLoader(self.cfg, 0, 1, self.rows_per_step, self.epochs)
        probe._start(None)
        steps = 0
        while probe._plan_rows() is not None:
            steps += 1
        probe.close()
        return steps

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
        return {k: getattr(self.cfg, k) for k in FINGERPRINT_FIELDS}

    def _new_counter(self, state: dict | None = None) -> BadSampleCounter:
        cfg = self.cfg
        counter = BadSampleCounter(cfg.max_bad_fraction, cfg.min_samples_for_bad_check, cfg.bad_window)
        if state is not None:
            counter.load_state_dict(state)
        return counter

    def _initial_state(self) -> dict:
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "k_next": 0,
            "order": sample_order(self.sources, self.cfg, self.epochs).state_dict(),
            "packer": self._new_packer().state_dict(),
            "steps": 0,
            "micro_per_step": self.micro_per_step,
            "bad": BadSampleCounter().state_dict(),
        }

    def _new_packer(self) -> Packer:
        cfg = self.cfg
        return Packer(
            cfg.seq_len,
            cfg.max_tiles_per_row,
            self.flops,
            buffer_size=cfg.pack_buffer,
            tiles_per_row=cfg.tiles_per_row,
        )

    def _capture(self) -> dict:
        """The state after the rows planned so far (bad-sample counts are added when the step is taken)."""
        k_min = min(self.packer.pos, default=self.k_next)
        while len(self._snapshots) > 1 and self._snapshots[1]["k"] <= k_min:
            self._snapshots.popleft()
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint(),
            "k_next": self.k_next,
            "order": _copy(self._snapshots[0]),
            "packer": self.packer.state_dict(),
            "steps": self._planned,
            "micro_per_step": self.micro_per_step,
        }

    # ---- pipeline -----------------------------------------------------------------------------------------
    def _start(self, state: dict | None) -> None:
        state = state or self._initial_state()
        cfg = self.cfg
        self.k_next = int(state["k_next"])
        self._planned = int(state["steps"])
        self._skip = int(state.get("taken", 0))  # micro-batches of the current step already trained
        self.packer = self._new_packer()
        self.packer.load_state_dict(state["packer"])
        self.order = sample_order(self.sources, cfg, self.epochs)
        self.order.load_state_dict(state["order"])
        self._snapshots = deque([self.order.state_dict()])
        self._store: dict[int, Stage1Result] = {}
        self._pending: deque = deque()
        self._rejections: list[Rejection] = []
        self._exhausted = False  # the order has ended (finite stream)
        self._ended = False  # ... and every row is planned
        self._before = {k: v for k, v in state.items() if k not in ("bad", "taken")}
        args = (
            self.sources,
            cfg,
            self.epochs,
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

    def _consume_one(self, outcomes: list) -> None:
        if self.order.k % SNAPSHOT_EVERY == 0 and self.order.k > self._snapshots[-1]["k"]:
            self._snapshots.append(self.order.state_dict())
        nxt = self.order.next()  # lockstep copy of the workers' order, for snapshots
        if nxt is None:
            self._exhausted = True
            return
        k, _ = nxt
        item: Stage1Result = next(self._stream)
        if item.pos != k:
            raise RuntimeError(f"loader workers out of order: got position {item.pos}, expected {k}")
        if item.skip:
            return
        if k < self.k_next:  # resume: refill the packer buffer
            self._store[k] = item
            return
        self.k_next = k + 1
        outcomes.append((k, item.dataset, item.reason, item.key, item.detail, item.truncated))
        if item.reason is None:
            self._store[k] = item
            self.packer.add(k, item.tokens, item.tiles)

    def _plan_rows(self) -> tuple[list[list[Stage1Result]], list] | None:
        """The next step's global rows (empty rows pad the last step of a finite stream) and the stage-1
        outcomes consumed for them; None once the stream is done."""
        outcomes: list = []
        rows = []
        for _ in range(self.rows_per_step):
            while not self.packer.ready() and not self._exhausted:
                self._consume_one(outcomes)
            # one FLOP level for all rows of a step, so any split of the step among dp ranks is balanced
            level = row_level(self.packer.rows_emitted // self.rows_per_step)
            positions = self.packer.pop_row(level) if len(self.packer) else []
            rows.append([self._store.pop(p) for p in positions])
        if not any(rows):
            self._ended = True
            return None
        self._planned += 1
        return rows, outcomes

    def _plan_step(self) -> None:
        planned = self._plan_rows()
        if planned is None:
            return
        rows, outcomes = planned
        flops = [sum(float(self.flops.sample(it.tokens, it.tiles)) for it in row) for row in rows]
        mine = [rows[i] for i in assign_rows(flops, self.world)[self.rank]]
        mbs = self.cfg.micro_batch_size
        skip, self._skip = self._skip, 0
        micro = []
        for j in range(self.micro_per_step):
            part = mine[j * mbs : (j + 1) * mbs]
            micro.append((part, None if j < skip else self._submit(part)))
        after = self._capture()
        samples = [it.key for row in rows for it in row]
        step = _Step(self._before, after, outcomes, micro, samples)
        self._before = after
        self._pending.extend((step, j) for j in range(skip, self.micro_per_step))

    def _finish_step(self, step: _Step) -> None:
        """The step's last micro-batch was taken: count its stage-1 outcomes and every rank's decode-time
        rejections (the same on all ranks), check the bad-sample rule, and move the state past it."""
        for pos, dataset, reason, key, detail, truncated in step.outcomes:
            if reason is None:
                self.bad_samples.record_ok(dataset, pos)
                if truncated:
                    self.bad_samples.record_truncated(dataset)
            else:
                self.bad_samples.record_bad(dataset, reason, key, detail, pos=pos)
        shared, self._rejections = self.exchange(self._rejections), []
        for pos, dataset, reason, key, detail in sorted(set(shared)):
            self.bad_samples.record_bad(dataset, reason, key, detail, count_seen=False, pos=pos)
        self.last_step_samples = step.samples
        self._last_state = {**step.after, "bad": self.bad_samples.state_dict()}
        self.bad_samples.check()

    def _submit(self, rows: list[list[Stage1Result]]) -> list[list[Future | None]]:
        """Decode futures of the micro-batch's samples this rank decodes (None: a peer decodes it)."""
        split = self.decode_split
        out, i = [], 0
        for row in rows:
            futures = []
            for item in row:
                if split is not None and i % split.peers != split.index:
                    futures.append(None)
                elif self._executor is None:
                    futures.append(_done(self._decode, item))
                else:
                    futures.append(self._executor.submit(self._decode, item))
                i += 1
            out.append(futures)
        return out

    def _decode(self, item: Stage1Result):
        try:
            return self.processor.stage2(item)
        except Rejected as e:
            return e

    def _decoded(self, futures: list[list[Future | None]]) -> list:
        """Tiles (or Rejected) of every sample of the micro-batch, in order; gathered from the peers if split."""
        flat = [f for row in futures for f in row]
        mine = {i: f.result() for i, f in enumerate(flat) if f is not None}
        if self.decode_split is None:
            return [mine[i] for i in range(len(flat))]
        gathered: dict = {}
        for part in self.decode_split.gather(mine):
            gathered.update(part)
        return [gathered[i] for i in range(len(flat))]

    def _assemble(self, rows: list[list[Stage1Result]], futures: list[list[Future | None]]) -> PackedBatch:
        decoded = iter(self._decoded(futures))
        out_rows = []
        for row in rows:
            out = []
            for item in row:
                tiles = next(decoded)
                if isinstance(tiles, Rejected):  # the sample leaves its row; the row keeps the rest
                    self._rejections.append((item.pos, item.dataset, tiles.reason, item.key, tiles.detail))
                    continue
                out.append(SampleTensors(item.key, item.input_ids, item.targets, tiles))
            out_rows.append(out)
        return build_batch(out_rows, self.cfg.seq_len, self.pad_id, self.cfg.tile_size)


def build_loader(
    cfg: DataConfig,
    dp_rank: int = 0,
    dp_size: int = 1,
    state: dict | None = None,
    rows_per_step: int | None = None,
    epochs: int | None = None,
) -> PackedLoader:
    """A loader for one dp rank; `state` (from `state_dict()` of any rank and layout) resumes it exactly."""
    loader = PackedLoader(cfg, dp_rank, dp_size, rows_per_step, epochs)
    if state is not None:
        loader.load_state_dict(state)
    return loader


def _done(fn, *args) -> Future:
    fut: Future = Future()
    fut.set_result(fn(*args))
    return fut


def _copy(state: dict | None) -> dict | None:
    return copy.deepcopy(state)
