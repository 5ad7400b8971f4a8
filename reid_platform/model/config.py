"""What the embedding network is, and the input preprocessing a trained network expects.

``ModelConfig`` is the ``model`` section of a run config and, without the training-only fields, the
architecture record a model directory stores. ``Preprocessing`` is the input record it stores:
everything an application needs to feed the network (timm keeps the same record with its models).
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Literal

from pydantic import Field

from reid_platform.section import Section

Arch = Literal["resnet18", "resnet34", "resnet50", "resnet101"]


class ModelConfig(Section):
    arch: Arch = "resnet50"
    embedding_dim: int | None = Field(
        None, ge=8, description="Linear projection after pooling; None keeps the backbone width."
    )
    last_stride: Literal[1, 2] = 1
    pretrained_weights: Path | None = Field(
        None, description="Local torchvision state dict; nothing is ever downloaded."
    )

    # how the weights were initialised for training: not part of a trained model's description
    TRAINING_ONLY: ClassVar[frozenset[str]] = frozenset({"pretrained_weights"})

    def architecture(self) -> dict:
        """The fields that rebuild the network around saved weights."""
        return self.model_dump(mode="json", exclude=set(self.TRAINING_ONLY))


class Preprocessing(Section):
    """Resize to (height, width), scale to [0, 1], then normalise each channel with mean and std."""

    height: int = Field(256, ge=32, le=1024)
    width: int = Field(128, ge=16, le=1024)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @classmethod
    def of(cls, config: Preprocessing) -> Preprocessing:
        """Only the preprocessing of ``config`` (an ``InputConfig`` extends it with augmentation)."""
        return cls.model_validate(config.model_dump(include=set(cls.model_fields)))
