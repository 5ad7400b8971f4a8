"""The MLflow tracking service seen from our side: serve one locally, check one is reachable, and
print tracking URIs (and error messages quoting them) without the passwords some of them carry."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

import requests

from reid_platform.errors import TrackingUnavailable

# scheme://user:password@ anywhere in a text; the password runs to the last '@' before a '/' or space
_CREDENTIALS = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^\s/@:]*):[^\s/]*@", re.IGNORECASE)


def redact(text: str) -> str:
    """``text`` with the password of every URI in it replaced by ***: safe to print and to log."""
    return _CREDENTIALS.sub(lambda m: f"{m['scheme']}{m['user']}:***@", text)


def has_password(uri: str) -> bool:
    try:
        return urlsplit(uri).password is not None
    except ValueError:  # e.g. an invalid port: let the redaction decide
        return redact(uri) != uri


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Raise TrackingUnavailable, naming the URI (redacted), if runs cannot be logged to ``uri``.

    HTTP(S) servers must answer /health; a SQLite store needs an existing folder for its file.
    Other stores (databricks, SQL databases) are left to MLflow.
    """
    if uri.startswith(("http://", "https://")):
        try:
            response = requests.get(uri.rstrip("/") + "/health", timeout=timeout_s)
        except requests.RequestException as error:
            raise TrackingUnavailable(
                f"MLflow tracking server {redact(uri)} is unreachable ({type(error).__name__}); "
                "start it (reid mlflow serve) or fix tracking.uri / MLFLOW_TRACKING_URI"
            ) from None
        if response.status_code != 200:
            raise TrackingUnavailable(
                f"MLflow tracking server {redact(uri)} answered /health with HTTP {response.status_code}"
            )
    elif uri.startswith("sqlite:///"):
        folder = Path(uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise TrackingUnavailable(f"MLflow SQLite store {uri}: folder {folder} does not exist")


def serve_arguments(
    host: str, port: int, backend_store_uri: str, artifacts: Path, workers: int, allowed_hosts: str | None = None
) -> list[str]:
    """Arguments of ``mlflow server`` for one machine: SQLite runs and registry, artifacts proxied
    from a local folder. With ``--serve-artifacts`` clients upload through the server, so training
    workers need only its URL, not the artifact folder. MLflow answers only requests whose Host header
    it allows (localhost and private addresses by default): a server reached by a DNS name needs
    ``allowed_hosts``."""
    return [
        "server",
        "--backend-store-uri", backend_store_uri,
        "--artifacts-destination", str(artifacts.resolve()),
        "--serve-artifacts",
        "--host", host, "--port", str(port), "--workers", str(workers),
        *(["--allowed-hosts", allowed_hosts] if allowed_hosts else []),
    ]  # fmt: skip
