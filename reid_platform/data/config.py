"""The ``data`` section: which packed dataset a run reads."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from reid_platform.section import Section
from reid_platform.storage.location import Location


class DataConfig(Section):
    shards: Location = Field(
        description="Folder written by `reid data pack` (holds manifest.json): a local path or s3://bucket/prefix."
    )
    s3_endpoint: str | None = Field(
        None,
        description="An S3-compatible store's endpoint (MinIO, Ceph RGW, R2, GCS) for s3:// locations; default "
        "AWS_ENDPOINT_URL, else AWS. Credentials never go here: they come from the AWS chain.",
    )
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
