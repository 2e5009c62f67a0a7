"""Validation loss over a fixed held-out set (``eval.data_path``, ``eval.every``, ``eval.batches``).

The held-out set is the first ``eval.batches`` packed micro-batches of a one-replica loader over
``eval.data_path`` (the run's data settings, its seed): every rank builds the same rows whatever the layout,
and data-parallel rank r evaluates rows r, r + dp, ... (short ranks get copies with no loss tokens, so every
rank runs the same number of micro-batches). The loss is the training loss's own reduction (sum of weighted
token losses over the whole set / its total weight), so its value does not depend on tp/pp/dp.

It runs through ``ParallelModel.forward_backward`` (the one code path that every layout implements: pipeline
schedules have no forward-only mode here) in eval mode and drops the gradients; the global RNG state is
restored afterwards, so validating does not change the training run.

Per-dataset losses (``val_loss/<dataset>``, ``eval.per_dataset``) come from the same rows with the other
datasets' labels masked, one pass per dataset; the overall ``val_loss`` is their weight-averaged combination
(one pass over all tokens without the breakdown).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from mllm.data.batch import IGNORE_INDEX, PackedBatch
from mllm.train.checkpoint import rng_state, set_rng_state
from mllm.train.fast_path import forward_context


def dataset_of(sample_key: str) -> str:
    """``"name:line"`` / ``"name:shard_key"`` -> ``"name"`` (``mllm.data.sources`` sample keys)."""
    return sample_key.rsplit(":", 1)[0]


def held_out_rows(run: Any) -> list[PackedBatch]:
    """The fixed held-out micro-batches (identical on every rank and for every layout)."""
    from mllm.data.loader import PackedLoader

    cfg = dataclasses.replace(run.data, path=run.eval.data_path, num_workers=0)
    loader = PackedLoader(cfg, 0, 1)
    try:
        return [next(loader) for _ in range(run.eval.batches)]
    finally:
        loader.close()


def dataset_masks(batch: PackedBatch) -> dict[str, torch.Tensor]:
    """{dataset: bool [B, S] of the tokens of its samples} (segment s of row r is sample s of that row)."""
    masks: dict[str, torch.Tensor] = {}
    for r, keys in enumerate(batch.sample_ids):
        for s, key in enumerate(keys):
            mask = masks.setdefault(dataset_of(key), torch.zeros_like(batch.labels, dtype=torch.bool))
            mask[r] |= batch.segment_ids[r] == s + 1
    return masks


class Validator:
    """Computes ``val_loss`` (and ``val_loss/<dataset>``) for one trainer; built on first use."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._rows: list[dict[str, Any]] | None = None
        self._datasets: list[str] = []

    def due(self, step: int) -> bool:
        run = self.trainer.run
        if not run.eval.data_path:
            return False
        return step == run.train.steps or (run.eval.every > 0 and step % run.eval.every == 0)

    def _my_rows(self) -> list[dict[str, Any]]:
        """This dp rank's share: rows dp_rank, dp_rank + dp, ...; padded with loss-free copies to one count
        (a multiple of pp, which interleaved pipeline schedules need)."""
        from mllm.train.data import batch_to_dict

        mesh = self.trainer.mesh
        rows = held_out_rows(self.trainer.run)
        per_rank = -(-len(rows) // mesh.dp)
        per_rank = -(-per_rank // mesh.pp) * mesh.pp
        mine = rows[mesh.dp_rank :: mesh.dp]
        out = []
        for i in range(per_rank):
            batch = mine[i] if i < len(mine) else rows[0]
            d = batch_to_dict(batch)
            d["dataset_masks"] = dataset_masks(batch)
            d["padding"] = i >= len(mine)  # a copy without loss tokens
            out.append(d)
        names = {name for batch in rows for name in dataset_masks(batch)}
        self._datasets = sorted(names)
        return out

    def _loss(self, rows: list[dict[str, Any]], dataset: str | None) -> tuple[float, float]:
        """(loss, total weight) over ``dataset``'s tokens (None: all tokens) of every rank's rows."""
        t = self.trainer
        device = t.device
        micro = []
        for row in rows:
            labels = row["labels"].clone()
            if row["padding"]:
                labels[:] = IGNORE_INDEX
            elif dataset is not None:
                mask = row["dataset_masks"].get(dataset, torch.zeros_like(labels, dtype=torch.bool))
                labels[~mask] = IGNORE_INDEX
            mb = {k: v for k, v in row.items() if k not in ("dataset_masks", "sample_ids", "padding")}
            mb["labels"] = labels
            micro.append({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in mb.items()})
        autocast = torch.autocast(device.type, dtype=t.dtype, enabled=t.dtype != torch.float32)
        with autocast, forward_context(t.run, t.fp8_amax_group):
            result = t.pm.forward_backward(micro)
        t.pm.zero_grad()
        return float(result.loss), float(result.total_weight)

    def run(self) -> dict[str, float]:
        """{"val_loss": ..., "val_loss/<dataset>": ...}; a collective: every rank calls it at the same step."""
        t = self.trainer
        saved = rng_state()
        t.pm.train(False)
        try:
            if self._rows is None:
                self._rows = self._my_rows()
            if t.run.eval.per_dataset and len(self._datasets) > 1:
                per_dataset = {name: self._loss(self._rows, name) for name in self._datasets}
            else:
                per_dataset = {None: self._loss(self._rows, None)}
        finally:
            t.pm.train(True)
            set_rng_state(saved)
        total = sum(w for _, w in per_dataset.values())
        out = {"val_loss": sum(loss * w for loss, w in per_dataset.values()) / max(total, 1e-12)}
        out.update({f"val_loss/{name}": loss for name, (loss, w) in per_dataset.items() if name and w > 0})
        return out
