"""The sections the training engine and the Ray launcher read: ``train``, ``scaling`` and ``run``."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from reid_platform.section import Section

Precision = Literal["auto", "fp32", "bf16"]


class TrainConfig(Section):
    epochs: int = Field(60, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = Field(
        "sgd", description="For the backbone and, row by row, for the sharded classifier."
    )
    lr: float = Field(0.01, gt=0.0)
    classifier_lr: float | None = Field(None, gt=0.0, description="Defaults to lr.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="sgd only.")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam and adamw only.")
    weight_decay: float = Field(5e-4, ge=0.0, description="L2 in the gradient (sgd, adam); decoupled for adamw.")
    warmup_epochs: int = Field(5, ge=0)
    freeze_backbone_epochs: int = Field(
        0, ge=0, description="Epochs at the start in which only the classifier and the neck train."
    )
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="Evaluate every N epochs; 0 only at the end.")
    precision: Precision = Field("auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPU.")
    channels_last: bool = Field(True, description="NHWC backbone on GPU (ignored on CPU).")


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)


class RunSection(Section):
    name: str = Field("reid", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: Path = Path("runs/ray")
    output_dir: Path = Path("runs/reid")
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts from the latest checkpoint before the job fails; -1 = no limit."
    )
