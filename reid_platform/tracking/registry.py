"""Model registry: publish a trained model directory, list and promote versions, pull one back."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from reid_platform.tracking.server import redact

def log_model_dir(tracking_uri: str, run_id: str, model_dir: Path, artifact_path: str) -> str:
    """Log a model directory as the run's ``artifact_path`` artifact; returns its artifact URI."""
    client = MlflowClient(tracking_uri)
    client.log_artifacts(run_id, str(model_dir), artifact_path)
    return f"{client.get_run(run_id).info.artifact_uri}/{artifact_path}"


def register_model(tracking_uri: str, run_id: str, source: str, name: str, alias: str) -> str:
    """Register ``source`` of ``run_id`` as a version of ``name`` and point ``alias`` at it; returns
    the version.

    Idempotent: a version of this run and source that exists already is reused, so a retry after a
    lost reply (or a restart of a finished run) never creates a second version of the same model.
    """
    client = MlflowClient(tracking_uri)
    try:
        client.create_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    found = [v for v in client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'") if v.source == source]
    if found:
        version = str(min(int(v.version) for v in found))
    else:
        version = str(client.create_model_version(name, source, run_id=run_id).version)
    client.set_registered_model_alias(name, alias, version)
    return version


def parse_model_reference(reference: str) -> tuple[str, str | None, str | None]:
    """'NAME@ALIAS', 'NAME/VERSION' or the same as a models:/ URI -> (name, alias, version)."""
    body = reference.removeprefix("models:/")
    name, at, alias = body.partition("@")
    if at and name and alias and "/" not in alias:
        return name, alias, None
    name, slash, version = body.rpartition("/")
    if slash and name and version.isdigit():
        return name, None, version
    raise ValueError(f"model reference {reference!r} is not NAME@ALIAS, NAME/VERSION or models:/...")


def pull_model(tracking_uri: str, reference: str, out: Path) -> Path:
    """Download a registered model directory to ``out``; returns the directory holding model.json.

    The version is resolved with a client bound to ``tracking_uri`` (MLflow's models:/ download
    would consult the process-wide registry URI instead).
    """
    name, alias, version = parse_model_reference(reference)
    client = MlflowClient(tracking_uri)
    try:
        found = client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
        source = client.get_model_version_download_uri(name, found.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(out), tracking_uri=tracking_uri)
    except MlflowException as error:
        raise ValueError(f"cannot pull {reference} from {redact(tracking_uri)}: {error.message}") from None
    return Path(local)


@dataclass(frozen=True)
class ModelVersionRow:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str
    created_ms: int
    metrics: dict[str, float]  # the training run's final rank1 / mAP / mINP, where logged


def list_models(tracking_uri: str, name: str | None = None) -> list[ModelVersionRow]:
    """Every version of every registered model (or of ``name``), newest version first per model."""
    client = MlflowClient(tracking_uri)
    query = f"name = '{name}'" if name else None
    rows, aliases = [], {}
    for version in client.search_model_versions(query):
        if version.name not in aliases:  # version search results do not carry aliases: the model does
            aliases[version.name] = client.get_registered_model(version.name).aliases  # {alias: version}
        metrics = {}
        if version.run_id:
            logged = client.get_run(version.run_id).data.metrics
            metrics = {key: logged[key] for key in ("rank1", "mAP", "mINP") if key in logged}
        rows.append(
            ModelVersionRow(
                version.name, str(version.version),
                tuple(sorted(a for a, v in aliases[version.name].items() if str(v) == str(version.version))),
                version.run_id or "", version.creation_timestamp, metrics,
            )
        )  # fmt: skip
    return sorted(rows, key=lambda row: (row.name, -int(row.version)))


def promote(tracking_uri: str, name: str, version: str, alias: str) -> None:
    """Point ``alias`` of model ``name`` at ``version`` (moving it from any other version)."""
    client = MlflowClient(tracking_uri)
    try:
        client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        known = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
        raise ValueError(
            f"registered model {name!r} has no version {version}"
            + (f" (versions: {', '.join(map(str, known))})" if known else " (no such model)")
        ) from None
    client.set_registered_model_alias(name, alias, version)
