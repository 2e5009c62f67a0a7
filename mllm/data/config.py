"""Typed configuration of the data pipeline (plain dataclass; the trainer registers it with Hydra)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    # A meta JSON in InternVL's format, or a directory written by `python -m mllm.data prepare` (has index.json).
    path: str = ""
    # Local Hugging Face tokenizer directory (a fast tokenizer is required: labels come from character offsets).
    tokenizer: str = ""
    template: str = "internlm2-chat"
    # Tokens per packed row and rows per micro-batch.
    seq_len: int = 8192
    micro_batch_size: int = 1
    max_tiles_per_row: int = 48
    # Tile-balanced packing: rows also aim at this many tiles (+-1), so a pipeline split of the ViT over stages
    # stays balanced. 0: off; -1: the data mix's own tiles per row (running average); k: k tiles.
    tiles_per_row: int = 0
    # Dynamic tiling; a dataset's own `max_dynamic_patch` in the meta JSON overrides max_dynamic_patch.
    max_dynamic_patch: int = 12
    min_dynamic_patch: int = 1
    use_thumbnail: bool = True
    tile_size: int = 448
    # LLM tokens per tile (256 for 448 px tiles with pixel-shuffle 0.5); tiny test models use fewer.
    num_image_token: int = 256
    # Video records (InternVL's min_num_frame / max_num_frame): frames drawn per sample, one tile each.
    min_num_frame: int = 8
    max_num_frame: int = 32
    # Samples longer than seq_len: "truncate" (InternVL's tokenizer truncation; a cut inside an image's tokens
    # rejects the sample) or "reject". Counted either way (data/truncated, data/bad/too_long).
    too_long: str = "truncate"
    # Reduced-size JPEG decode (draft mode) when the tiling target is much smaller than the image.
    fast_decode: bool = True
    # Randomness and streaming.
    seed: int = 0
    shuffle_buffer: int = 1000
    pack_buffer: int = 256
    num_workers: int = 2
    decode_threads: int = 2
    prefetch_batches: int = 2
    # InternVL's use_data_resampling: draw datasets with weights sqrt(samples per epoch) instead of epochs over
    # the concatenation (sampling.py).
    use_data_resampling: bool = False
    # Bad input: skipped and counted; the run fails when more than max_bad_fraction of a dataset's last
    # bad_window samples (all ranks together) were rejected, once that window holds min_samples_for_bad_check.
    max_bad_fraction: float = 0.05
    min_samples_for_bad_check: int = 1000
    bad_window: int = 1000
    # Write RUN_DIR/samples.jsonl: each optimizer step's global batch as "<dataset>:<annotation line>" ids.
    log_samples: bool = False
    # FLOP estimate used to balance rows across dp ranks (defaults: InternVL-Chat-V1-5, everything trained).
    llm_flops_per_token: float = 6 * 19.86e9
    llm_attn_flops_per_token_pair: float = 1.77e6
    vit_flops_per_tile: float = 35.8e12

    def validate(self) -> None:
        """Raise a one-line ValueError naming the bad field and the fix."""
        if not self.path:
            raise ValueError("data.path is empty: set it to a meta JSON or a prepared shard directory")
        if not 1 <= self.min_dynamic_patch <= self.max_dynamic_patch <= 40:
            raise ValueError(
                f"data.min_dynamic_patch={self.min_dynamic_patch}, max_dynamic_patch={self.max_dynamic_patch}: "
                "need 1 <= min <= max <= 40"
            )
        if self.tile_size <= 0 or self.num_image_token <= 0:
            raise ValueError("data.tile_size and data.num_image_token must be positive")
        if self.seq_len < 64 or self.micro_batch_size < 1:
            raise ValueError(f"data.seq_len={self.seq_len} must be >= 64 and data.micro_batch_size >= 1")
        if not 1 <= self.min_num_frame <= self.max_num_frame:
            raise ValueError(
                f"data.min_num_frame={self.min_num_frame}, max_num_frame={self.max_num_frame}: need 1 <= min <= max"
            )
        if self.too_long not in ("truncate", "reject"):
            raise ValueError(f"data.too_long={self.too_long!r}: use truncate or reject")
        if self.bad_window < 1:
            raise ValueError(f"data.bad_window={self.bad_window} must be >= 1 (samples per dataset)")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"data.max_bad_fraction={self.max_bad_fraction} must be within [0, 1]")
