"""What the embedding network is, and the input preprocessing a trained network expects.

``ModelConfig`` is the ``model`` section of a run config and, without the training-only fields, the
architecture record a model directory stores. ``Preprocessing`` is the input record it stores:
everything an application needs to feed the network (timm keeps the same record with its models).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, field_validator

from reid_platform.section import Section

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")
IBN_RESNETS = tuple(f"{name}_ibn_a" for name in RESNETS)
TIMM_PREFIX = "timm/"
PRETRAINED_NAMES = ("none", "imagenet")  # anything else is a path


class ModelConfig(Section):
    arch: str = Field(
        "resnet50",
        description=f"{', '.join(RESNETS + IBN_RESNETS)}, or {TIMM_PREFIX}NAME for any timm model "
        "(e.g. timm/convnext_tiny, timm/vit_small_patch16_224).",
    )
    pretrained: str = Field(
        "none",
        description="none; imagenet (torchvision's recommended ImageNet weights of the architecture, or timm's "
        "default pretrained tag, through their caches); or the path of a local state dict.",
    )
    embedding_dim: int | None = Field(
        None, ge=8, description="Linear projection after pooling; None keeps the backbone width."
    )
    last_stride: Literal[1, 2] = Field(
        1, description="1 removes the stride of the last stage where the family has one (ResNets); others keep theirs."
    )
    pooling: Literal["avg", "gem"] = Field("avg", description="gem: generalised mean with a learnable p (init 3).")
    sync_bn: bool = Field(False, description="BatchNorm statistics over the global batch, whatever its split.")

    # how the network is initialised and trained: not part of a trained model's description
    TRAINING_ONLY: ClassVar[frozenset[str]] = frozenset({"pretrained", "sync_bn"})

    @field_validator("arch")
    @classmethod
    def _known_family(cls, arch: str) -> str:
        if arch in RESNETS + IBN_RESNETS or (arch.startswith(TIMM_PREFIX) and len(arch) > len(TIMM_PREFIX)):
            return arch
        raise ValueError(
            f"unknown backbone {arch!r}; choose one of {', '.join(RESNETS + IBN_RESNETS)} or "
            f"{TIMM_PREFIX}NAME for a timm model (timm.list_models() lists them)"
        )

    @property
    def timm_name(self) -> str | None:
        return self.arch.removeprefix(TIMM_PREFIX) if self.arch.startswith(TIMM_PREFIX) else None

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
