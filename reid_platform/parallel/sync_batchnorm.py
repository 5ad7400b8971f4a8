"""BatchNorm over the global batch, on any device and backend (``model.sync_bn``).

torch's SyncBatchNorm runs only on GPUs; this one needs only all-gather and all-reduce, so CPU
workers on gloo get it too and a test can compare it with one process. In training, each layer's
statistics are the mean and variance over every rank's samples: forward, one all-gather of each
rank's (count, mean, sum of squared deviations), combined with Chan et al.'s parallel formula (a
sum of squares minus the squared mean would cancel catastrophically for channels whose variance is
small next to their mean); backward, one all-reduce of the two sums the input gradient needs. The
statistics then do not depend on how the global batch is split over workers. In evaluation it is
plain BatchNorm with the running statistics, which are the same on every rank.

Gradients follow the platform's contract (``comm.py``): the weight and bias gradients are each
rank's own sums, which DDP averages; the input gradient uses the global sums of whatever gradient
arrives, so a world-size factor applied by the loss passes through unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from reid_platform.parallel.comm import all_gather_rows, all_reduce


class _GlobalBatchNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float):
        dims = [0, *range(2, x.dim())]  # every axis but the channels
        channels = x.shape[1]
        shape = [1, channels] + [1] * (x.dim() - 2)
        local_mean = x.mean(dims)
        local_m2 = (x - local_mean.view(shape)).square().sum(dims)
        local = torch.cat([x.new_tensor([x.numel() // channels]), local_mean, local_m2]).double()
        ranks = all_gather_rows(local[None])  # (world size, 1 + 2C)
        counts, means, m2s = ranks[:, :1], ranks[:, 1 : 1 + channels], ranks[:, 1 + channels :]
        total = counts.sum()
        mean = (counts * means).sum(0) / total
        var = (m2s.sum(0) + (counts * (means - mean).square()).sum(0)) / total
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype), alpha=momentum)
            unbiased = var * total / max(float(total) - 1, 1.0)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        invstd = (var + eps).rsqrt().to(x.dtype).view(shape)
        normalised = (x - mean.to(x.dtype).view(shape)) * invstd
        ctx.save_for_backward(normalised, weight, invstd)
        ctx.total, ctx.dims, ctx.shape = float(total), dims, shape
        return normalised * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, grad):
        normalised, weight, invstd = ctx.saved_tensors
        dims, shape = ctx.dims, ctx.shape
        grad_weight = (grad * normalised).sum(dims)
        grad_bias = grad.sum(dims)
        grad_normalised = grad * weight.view(shape)
        sums = torch.cat([grad_normalised.sum(dims), (grad_normalised * normalised).sum(dims)])
        all_reduce(sums)
        channels = normalised.shape[1]
        mean_grad = (sums[:channels] / ctx.total).view(shape)
        mean_grad_normalised = (sums[channels:] / ctx.total).view(shape)
        grad_input = invstd * (grad_normalised - mean_grad - normalised * mean_grad_normalised)
        return grad_input, grad_weight, grad_bias, None, None, None, None


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Drop-in for BatchNorm1d/2d with affine parameters and running statistics."""

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        self.num_batches_tracked.add_(1)
        return _GlobalBatchNorm.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum, self.eps)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by ``SyncBatchNorm`` holding the same state.

    The engine applies it from outside the model, as it applies DDP. (In one process it computes
    what BatchNorm does.)
    """
    for name, child in module.named_children():
        if isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            synced = SyncBatchNorm(child.num_features, child.eps, child.momentum, affine=True, track_running_stats=True)
            synced.load_state_dict(child.state_dict())
            synced.weight.requires_grad_(child.weight.requires_grad)
            synced.bias.requires_grad_(child.bias.requires_grad)
            setattr(module, name, synced.to(child.weight.device))
        else:
            convert_sync_batchnorm(child)
    return module
