"""Model registry: register a trained model, list and promote versions, pull one back.

A version's source is a LoggedModel's artifacts (the pyfunc flavour of ``logged_model.py``, the
version's ``model_id`` naming it), or for versions registered before it, a run's plain model
directory; both pull to a local model directory (``model.safetensors`` + ``model.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import mlflow
import mlflow.artifacts
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

from reid_platform.model.artifact import DESCRIPTION
from reid_platform.redaction import redact


def register_model(tracking_uri: str, run_id: str, source: str, name: str, alias: str, model_id: str | None = None) -> str:
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
        version = str(client.create_model_version(name, source, run_id=run_id, model_id=model_id).version)
    if model_id is not None:  # the link the UI shows on the LoggedModel (SQL registries keep no model_id)
        linked = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS, "[]"))
        if {"name": name, "version": version} not in linked:  # also when a retry found the version made
            linked.append({"name": name, "version": version})
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(linked)})
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


def resolve_version(tracking_uri: str, reference: str):
    """The registered ModelVersion ``reference`` names; a ValueError listing what exists otherwise."""
    name, alias, version = parse_model_reference(reference)
    client = MlflowClient(tracking_uri)
    try:
        return client.get_model_version_by_alias(name, alias) if alias else client.get_model_version(name, version)
    except MlflowException as error:
        if error.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise
    where = redact(tracking_uri)
    try:
        model = client.get_registered_model(name)
    except MlflowException:
        known = sorted(m.name for m in client.search_registered_models())
        raise ValueError(f"{where} has no registered model {name!r} (models: {', '.join(known) or 'none'})") from None
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name = '{name}'"))
    aliases = ", ".join(f"{a}->{v}" for a, v in sorted(model.aliases.items())) or "none"
    raise ValueError(
        f"registered model {name!r} at {where} has no {'alias ' + repr(alias) if alias else 'version ' + str(version)} "
        f"(aliases: {aliases}; versions: {', '.join(map(str, versions)) or 'none'})"
    ) from None


def check_servable(tracking_uri: str, version, reference: str) -> None:
    """A version registered before MLflow-native models is a plain model folder (no MLmodel), which
    MLflow cannot serve; a ValueError saying so."""
    try:
        names = {Path(item.path).name for item in mlflow.artifacts.list_artifacts(version.source, tracking_uri=tracking_uri)}
    except (MlflowException, OSError):
        names = set()
    if "MLmodel" not in names:
        raise ValueError(
            f"{reference} is a plain model folder (registered before MLflow-native models), which MLflow cannot "
            "serve; `reid models pull` and `reid embed` still use it, or train the run on to publish a servable version"
        )


def pull_model(tracking_uri: str, reference: str, out: Path) -> Path:
    """Download a registered model to ``out``; returns the model directory (the one holding model.json).

    The version is resolved with a client bound to ``tracking_uri`` (MLflow's models:/ download
    would consult the process-wide registry URI instead).
    """
    found = resolve_version(tracking_uri, reference)
    client = MlflowClient(tracking_uri)
    try:
        source = client.get_model_version_download_uri(found.name, found.version)
        local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(out), tracking_uri=tracking_uri)
    except MlflowException as error:
        raise ValueError(f"cannot pull {reference} from {redact(tracking_uri)}: {error.message}") from None
    directories = sorted(Path(local).rglob(DESCRIPTION))
    if len(directories) != 1:
        raise ValueError(f"{reference}: the pulled files hold {len(directories)} model directories ({DESCRIPTION}), expected one")
    return directories[0].parent


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
    resolve_version(tracking_uri, f"{name}/{version}")
    MlflowClient(tracking_uri).set_registered_model_alias(name, alias, version)
