"""`python -m mllm.data stats META_OR_SHARDS --tokenizer DIR [--config-name R] [--json]`: a data audit.

Every sample goes through the training pipeline's stage 1 (record, image headers, tiling, template, tokens;
no pixel decoding), so the rejections, tiles and token counts are the ones training will see. Per dataset:
the samples one pass reads (InternVL's repeat_time < 1 keeps only the first int(n*r) annotation lines, and
only those are audited), samples per epoch (times an integer repeat_time), rejections by reason with an example
each, truncations, histograms of tiles per sample and of token lengths, the fraction of tokens that are image
tokens; for all datasets: tokens and packed rows per epoch and, with a recipe, optimizer steps per epoch
(rows / train.global_batch_size).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from mllm.data.config import DataConfig
from mllm.data.pipeline import SampleProcessor
from mllm.data.sources import Source, open_sources

TOKEN_BINS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


def token_bin(n: int) -> str:
    edge = next((b for b in TOKEN_BINS if n <= b), None)
    return f"<={edge}" if edge is not None else f">{TOKEN_BINS[-1]}"


@dataclass
class DatasetStats:
    name: str
    samples: int  # samples one pass reads: the annotation's non-blank lines, after repeat_time < 1's cut
    repeat_time: float
    repeats: int  # passes per epoch (an integer repeat_time)
    accepted: int = 0
    truncated: int = 0
    tokens: int = 0
    image_tokens: int = 0
    tiles: int = 0
    rejected: dict[str, dict] = field(default_factory=dict)  # reason -> {"count", "example"}
    tiles_hist: Counter = field(default_factory=Counter)
    tokens_hist: Counter = field(default_factory=Counter)

    @property
    def samples_per_epoch(self) -> int:
        return self.samples * self.repeats

    def scale(self) -> float:
        """Samples of an epoch per sample audited (each audited sample is read `repeats` times)."""
        return float(self.repeats)

    def to_json(self) -> dict:
        return {
            "samples": self.samples,
            "repeat_time": self.repeat_time,
            "samples_per_epoch": self.samples_per_epoch,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "truncated": self.truncated,
            "tokens": self.tokens,
            "tiles": self.tiles,
            "image_token_fraction": self.image_tokens / self.tokens if self.tokens else 0.0,
            "tiles_hist": {str(k): v for k, v in sorted(self.tiles_hist.items())},
            "tokens_hist": {k: self.tokens_hist[k] for k in map(token_bin, (*TOKEN_BINS, 1 << 62))},
        }


def audit_source(source: Source, processor: SampleProcessor, num_image_token: int) -> DatasetStats:
    stats = DatasetStats(source.name, source.length, source.repeat_time, source.repeats)
    pos = 0
    for unit in range(len(source.unit_counts)):
        for _, raw in source.read_unit(unit):
            result = processor.stage1(raw, pos)
            pos += 1
            if result.reason is not None:
                entry = stats.rejected.setdefault(result.reason, {"count": 0, "example": ""})
                entry["count"] += 1
                entry["example"] = entry["example"] or f"{result.key}: {result.detail}"
                continue
            stats.accepted += 1
            stats.truncated += int(result.truncated)
            stats.tokens += result.tokens
            stats.tiles += result.tiles
            stats.image_tokens += result.tiles * num_image_token
            stats.tiles_hist[result.tiles] += 1
            stats.tokens_hist[token_bin(result.tokens)] += 1
    return stats


def audit(cfg: DataConfig, global_batch_size: int | None = None) -> dict:
    """The audit of cfg.path as a JSON-able dict (see the module docstring)."""
    sources = open_sources(cfg.path)
    processor = SampleProcessor(cfg, sources)
    datasets = [audit_source(s, processor, cfg.num_image_token) for s in sources]
    tokens = sum(d.tokens * d.scale() for d in datasets)
    tiles = sum(d.tiles * d.scale() for d in datasets)
    # Rows if packing were perfect: bounded by tokens per row and by tiles per row (the packer fills ~99.8%).
    rows = math.ceil(max(tokens / cfg.seq_len, tiles / cfg.max_tiles_per_row))
    total = {
        "samples_per_epoch": sum(d.samples_per_epoch for d in datasets),
        "accepted_per_epoch": round(sum(d.accepted * d.scale() for d in datasets)),
        "tokens_per_epoch": round(tokens),
        "tiles_per_epoch": round(tiles),
        "rows_per_epoch": rows,
    }
    if global_batch_size:
        total["steps_per_epoch"] = math.ceil(rows / global_batch_size)
    return {
        "path": cfg.path,
        "template": cfg.template,
        "seq_len": cfg.seq_len,
        "global_batch_size": global_batch_size,
        "datasets": {d.name: d.to_json() for d in datasets},
        "total": total,
    }


def format_audit(report: dict) -> str:
    """The audit as a human-readable text."""
    lines = [f"data audit of {report['path']} (template {report['template']}, seq_len {report['seq_len']})"]
    for name, d in report["datasets"].items():
        lines.append(
            f"\n{name}: {d['samples']} samples, {d['samples_per_epoch']} samples per epoch (repeat_time "
            f"{d['repeat_time']}), {d['accepted']} accepted, {d['truncated']} truncated, image tokens "
            f"{d['image_token_fraction']:.1%} of {d['tokens']} tokens"
        )
        for reason, r in sorted(d["rejected"].items(), key=lambda x: -x[1]["count"]):
            lines.append(f"  rejected {reason}: {r['count']}, e.g. {r['example']}")
        lines.append("  tiles per sample: " + ", ".join(f"{k}: {v}" for k, v in d["tiles_hist"].items()))
        hist = [f"{k}: {v}" for k, v in d["tokens_hist"].items() if v]
        lines.append("  tokens per sample: " + ", ".join(hist))
    t = report["total"]
    lines.append(
        f"\nper epoch: {t['samples_per_epoch']} samples ({t['accepted_per_epoch']} accepted), "
        f"{t['tokens_per_epoch']} tokens, {t['tiles_per_epoch']} tiles, >= {t['rows_per_epoch']} packed rows"
    )
    if "steps_per_epoch" in t:
        lines.append(
            f"steps per epoch: {t['steps_per_epoch']} (global batch {report['global_batch_size']} rows)"
        )
    return "\n".join(lines)
