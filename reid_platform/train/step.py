"""One optimisation step, the same code on CPU and GPU.

The device decides the fast path: on CUDA the backbone runs under bf16 autocast in channels-last
memory (tensor cores want NHWC); on CPU it stays fp32 and contiguous. The sharded classifier always
sees fp32 embeddings: Circle's scale of 128 puts logits far outside what bf16 resolves, and the
distributed log-sum-exp must agree across ranks to the last bit of its max.

Nothing here imports Ray or the config, so the GPU benchmark runs this step on a machine without them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch

from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.parallel.comm import undo_ddp_averaging

PrecisionName = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class StepSettings:
    """How a step runs on one device: autocast dtype (None = fp32) and memory format."""

    autocast_dtype: torch.dtype | None
    channels_last: bool

    @classmethod
    def for_device(cls, device: torch.device, precision: PrecisionName, channels_last: bool) -> StepSettings:
        cuda = device.type == "cuda"
        if precision == "auto":
            # native bf16 only (Ampere and newer): emulated bf16 on older GPUs is slower than fp32
            bf16 = cuda and torch.cuda.is_bf16_supported(including_emulation=False)
        else:
            bf16 = precision == "bf16"
        return cls(torch.bfloat16 if bf16 else None, channels_last and cuda)

    def autocast(self, device: torch.device):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=self.autocast_dtype)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def prepare_images(self, images: torch.Tensor, device: torch.device) -> torch.Tensor:
        images = images.to(device, non_blocking=True)
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images


def train_step(
    model: torch.nn.Module,
    classifier: ShardedClassifier,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    labels: torch.Tensor,
    classifier_lr: float,
    settings: StepSettings,
) -> torch.Tensor:
    """Forward, backward and update of backbone and classifier; returns the loss (not synchronised)."""
    device = next(model.parameters()).device
    with settings.autocast(device):
        embeddings = model(settings.prepare_images(images, device))
    embeddings = embeddings.float()
    undo_ddp_averaging(embeddings)
    loss = classifier(embeddings, labels.to(device, non_blocking=True))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    classifier.step(classifier_lr)
    return loss.detach()
