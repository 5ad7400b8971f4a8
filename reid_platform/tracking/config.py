"""The ``tracking`` section: where the MLflow run and the registered model go."""

from __future__ import annotations

import os

from pydantic import Field

from reid_platform.section import Section

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingConfig(Section):
    uri: str = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
        description="Defaults to $MLFLOW_TRACKING_URI, then a local SQLite file. Credentials never go here: "
        "MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN from the environment.",
    )
    experiment: str = Field("reid", min_length=1)
    registered_model: str | None = None
    alias: str = Field("champion", min_length=1)
    outage_timeout_s: float = Field(
        900.0, gt=0.0,
        description="How long the end of training waits for an unreachable tracking server before failing.",
    )
    log_checkpoints_as_models: bool = Field(
        False, description="Every evaluated epoch's weights as a LoggedModel, with its metrics (search them by mAP)."
    )
    system_metrics: bool = Field(True, description="CPU, memory and GPU use of every node, one series per node.")
    system_metrics_interval_s: float = Field(10.0, gt=0.0, description="Seconds between system-metric samples.")


# An MLflow 3 client of a server that keeps its artifacts in S3 is told (GET /server-info) to fetch
# large files from presigned URLs of the bucket and to upload large ones there, bypassing the server.
# A client given only the server's URL may not reach the bucket (one inside the cluster, behind
# `kubectl port-forward`): reid's commands keep every transfer on that URL.
ARTIFACTS_THROUGH_THE_SERVER = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false", "MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "false"}


def artifacts_through_the_server() -> None:
    """Keep this process's (and its children's) artifact transfers on the tracking server's URL,
    unless the environment chose otherwise."""
    for name, value in ARTIFACTS_THROUGH_THE_SERVER.items():
        os.environ.setdefault(name, value)
