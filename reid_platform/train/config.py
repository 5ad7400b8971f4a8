"""The ``train`` section: what the training engine reads (optimisation, schedule, precision)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from reid_platform.section import Section

Precision = Literal["auto", "fp32", "bf16"]


def autocast_precision(precision: Precision, native_bf16: bool) -> Literal["fp32", "bf16"]:
    """What ``train.precision`` runs the backbone in on a device that has native bf16 or not: auto is
    bf16 only where it is native (GPUs of Ampere and newer: emulated bf16 is slower than fp32)."""
    if precision == "auto":
        return "bf16" if native_bf16 else "fp32"
    return precision


class TrainConfig(Section):
    epochs: int = Field(60, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "adam", description="For the backbone and, row by row, for the sharded classifier."
    )
    lr: float = Field(3.5e-4, gt=0.0, description="3.5e-4 suits Adam (fast-reid's BoT/SBS); SGD wants about 0.01-0.05.")
    classifier_lr: float | None = Field(None, gt=0.0, description="Defaults to lr.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam and adamw only.")
    weight_decay: float = Field(5e-4, ge=0.0, description="L2 in the gradient (sgd, adam); decoupled for adamw.")
    warmup_epochs: int = Field(5, ge=0, description="Linear warm-up of the learning rate from 1%.")
    decay_start_epochs: int | None = Field(
        None, ge=0,
        description="The cosine decay to 1% begins here; None: at half of train.epochs (as fast-reid's SBS), "
        "train.epochs: never.",
    )

    @property
    def decay_start(self) -> int:
        if self.decay_start_epochs is not None:
            return self.decay_start_epochs
        return max(self.warmup_epochs, self.epochs // 2)
    freeze_backbone_epochs: int = Field(
        0, ge=0, description="Epochs at the start in which only the classifier and the neck train."
    )
    steps_per_epoch: int | None = Field(
        None, ge=1,
        description="At most this many steps per epoch (fast-reid's iters_per_epoch); None: one pass over the "
        "training set. For datasets where one pass is days.",
    )
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="Evaluate every N epochs; 0 only at the end.")
    precision: Precision = Field("auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPU.")
    channels_last: bool = Field(True, description="NHWC backbone on GPU (ignored on CPU).")
