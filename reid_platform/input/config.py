"""The ``input`` section: how training batches are read, augmented and batched."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from reid_platform.model.config import Preprocessing


class InputConfig(Preprocessing):
    """The model's preprocessing (size, mean, std) plus what training adds to it."""

    batch_size: int = Field(64, ge=2, description="Images per worker per step.")
    num_threads: int = Field(2, ge=1, description="DALI CPU threads (or DataLoader workers) per worker.")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    pad: int = Field(10, ge=0, description="Pixels of zero padding before the random crop.")
    shuffle_buffer: int = Field(1024, ge=1, description="DALI reader shuffle buffer (initial_fill).")
    erasing_prob: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Random erasing as torchvision's: 2-33% of the area, aspect 0.3-3.3, zeros after normalisation.",
    )
    brightness: float = Field(0.0, ge=0.0, description="Colour jitter: factor drawn from [1-b, 1+b]; 0 is off.")
    contrast: float = Field(0.0, ge=0.0)
    saturation: float = Field(0.0, ge=0.0)
    hue: float = Field(0.0, ge=0.0, le=0.5, description="Shift drawn from [-h, h] of the hue circle.")
    backend: Literal["dali", "torch"] = Field(
        "dali", description="torch: webdataset + torchvision + DataLoader, the same transforms (baseline, no DALI)."
    )
    sampler: Literal["shuffle", "identity"] = Field(
        "shuffle", description="identity: batches of batch_size / images_per_identity identities x images_per_identity."
    )
    images_per_identity: int = Field(4, ge=1, description="K of P x K identity-balanced batches.")
    stage_objects: bool = Field(
        True,
        description="DALI reads shards in an object store from whole local copies, fetched once per node "
        "($REID_STAGE_DIR, else the temporary folder; kept for the next run while the object keeps its ETag): its reader makes a request per "
        "member there, about 30x slower than disk (benchmarks/object_store.py). false reads them in place, "
        "for datasets larger than a node's disk.",
    )

    @model_validator(mode="after")
    def _identity_batches_fit(self) -> InputConfig:
        if self.sampler == "identity":
            if self.backend != "dali":
                raise ValueError("input.sampler identity needs input.backend dali")
            if self.batch_size % self.images_per_identity:
                raise ValueError(
                    f"input.batch_size ({self.batch_size}) must be a multiple of input.images_per_identity "
                    f"({self.images_per_identity})"
                )
        return self
