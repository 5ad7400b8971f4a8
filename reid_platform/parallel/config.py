"""The ``loss`` section: the class-level margin loss over the sharded classifier, its sampling and
label smoothing, and an optional pair-wise loss over the global batch added to it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from reid_platform.section import Section

LossName = Literal["circle", "cosface", "arcface", "softmax"]

# the pair-wise losses' usual settings: Circle's for pair-wise labels (Sun et al. 2020, sec. 4.1), BoT's triplet
PAIRWISE_DEFAULTS = {"circle": {"scale": 80.0, "margin": 0.4}, "triplet": {"scale": 1.0, "margin": 0.3}}


class PairwiseConfig(Section):
    name: Literal["circle", "triplet"]
    weight: float = Field(1.0, gt=0.0, le=100.0, description="Added to the class-level loss with this factor.")
    scale: float = Field(gt=0.0, description="circle: gamma (default 80); unused by triplet.")
    margin: float = Field(ge=0.0, lt=2.0, description="circle: relaxation m (default 0.4, < 0.5); triplet: margin (default 0.3).")
    soft: bool = Field(False, description="triplet: soft margin, softplus(d_ap - d_an), instead of the hinge.")

    @model_validator(mode="before")
    @classmethod
    def _defaults_of_the_loss(cls, data):
        if isinstance(data, dict) and data.get("name") in PAIRWISE_DEFAULTS:
            return {**PAIRWISE_DEFAULTS[data["name"]], **{key: value for key, value in data.items() if value is not None}}
        return data

    @model_validator(mode="after")
    def _ranges(self) -> PairwiseConfig:
        if self.name == "circle" and self.margin >= 0.5:
            raise ValueError(f"loss.pairwise.margin must be below 0.5 for circle (got {self.margin})")
        if self.soft and self.name != "triplet":
            raise ValueError("loss.pairwise.soft is a triplet option")
        return self


class LossConfig(Section):
    name: LossName = "circle"
    scale: float = Field(128.0, gt=0.0, description="Circle's gamma (128 for re-ID in the paper); s otherwise.")
    margin: float = Field(
        0.25, ge=0.0, lt=1.0, description="Circle relaxation m (< 0.5), CosFace cosine or ArcFace angle margin."
    )
    sample_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="Fraction of classes per step (Partial FC); 1 = exact full loss."
    )
    label_smoothing: float = Field(
        0.0, ge=0.0, lt=1.0, description="epsilon of label smoothing over the classes (0.1 in fast-reid's SBS)."
    )
    pairwise: PairwiseConfig | None = Field(
        None, description="A pair-wise loss over the global batch (needs input.sampler identity): circle or triplet."
    )

    @model_validator(mode="after")
    def _circle_margin(self) -> LossConfig:
        if self.name == "circle" and self.margin >= 0.5:
            raise ValueError(
                f"loss.margin must be below 0.5 for circle (got {self.margin}): the decision "
                "boundaries D_p = 1 - m and D_n = m would cross"
            )
        return self
