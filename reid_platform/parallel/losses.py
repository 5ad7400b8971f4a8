"""Class-level Circle loss, written so that it shards over classes.

Sun et al. (CVPR 2020) define, for one sample with cosine s_p to its class and s_n^j to the others,

    L = log(1 + sum_j exp(gamma a_n^j (s_n^j - m)) exp(-gamma a_p (s_p - 1 + m)))
    a_p = relu(1 + m - s_p),  a_n^j = relu(s_n^j + m)   (constants for back-propagation)

which is softmax cross-entropy on the per-class logits below. Cross-entropy needs only a row maximum,
a row sum of exponentials and the positive logit, each of which is a sum or max over classes, so the
classes can live on different workers (``distributed_cross_entropy``).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup


def circle_logits(cosine: torch.Tensor, target: torch.Tensor, gamma: float, margin: float) -> torch.Tensor:
    """Per-class Circle logits for a (rows x classes) cosine matrix.

    ``target[i]`` is the column of row i's own class, or -1 when that class is not among these
    columns (another shard owns it). The weights a_p and a_n are detached, as in the paper.
    """
    alpha_n = (cosine.detach() + margin).clamp_min(0.0)
    logits = gamma * alpha_n * (cosine - margin)
    rows = torch.nonzero(target >= 0).squeeze(1)
    if rows.numel():
        cols = target[rows]
        positive = cosine[rows, cols]
        alpha_p = (1.0 + margin - positive.detach()).clamp_min(0.0)
        logits = logits.index_put((rows, cols), gamma * alpha_p * (positive - (1.0 - margin)))
    return logits


class _DistributedCrossEntropy(torch.autograd.Function):
    """Mean softmax cross-entropy over logits whose columns are split across a process group.

    Every rank holds the same rows and a disjoint slice of the columns; every rank returns the same
    loss and receives the gradient for its own columns: softmax minus one-hot, divided by the rows.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None):
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 at least under AMP
        distributed = dist.is_available() and dist.is_initialized()
        row_max = logits.max(dim=1).values
        if distributed:
            dist.all_reduce(row_max, dist.ReduceOp.MAX, group=group)
        softmax = torch.exp(logits - row_max[:, None])
        sum_exp = softmax.sum(dim=1)
        owned = target >= 0
        rows = torch.nonzero(owned).squeeze(1)
        positive = torch.zeros_like(row_max)
        positive[rows] = logits[rows, target[rows]]
        if distributed:
            dist.all_reduce(sum_exp, group=group)
            dist.all_reduce(positive, group=group)
        # max + log(sum exp) - positive: exact for the huge logits of gamma = 256, where the
        # probability form -log(p) would underflow and cap the loss.
        loss = (row_max + sum_exp.log() - positive).mean()
        softmax.div_(sum_exp[:, None])
        ctx.save_for_backward(softmax, rows, target[rows])
        return loss

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        softmax, rows, cols = ctx.saved_tensors
        grad = softmax  # reused in place: the forward's probabilities are not needed again
        grad[rows, cols] -= 1.0
        grad.mul_(grad_loss / grad.shape[0])
        return grad, None, None


def distributed_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, group: ProcessGroup | None = None
) -> torch.Tensor:
    """Cross-entropy of ``logits`` (rows x local classes); ``target`` -1 where another rank owns it.

    Without an initialised process group this is plain single-process cross-entropy.
    """
    return _DistributedCrossEntropy.apply(logits, target, group)
