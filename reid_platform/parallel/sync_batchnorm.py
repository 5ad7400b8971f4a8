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

from reid_platform.errors import ConfigError
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
    """Drop-in for BatchNorm1d/2d/3d with affine parameters and running statistics. A norm-act layer
    (timm's ``BatchNormAct2d``) keeps its dropout and activation, applied after the normalisation as
    there (``drop`` then ``act``, under the same names, so that state dicts still match)."""

    def __init__(
        self,
        num_features: int,
        eps: float,
        momentum: float,
        drop: nn.Module | None = None,
        act: nn.Module | None = None,
    ):
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True)
        self.drop = drop if drop is not None else nn.Identity()
        self.act = act if act is not None else nn.Identity()

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        if not self.training:
            x = F.batch_norm(
                x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps
            )
        else:
            self.num_batches_tracked.add_(1)
            x = _GlobalBatchNorm.apply(
                x, self.weight, self.bias, self.running_mean, self.running_var, self.momentum, self.eps
            )
        return self.act(self.drop(x))


def convert_sync_batchnorm(module: nn.Module, prefix: str = "") -> nn.Module:
    """``module`` with every BatchNorm layer replaced by ``SyncBatchNorm`` holding the same state.

    The engine applies it from outside the model, as it applies DDP. (In one process it computes
    what BatchNorm does.) A BatchNorm this cannot reproduce (another subclass, no affine parameters or
    running statistics, a cumulative average) is a ConfigError naming the layer, not a silently
    different network.
    """
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            drop, act = _norm_act_parts(child, path)
            synced = SyncBatchNorm(child.num_features, child.eps, child.momentum, drop, act)
            synced.to(child.weight.device, child.weight.dtype).load_state_dict(child.state_dict())
            synced.weight.requires_grad_(child.weight.requires_grad)
            synced.bias.requires_grad_(child.bias.requires_grad)
            synced.train(child.training)
            setattr(module, name, synced)
        else:
            convert_sync_batchnorm(child, f"{path}.")
    return module


def _norm_act_parts(
    norm: nn.modules.batchnorm._BatchNorm, path: str
) -> tuple[nn.Module | None, nn.Module | None]:
    """(dropout, activation) that follow the normalisation inside ``norm`` (None for plain BatchNorm);
    ConfigError where SyncBatchNorm would compute something else."""
    from timm.layers.norm_act import BatchNormAct2d

    needs = {
        "affine parameters": norm.affine,
        "running statistics": norm.track_running_stats,
        "momentum (it averages cumulatively)": norm.momentum is not None,
    }
    missing = [what for what, present in needs.items() if not present]
    if missing:
        raise ConfigError(
            f"model.sync_bn: layer {path} has no {' or '.join(missing)}, which SyncBatchNorm needs; "
            "set model.sync_bn: false for this backbone"
        )
    if type(norm) in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, SyncBatchNorm):
        return getattr(norm, "drop", None), getattr(norm, "act", None)
    if type(norm) is BatchNormAct2d:
        return norm.drop, norm.act
    raise ConfigError(
        f"model.sync_bn: layer {path} is a {type(norm).__module__}.{type(norm).__qualname__}, whose forward "
        "SyncBatchNorm cannot reproduce; set model.sync_bn: false for this backbone"
    )
