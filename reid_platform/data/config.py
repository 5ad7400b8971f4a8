"""The ``data`` section: which packed dataset a run reads."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from reid_platform.section import Section


class DataConfig(Section):
    shards: Path = Field(description="Directory written by `reid data pack` (holds manifest.json).")
    on_bad_sample: Literal["skip", "fail"] = Field(
        "skip",
        description="A training sample that no longer decodes: skip it (named in the job log, counted in "
        "MLflow as skipped_samples) or end the run naming it. Evaluation never skips.",
    )
    verify_at_start: Literal["size", "sha256"] = Field(
        "size",
        description="Before workers start, compare each shard's size (instant) or also its sha256 (reads "
        "every shard, in parallel) with the manifest.",
    )
