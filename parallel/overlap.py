"""Gradient all-reduce over data parallel, bucketed and launched during the backward (the dp_shard=1 path).

Each trainable parameter counts how often its gradient was accumulated in this step
(``register_post_accumulate_grad_hook``); when it reaches the number of micro-batches the gradient is final,
and once every parameter of a bucket is final the bucket is flattened and all-reduced asynchronously while
the backward goes on (the role of DDP's reducer; no reduction for the other micro-batches). Buckets hold
parameters in reverse registration order (the order the backward produces them) up to
``parallel.bucket_size_mb`` and are launched strictly in bucket order, so every dp rank issues the same
collectives in the same order even when a parameter got no gradient on some rank (its zeros take part and its
bucket is launched in ``finish``). Gradients are views into the flat bucket buffers (DDP's
``gradient_as_bucket_view``): the backward accumulates into them and the all-reduce runs in place, so the
reducer costs no memory beyond the gradients themselves. ``finish`` waits for every bucket.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from parallel.comm import group_size


class _Bucket:
    def __init__(self, params: list[nn.Parameter]) -> None:
        self.params = params
        self.ready = 0
        self.flat: torch.Tensor | None = None  # allocated at the first step, reused
        self.work = None


class GradReducer:
    """Overlapped, bucketed sum of gradients over ``group``; ``start(n_micro)`` before a step's backward,
    ``finish()`` after it."""

    def __init__(self, named_params: list[tuple[str, nn.Parameter]], group, bucket_size_mb: float) -> None:
        self.group = group
        self.enabled = group_size(group) > 1
        limit = int(bucket_size_mb * 2**20)
        self.buckets: list[_Bucket] = []
        self.bucket_of: dict[nn.Parameter, _Bucket] = {}
        current: list[nn.Parameter] = []
        size = 0
        for _, p in reversed(named_params):
            nbytes = p.numel() * p.element_size()
            if current and (size + nbytes > limit or p.dtype != current[0].dtype):
                self._add_bucket(current)
                current, size = [], 0
            current.append(p)
            size += nbytes
        if current:
            self._add_bucket(current)
        self.expected: int | None = None
        self.counts: dict[nn.Parameter, int] = {}
        self.next_bucket = 0
        self.launched_early = 0  # buckets the last step launched before ``finish`` (during the backward)
        if self.enabled:
            for _, p in named_params:
                p.register_post_accumulate_grad_hook(self._on_grad)

    def _add_bucket(self, params: list[nn.Parameter]) -> None:
        bucket = _Bucket(params)
        self.buckets.append(bucket)
        for p in params:
            self.bucket_of[p] = bucket

    @torch.no_grad()
    def start(self, n_micro: int) -> None:
        """Expect ``n_micro`` accumulations per parameter in the coming backward passes; gradients become
        zeroed views into the bucket buffers (the backward accumulates into them in place)."""
        if not self.enabled:
            return
        self.expected = n_micro
        self.counts = {}
        self.next_bucket = 0
        for b in self.buckets:
            b.ready, b.work = 0, None
            if b.flat is None:
                b.flat = torch.empty(sum(p.numel() for p in b.params), dtype=b.params[0].dtype,
                                     device=b.params[0].device)  # fmt: skip
            b.flat.zero_()
            offset = 0
            for p in b.params:
                if p.grad is not None:  # accumulated outside forward_backward: keep it
                    b.flat[offset : offset + p.numel()].copy_(p.grad.reshape(-1))
                p.grad = b.flat[offset : offset + p.numel()].view_as(p)
                offset += p.numel()

    def _on_grad(self, p: nn.Parameter) -> None:
        if self.expected is None:  # a backward outside forward_backward: nothing to overlap
            return
        count = self.counts.get(p, 0) + 1
        self.counts[p] = count
        if count == self.expected:
            self.bucket_of[p].ready += 1
            self._launch_ready()

    def _launch_ready(self) -> None:
        while self.next_bucket < len(self.buckets):
            bucket = self.buckets[self.next_bucket]
            if bucket.ready < len(bucket.params):
                return
            self._launch(bucket)

    def _launch(self, bucket: _Bucket) -> None:
        bucket.work = dist.all_reduce(bucket.flat, group=self.group, async_op=True)
        self.next_bucket += 1

    @torch.no_grad()
    def finish(self) -> None:
        """Launch what the backward left (buckets with unused parameters) and wait for every bucket."""
        if not self.enabled:
            return
        self.launched_early = self.next_bucket
        while self.next_bucket < len(self.buckets):
            self._launch(self.buckets[self.next_bucket])
        for bucket in self.buckets:
            bucket.work.wait()
            bucket.work = None
            for p in bucket.params:
                storage = bucket.flat.untyped_storage().data_ptr()
                if p.grad is None or p.grad.untyped_storage().data_ptr() != storage:
                    raise RuntimeError("a gradient was replaced during the backward; the reducer lost it")
        self.expected = None
