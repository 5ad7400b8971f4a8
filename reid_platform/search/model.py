"""The model of an index: resolved from a reference once, stamped (``ModelStamp``), and shipped as its
files to whatever embeds (the builder's actors, the service's replicas, ``reid search``), so that an
index records what embedded its gallery and queries are embedded with the same weights."""

from __future__ import annotations

import hashlib
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from reid_platform.model.artifact import DESCRIPTION, WEIGHTS, load_model_dir
from reid_platform.search.index import GalleryIndex, ModelStamp

FLIP_PARAM = "evaluation.flip"  # the training run's param that says its evaluation used flip


@dataclass(frozen=True)
class GalleryModel:
    """A model ready to ship to actors and replicas: its directory's files, and its stamp."""

    files: dict[str, bytes]  # model.json and model.safetensors
    stamp: ModelStamp

    @property
    def fingerprint(self) -> str:
        """Of the weights, the description and flip: what the embeddings of a part depend on."""
        digest = hashlib.sha256()
        for name in sorted(self.files):
            digest.update(name.encode() + b"\0" + hashlib.sha256(self.files[name]).digest())
        digest.update(b"flip" if self.stamp.flip else b"noflip")
        return digest.hexdigest()


def load_files(files: dict[str, bytes]):
    """(network, preprocessing) of a GalleryModel's files, in the process that embeds."""
    with tempfile.TemporaryDirectory() as scratch:
        for name, data in files.items():
            (Path(scratch) / name).write_bytes(data)
        return load_model_dir(scratch)


def resolve_model(reference: str, tracking_uri: str | None, flip: bool | None = None) -> GalleryModel:
    """The model a reference names: a model directory, or a registered version (NAME@ALIAS,
    NAME/VERSION, models:/...) pulled from ``tracking_uri`` at the version the reference resolves to
    now. ``flip`` None: as the version's training run evaluated (its ``evaluation.flip`` param; a
    directory records none: no flip)."""
    directory = Path(reference)
    if directory.is_dir():
        return _model_of(directory, ModelStamp(str(directory.resolve()), None, None, None, 0, bool(flip)))
    from mlflow.tracking import MlflowClient

    from reid_platform.tracking.registry import pull_model, resolve_version

    version = resolve_version(tracking_uri, reference)
    if flip is None:
        params = MlflowClient(tracking_uri).get_run(version.run_id).data.params if version.run_id else {}
        flip = params.get(FLIP_PARAM, "False") == "True"
    with tempfile.TemporaryDirectory() as scratch:  # the resolved version, even if the alias moves meanwhile
        pulled = pull_model(tracking_uri, f"{version.name}/{version.version}", Path(scratch))
        stamp = ModelStamp(reference, version.name, str(version.version), version.run_id or None, 0, flip)
        return _model_of(pulled, stamp)


def _model_of(directory: Path, stamp: ModelStamp) -> GalleryModel:
    model, _ = load_model_dir(directory)  # refuses a broken directory here, before any actor starts
    files = {name: (directory / name).read_bytes() for name in (DESCRIPTION, WEIGHTS)}
    weights = hashlib.sha256(files[WEIGHTS]).hexdigest()
    return GalleryModel(files, replace(stamp, feature_dim=model.feature_dim, weights_sha256=weights))


def index_model_reference(index_stamp: ModelStamp) -> str:
    """What to load for queries of an index: its registered version (not the alias, which may have
    moved since the build), or its model directory."""
    if index_stamp.name and index_stamp.version:
        return f"{index_stamp.name}/{index_stamp.version}"
    return index_stamp.reference


def load_index_model(index: GalleryIndex, tracking_uri: str | None, reference: str | None = None) -> GalleryModel:
    """The model that embeds queries for ``index``: its own, or ``reference`` when that is the same
    model (a ConfigError naming both otherwise)."""
    model = resolve_model(reference or index_model_reference(index.model), tracking_uri, index.model.flip)
    index.model.check_matches(model.stamp, str(index.directory))
    return model
