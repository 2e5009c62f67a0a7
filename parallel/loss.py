"""Vocab-parallel cross-entropy: logits stay split over tp ranks; only [tokens]-sized statistics are reduced."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from mllm.model.loss import IGNORE_INDEX
from parallel.comm import all_reduce_no_grad


class _VocabParallelCrossEntropy(torch.autograd.Function):
    """Per-token CE from this rank's vocabulary slice [vocab_start, vocab_start + V_local).

    Forward: global max (all-reduce MAX), sum of exp and the target logit (all-reduce SUM) over tp.
    Backward: softmax_local - onehot_local, which needs no communication. Ignored tokens get loss 0.
    """

    @staticmethod
    def forward(ctx, logits, labels, vocab_start, group):
        logits = logits.float()
        local_vocab = logits.shape[-1]
        max_logit = logits.max(dim=-1).values
        all_reduce_no_grad(max_logit, group, op=dist.ReduceOp.MAX)
        shifted = logits - max_logit.unsqueeze(-1)
        local_target = labels - vocab_start
        outside = (local_target < 0) | (local_target >= local_vocab) | (labels == IGNORE_INDEX)
        safe_target = local_target.masked_fill(outside, 0)
        target_logit = shifted.gather(-1, safe_target.unsqueeze(-1)).squeeze(-1).masked_fill(outside, 0.0)
        all_reduce_no_grad(target_logit, group)
        exp = shifted.exp()
        sum_exp = exp.sum(dim=-1)
        all_reduce_no_grad(sum_exp, group)
        loss = (sum_exp.log() - target_logit).masked_fill(labels == IGNORE_INDEX, 0.0)
        softmax = exp.div_(sum_exp.unsqueeze(-1))
        ctx.save_for_backward(softmax, safe_target, outside, labels == IGNORE_INDEX)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, safe_target, outside, ignored = ctx.saved_tensors
        grad = softmax
        onehot = torch.zeros_like(grad).scatter_(-1, safe_target.unsqueeze(-1), 1.0)
        grad = grad - onehot * (~outside).unsqueeze(-1).float()
        grad = grad * grad_loss.masked_fill(ignored, 0.0).unsqueeze(-1)
        return grad, None, None, None


def vocab_parallel_cross_entropy(
    local_logits: torch.Tensor,
    labels: torch.Tensor,
    vocab_start: int,
    group: ProcessGroup | None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Per-token loss [B, S] (fp32; 0 where labels == -100). Columns at global index >= ``vocab_size`` are
    vocabulary padding and are masked to -inf so they take no probability and get no gradient."""
    if vocab_size is not None and vocab_start + local_logits.shape[-1] > vocab_size:
        column = torch.arange(local_logits.shape[-1], device=local_logits.device) + vocab_start
        local_logits = local_logits.masked_fill(column >= vocab_size, float("-inf"))
    return _VocabParallelCrossEntropy.apply(local_logits, labels, vocab_start, group)
