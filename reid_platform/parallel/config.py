"""The ``loss`` section: the class-level margin loss over the sharded classifier, and its sampling."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from reid_platform.section import Section

LossName = Literal["circle", "cosface", "arcface", "softmax"]


class LossConfig(Section):
    name: LossName = "circle"
    scale: float = Field(128.0, gt=0.0, description="Circle's gamma (128 for re-ID in the paper); s otherwise.")
    margin: float = Field(
        0.25, ge=0.0, lt=1.0, description="Circle relaxation m (< 0.5), CosFace cosine or ArcFace angle margin."
    )
    sample_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="Fraction of classes per step (Partial FC); 1 = exact full loss."
    )

    @model_validator(mode="after")
    def _circle_margin(self) -> LossConfig:
        if self.name == "circle" and self.margin >= 0.5:
            raise ValueError(
                f"loss.margin must be below 0.5 for circle (got {self.margin}): the decision "
                "boundaries D_p = 1 - m and D_n = m would cross"
            )
        return self
