"""A deterministic, layout-independent batch source for trainer tests (the data pipeline has its own tests).

Row g of the whole run is a pure function of (seed, g): two packed samples, the first with one 56 px tile and
its 4 <IMG_CONTEXT> tokens, text that follows a learnable pattern. Step k's global batch is rows
[k*G, (k+1)*G); data-parallel rank r takes its contiguous share, so every layout sees the same global batch.
"""

from __future__ import annotations

from typing import Any

import torch

from mllm.train.config import RunConfig
from parallel.mesh import ParallelMesh

IMAGE_TOKEN = 1000
TILE_TOKENS = 4


def make_row(seed: int, g: int, seq_len: int, tile: int = 56) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + g)
    first = int(torch.randint(seq_len // 3, seq_len // 2, (1,), generator=gen))
    second = seq_len - first - int(torch.randint(0, 6, (1,), generator=gen))  # some padding at the end
    ids = torch.zeros(seq_len, dtype=torch.long)
    seg = torch.zeros(seq_len, dtype=torch.long)
    labels = torch.full((seq_len,), -100, dtype=torch.long)
    pos = torch.zeros(seq_len, dtype=torch.long)
    start = 0
    for s, n in enumerate((first, second - 0), start=1):
        n = min(n, seq_len - start)
        step = int(torch.randint(1, 4, (1,), generator=gen))
        base = int(torch.randint(0, 400, (1,), generator=gen))
        text = (base + step * torch.arange(n)) % 500 + 1
        ids[start : start + n] = text
        if s == 1:
            ids[start + 1 : start + 1 + TILE_TOKENS] = IMAGE_TOKEN
        seg[start : start + n] = s
        pos[start : start + n] = torch.arange(n)
        lab = torch.full((n,), -100, dtype=torch.long)
        lab[:-1] = ids[start + 1 : start + n]
        lab[lab == IMAGE_TOKEN] = -100
        if s == 1:
            lab[: 1 + TILE_TOKENS] = -100
        labels[start : start + n] = lab
        start += n
    return {
        "input_ids": ids[None],
        "labels": labels[None],
        "segment_ids": seg[None],
        "position_ids": pos[None],
        "pixel_values": torch.randn(1, 3, tile, tile, generator=gen),
        "image_flags": torch.ones(1, dtype=torch.long),
        "sample_ids": [f"row{g}/a", f"row{g}/b"],
    }


def cat_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: torch.cat([r[k] for r in rows]) for k in rows[0] if k != "sample_ids"}
    out["sample_ids"] = [i for r in rows for i in r["sample_ids"]]
    return out


class RowSource:
    """Implements ``mllm.train.batches.BatchSource``; optionally poisons given global steps with NaN pixels."""

    def __init__(self, run: RunConfig, mesh: ParallelMesh, poison_steps: tuple[int, ...] = ()) -> None:
        self.seed, self.seq_len = run.train.seed, run.data.seq_len
        self.global_rows = run.train.global_batch_size
        self.per_dp = self.global_rows // mesh.dp
        self.micro = run.data.micro_batch_size
        self.dp_rank = mesh.dp_rank
        self.step = 0
        self.poison_steps = poison_steps

    def next_micro_batches(self, n: int) -> list[dict[str, Any]]:
        first = self.step * self.global_rows + self.dp_rank * self.per_dp
        rows = [make_row(self.seed, first + i, self.seq_len) for i in range(self.per_dp)]
        if self.step in self.poison_steps:
            rows[0]["pixel_values"] = torch.full_like(rows[0]["pixel_values"], float("nan"))
        self.step += 1
        assert n * self.micro == self.per_dp
        return [cat_rows(rows[i * self.micro : (i + 1) * self.micro]) for i in range(n)]

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = state.get("step", state.get("resume_global_step"))

    def bad_samples(self) -> int:
        return 0

    def truncated_samples(self) -> int:
        return 0
