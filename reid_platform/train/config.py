"""The sections the training engine and the Ray launcher read: ``train``, ``scaling`` and ``run``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

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


class ScalingConfig(Section):
    num_workers: int | tuple[int, int] = Field(
        2, description="N workers, or [MIN, MAX] for an elastic run: it starts with MIN available, goes on with "
        "fewer after losing workers (not below MIN) and grows back up to MAX when resources return.",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    elastic_batch: Literal["global", "per_worker"] = Field(
        "global",
        description="Elastic runs. global: the global batch (input.batch_size x MAX) is kept and every group "
        "size takes its share, so the optimisation is the same on any size; each size in the range must split "
        "it. per_worker: each worker keeps input.batch_size, so a smaller group takes smaller global batches "
        "and more steps per epoch (learning rates are not rescaled).",
    )
    start_timeout_s: float = Field(
        60.0, gt=0.0,
        description="How long a worker group may take to start (Ray Train's worker-group start timeout). Right "
        "after a node is lost, its resources can still look free: an elastic run first tries the old size and "
        "goes on with fewer workers only after this long.",
    )
    resize_interval_s: float = Field(
        60.0, gt=0.0, description="Elastic runs: how often a healthy worker group looks for resources to grow."
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _a_count_or_a_range(cls, value: Any) -> Any:
        # one message for every wrong shape, instead of pydantic's one per member of the union
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if is_int(value):
            return value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_int, value)):
            return value[0] if value[0] == value[1] else tuple(value)  # [N, N] is N workers
        raise ValueError("give a number of workers N or a range [MIN, MAX] of two integers")

    @field_validator("num_workers")
    @classmethod
    def _a_valid_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or low > high:
            raise ValueError("the number of workers must be at least 1, and a range [MIN, MAX] must have MIN <= MAX")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers


class RunSection(Section):
    name: str = Field("reid", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: Path = Path("runs/ray")
    output_dir: Path = Path("runs/reid")
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts from the latest checkpoint before the job fails; -1 = no limit."
    )
