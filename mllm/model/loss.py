"""Single-device reference losses: per-token weights and the globally normalized weighted cross-entropy.

Every loss mode is ``sum_t w_t * CE_t / sum_t w_t`` over all supervised tokens of the *global* batch (all
micro-batches, all data-parallel ranks), as InternVL computes it:

- ``token``: w = 1 (mean over supervised tokens),
- ``sample``: w = 1 / n_s where n_s is the number of supervised tokens of the token's sample (mean of
  per-sample means),
- ``square``: w = 1 / sqrt(n_s) (InternVL 2.5's compromise).

A sample is one segment of a packed row (``segment_ids``), or the whole row without segment ids. Labels are
already shifted (``-100`` = no loss). ``parallel`` computes the same quantity with vocab-parallel logits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def loss_weights(labels: torch.Tensor, segment_ids: torch.Tensor | None, mode: str = "token") -> torch.Tensor:
    """Float weights [B, S]: 0 for unsupervised tokens, else by ``mode`` (see module docstring)."""
    supervised = labels != IGNORE_INDEX
    if mode == "token":
        return supervised.float()
    if mode not in ("sample", "square"):
        raise ValueError(f"loss mode must be 'token', 'sample' or 'square', got {mode!r}")
    seg = torch.ones_like(labels) if segment_ids is None else segment_ids.long()
    b = labels.shape[0]
    width = int(seg.max()) + 1 if seg.numel() else 1
    key = torch.arange(b, device=labels.device)[:, None] * width + seg
    counts = torch.zeros(b * width, device=labels.device)
    counts.scatter_add_(0, key.flatten(), supervised.flatten().float())
    n = counts[key].clamp(min=1.0)
    weights = 1.0 / n if mode == "sample" else n.rsqrt()
    return torch.where(supervised, weights, torch.zeros_like(weights))


def weighted_cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """sum_t w_t * CE(logits_t, labels_t) in fp32 (full-vocabulary logits)."""
    ce = F.cross_entropy(
        logits.float().flatten(0, -2), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    )
    return (ce * weights.flatten()).sum()


def reference_loss(
    model, micro_batches: Sequence[Mapping[str, torch.Tensor]], mode: str = "token"
) -> torch.Tensor:
    """The global-batch loss on one device: sum over micro-batches of weighted CE / total weight."""
    total_weight = sum(loss_weights(mb["labels"], mb.get("segment_ids"), mode).sum() for mb in micro_batches)
    loss = torch.zeros(())
    for mb in micro_batches:
        out = model(
            mb["input_ids"],
            pixel_values=mb.get("pixel_values"),
            segment_ids=mb.get("segment_ids"),
            position_ids=mb.get("position_ids"),
            image_flags=mb.get("image_flags"),
        )
        weights = loss_weights(mb["labels"], mb.get("segment_ids"), mode)
        loss = loss + weighted_cross_entropy_sum(out.logits, mb["labels"], weights)
    return loss / total_weight.clamp(min=1e-12)
