"""Per-sample processing: stage 1 (in loader workers) and stage 2 (tile decoding, in decode threads).

Stage 1 is cheap: parse the record, read image headers for their sizes, choose grids, tokenize. The packer
only needs its result (token and tile counts), so the expensive stage 2 (JPEG decode, resize, tiles) runs
after packing and buffered samples hold encoded bytes, not pixels.

Worker w of W handles positions k with k % W == w of the global sample order and yields one result per owned
position, in order; the torch DataLoader's round-robin then restores the exact order whatever W is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch.utils.data

from mllm.data.augment import degrade_tiles
from mllm.data.config import DataConfig
from mllm.data.conversation import ConversationTokenizer, Rejected
from mllm.data.sampling import Fetcher, SampleOrder
from mllm.data.sources import RawSample, Source, image_names, media_kind
from mllm.data.templates import get_template
from mllm.data.tiling import decode_tiles, num_tiles, open_image, per_image_max_tiles, select_grid
from mllm.data.video import Video, choose_frames, video_tiles


@dataclass
class Stage1Result:
    pos: int
    dataset: str = ""
    key: str = ""
    skip: bool = False  # a position replayed on resume that the packer no longer needs
    reason: str | None = None
    detail: str = ""
    input_ids: np.ndarray | None = None
    targets: np.ndarray | None = None
    images: list[bytes] = field(default_factory=list)
    tile_limits: list[tuple[int, int]] = field(default_factory=list)  # (min, max) tiles per image
    tiles: int = 0
    video: Video | None = None
    frames: list[int] = field(default_factory=list)  # the video's sampled frame indices, one tile each
    truncated: bool = False  # cut to seq_len (data.too_long=truncate)

    @property
    def tokens(self) -> int:
        return 0 if self.input_ids is None else len(self.input_ids)


def load_tokenizer(path: str):
    """A fast Hugging Face tokenizer from a local directory."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, use_fast=True, trust_remote_code=True)
    except Exception as e:
        raise ValueError(
            f"cannot load tokenizer from {path!r} ({e}); set data.tokenizer to a local HF tokenizer dir"
        ) from e


class SampleProcessor:
    def __init__(self, cfg: DataConfig, sources: Sequence[Source]) -> None:
        self.cfg = cfg
        self.max_tiles = {s.name: s.max_dynamic_patch or cfg.max_dynamic_patch for s in sources}
        self.augment = {s.name: s.data_augment for s in sources}
        self._conv: ConversationTokenizer | None = None

    @property
    def conv(self) -> ConversationTokenizer:
        if self._conv is None:  # loaded lazily, once per worker process
            tok = load_tokenizer(self.cfg.tokenizer)
            self._conv = ConversationTokenizer(
                tok, get_template(self.cfg.template), self.cfg.num_image_token, self.cfg.too_long
            )
        return self._conv

    def stage1(self, raw: RawSample, pos: int) -> Stage1Result:
        out = Stage1Result(pos, raw.dataset, raw.key)
        try:
            self._stage1(raw, out)
        except Rejected as e:
            out.reason, out.detail = e.reason, e.detail
            out.input_ids = out.targets = None
            out.images, out.video = [], None
        return out

    def _video_frames(self, raw: RawSample, out: Stage1Result) -> list[int]:
        if raw.video is None:
            raise Rejected("missing_video", raw.video_error)
        try:
            frames = choose_frames(
                raw.video, self.cfg.min_num_frame, self.cfg.max_num_frame, self.cfg.seed, out.pos
            )
        except Exception as e:  # noqa: BLE001 - whatever the decoder raises, the video is unusable
            raise Rejected("corrupt_video", f"{raw.video.name}: {type(e).__name__}: {e}") from None
        out.video, out.frames = raw.video, frames
        return [1] * len(frames)

    def _stage1(self, raw: RawSample, out: Stage1Result) -> None:
        if raw.error is not None:
            raise Rejected(*raw.error)
        record = raw.record or {}
        if "conversations" not in record:
            raise Rejected("bad_annotation", "record has no 'conversations'")
        media = media_kind(record)
        if media == "invalid":
            raise Rejected("bad_annotation", "'image' is not a string or list, or 'video' not a string")
        if media == "video":
            tiles_per_image = self._video_frames(raw, out)
            out.tiles = len(tiles_per_image)
            self._tokenize(record, out, tiles_per_image, media)
            return
        for data, err in zip(raw.images, raw.image_errors):
            if data is None:
                raise Rejected("missing_image", err)
        cfg = self.cfg
        budget = per_image_max_tiles(self.max_tiles[raw.dataset], len(raw.images))
        lo = min(cfg.min_dynamic_patch, budget)
        tiles_per_image = []
        for name, data in zip(image_names(record), raw.images):
            try:
                width, height = open_image(data).size
            except Exception as e:  # noqa: BLE001 - whatever PIL raises, the image is unusable
                raise Rejected("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
            grid = select_grid(width, height, lo, budget, cfg.tile_size)
            tiles_per_image.append(num_tiles(grid, cfg.use_thumbnail))
        out.tiles = sum(tiles_per_image)
        self._tokenize(record, out, tiles_per_image, media)
        out.images = list(raw.images)
        out.tile_limits = [(lo, budget)] * len(raw.images)

    def _tokenize(
        self, record: dict, out: Stage1Result, tiles_per_image: list[int], media: str | None
    ) -> None:
        if out.tiles > self.cfg.max_tiles_per_row:
            raise Rejected(
                "too_many_tiles", f"{out.tiles} tiles > max_tiles_per_row {self.cfg.max_tiles_per_row}"
            )
        tokenized = self.conv(record["conversations"], tiles_per_image, self.cfg.seq_len, media)
        out.input_ids, out.targets = tokenized.input_ids, tokenized.targets
        out.truncated = tokenized.truncated

    def stage2(self, item: Stage1Result) -> np.ndarray:
        """Decode and tile the sample's images -> uint8 [tiles, 3, T, T]; Rejected on a bad image."""
        cfg = self.cfg
        augment = self.augment.get(item.dataset, False)
        if item.video is not None:
            try:
                tiles = video_tiles(item.video, item.frames, cfg.tile_size, cfg.fast_decode)
            except Exception as e:  # noqa: BLE001 - a frame that does not decode
                raise Rejected("corrupt_video", f"{type(e).__name__}: {e}") from None
            # InternVL's video transform is the same per-tile build_transform(is_train=data_augment)
            return degrade_tiles(tiles, cfg.seed, item.pos, 0) if augment else tiles
        if not item.images:
            return np.zeros((0, 3, cfg.tile_size, cfg.tile_size), dtype=np.uint8)
        parts = []
        for i, (data, (lo, hi)) in enumerate(zip(item.images, item.tile_limits)):
            try:
                tiles = decode_tiles(data, lo, hi, cfg.tile_size, cfg.use_thumbnail, cfg.fast_decode)
            except Exception as e:  # noqa: BLE001 - truncated/corrupt pixels only show up when decoding
                raise Rejected("corrupt_image", f"{type(e).__name__}: {e}") from None
            if augment:  # InternVL degrades each tile after tiling (its per-tile transform), see augment.py
                tiles = degrade_tiles(tiles, cfg.seed, item.pos, i)
            parts.append(tiles)
        tiles = np.concatenate(parts)
        if len(tiles) != item.tiles:  # cannot happen unless the header lied about the size
            raise Rejected("corrupt_image", f"decoded {len(tiles)} tiles, expected {item.tiles}")
        return tiles


def sample_order(sources: Sequence[Source], cfg: DataConfig, epochs: int | None) -> SampleOrder:
    """The run's global order (the same for every rank and layout); finite when `epochs` is given."""
    return SampleOrder(sources, cfg.seed, cfg.shuffle_buffer, cfg.use_data_resampling, epochs)


def stage1_stream(
    sources: Sequence[Source],
    cfg: DataConfig,
    epochs: int | None,
    order_state: dict | None,
    needed: frozenset[int],
    k_next: int,
    worker: int = 0,
    num_workers: int = 1,
) -> Iterator[Stage1Result]:
    """Stage-1 results for this worker's positions, from the order state on (ends with the order)."""
    order = sample_order(sources, cfg, epochs)
    if order_state is not None:
        order.load_state_dict(order_state)
    fetcher = Fetcher(sources, order)
    fetcher.start_at_pending()
    processor = SampleProcessor(cfg, sources)
    while (item := order.next()) is not None:
        k, ref = item
        if k % num_workers != worker:
            fetcher.forget(ref)
            continue
        if k < k_next and k not in needed:
            fetcher.forget(ref)
            yield Stage1Result(k, skip=True)
            continue
        yield processor.stage1(fetcher.get(ref), k)


class Stage1Dataset(torch.utils.data.IterableDataset):
    """Runs `stage1_stream` in each DataLoader worker with its worker id."""

    def __init__(self, sources, cfg, epochs, order_state, needed, k_next) -> None:
        super().__init__()
        self.args = (sources, cfg, epochs, order_state, frozenset(needed), k_next)

    def __iter__(self) -> Iterator[Stage1Result]:
        info = torch.utils.data.get_worker_info()
        worker, num = (info.id, info.num_workers) if info is not None else (0, 1)
        return stage1_stream(*self.args, worker=worker, num_workers=num)


def identity(x):
    return x
