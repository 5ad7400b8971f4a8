"""Model registry: publish a trained model directory, and pull one back by name and alias."""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

MODEL_ARTIFACT = "model"


def log_model_dir(tracking_uri: str, run_id: str, model_dir: Path) -> str:
    """Log a model directory as the run's ``model`` artifact; returns its artifact URI."""
    client = MlflowClient(tracking_uri)
    client.log_artifacts(run_id, str(model_dir), MODEL_ARTIFACT)
    return f"{client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"


def register_model(tracking_uri: str, run_id: str, source: str, name: str, alias: str) -> str:
    """Register ``source`` as a new version of ``name`` and point ``alias`` at it; returns the version."""
    client = MlflowClient(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    version = client.create_model_version(name, source, run_id=run_id).version
    client.set_registered_model_alias(name, alias, version)
    return version


def parse_model_reference(reference: str) -> str:
    """'NAME@ALIAS', 'NAME/VERSION' or a models:/ URI -> a models:/ URI."""
    if reference.startswith("models:/"):
        return reference
    if "@" in reference or "/" in reference:
        return f"models:/{reference}"
    raise ValueError(f"model reference {reference!r} is not NAME@ALIAS, NAME/VERSION or models:/...")


def pull_model(tracking_uri: str, reference: str, out: Path) -> Path:
    """Download a registered model directory to ``out``; returns the directory holding model.json."""
    mlflow.set_tracking_uri(tracking_uri)
    uri = parse_model_reference(reference)
    try:
        local = mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(out))
    except MlflowException as error:
        raise ValueError(f"cannot pull {uri} from {tracking_uri}: {error.message}") from None
    return Path(local)
