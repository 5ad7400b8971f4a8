"""The MLflow tracking service seen from our side: serve one locally and check that one is reachable.
The URIs its errors quote go through ``reid_platform.redaction``."""

from __future__ import annotations

from pathlib import Path

import requests

from reid_platform.errors import TrackingUnavailable
from reid_platform.redaction import redact
from reid_platform.storage.location import S3Uri

# A server that is up answers /health in milliseconds; MLflow's own client would retry for minutes, and a
# command must say within seconds (10 s, imports included) that the server is not there.
HEALTH_TIMEOUT_S = 3.0
WHAT_TO_CHECK = (
    "check that it runs (reid mlflow serve starts one) and the URI (--tracking-uri, tracking.uri or MLFLOW_TRACKING_URI)"
)


def check_reachable(uri: str, timeout_s: float = HEALTH_TIMEOUT_S) -> None:
    """Raise TrackingUnavailable, naming the URI (redacted), if runs cannot be logged to ``uri``.

    HTTP(S) servers must answer /health; a SQLite store needs an existing folder for its file.
    Other stores (databricks, SQL databases) are left to MLflow.
    """
    if uri.startswith(("http://", "https://")):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.Timeout:
            raise TrackingUnavailable(
                f"MLflow tracking server {redact(uri)} is unreachable (no answer within {timeout_s:g} s); "
                + WHAT_TO_CHECK
            ) from None
        except requests.RequestException as error:
            raise TrackingUnavailable(
                f"MLflow tracking server {redact(uri)} is unreachable ({type(error).__name__}); {WHAT_TO_CHECK}"
            ) from None
        if response.status_code != 200:
            raise TrackingUnavailable(
                f"MLflow tracking server {redact(uri)} answered /health with HTTP {response.status_code}"
            )
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise TrackingUnavailable(f"MLflow SQLite store {redact(uri)}: folder {folder} does not exist")


def serve_command(
    host: str, port: int, backend_store_uri: str, artifacts: Path | S3Uri, workers: int, allowed_hosts: str | None = None
) -> tuple[list[str], dict[str, str]]:
    """Arguments of ``mlflow server`` for one machine, and the environment it adds: SQLite runs and
    registry, artifacts proxied from a local folder or an S3 prefix. With ``--serve-artifacts`` clients
    upload and download through the server, so training workers and people pulling models need only
    its URL: neither the artifact folder nor the bucket's credentials, which only the server's
    environment holds (the AWS chain, ``AWS_ENDPOINT_URL`` for MinIO and the like). MLflow answers only
    requests whose Host header it allows (localhost and private addresses by default): a server
    reached by a DNS name needs ``allowed_hosts``. The store URI goes through the environment
    (MLflow's MLFLOW_BACKEND_STORE_URI), not the arguments, which every user of the machine can read
    (``ps``, /proc/PID/cmdline): a database's URI holds its password."""
    arguments = [
        "server",
        "--artifacts-destination", str(artifacts if isinstance(artifacts, S3Uri) else artifacts.resolve()),
        "--serve-artifacts",
        "--host", host, "--port", str(port), "--workers", str(workers),
        *(["--allowed-hosts", allowed_hosts] if allowed_hosts else []),
    ]  # fmt: skip
    return arguments, {"MLFLOW_BACKEND_STORE_URI": backend_store_uri}
