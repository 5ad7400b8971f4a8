"""The model of an index: loaded by reference and stamped (``ModelStamp``), so that an index records
what embedded its gallery and search embeds queries with the same weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

from reid_platform.model.artifact import WEIGHTS, load_model_dir
from reid_platform.search.index import GalleryIndex, ModelStamp


def weights_digest(directory: Path) -> str:
    digest = hashlib.sha256()
    with (directory / WEIGHTS).open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_stamped_model(reference: str, tracking_uri: str | None, scratch: Path, flip: bool):
    """(model, preprocessing, stamp) of a model directory or a registered model (NAME@ALIAS,
    NAME/VERSION, models:/...), pulled into ``scratch`` at the version the reference resolves to now."""
    name = version = run_id = None
    directory = Path(reference)
    if not directory.is_dir():
        from reid_platform.tracking.registry import pull_model, resolve_version

        found = resolve_version(tracking_uri, reference)
        name, version, run_id = found.name, str(found.version), found.run_id or None
        directory = pull_model(tracking_uri, f"{name}/{version}", scratch)  # that version, even if the alias moves
    model, preprocessing = load_model_dir(directory)
    stamp = ModelStamp(reference, name, version, run_id, model.feature_dim, flip, weights_digest(directory))
    return model, preprocessing, stamp


def index_model_reference(index_stamp: ModelStamp) -> str:
    """What to load for queries of an index: its registered version (not the alias, which may have
    moved since the build), or its model directory."""
    if index_stamp.name and index_stamp.version:
        return f"{index_stamp.name}/{index_stamp.version}"
    return index_stamp.reference


def load_index_model(index: GalleryIndex, tracking_uri: str | None, scratch: Path, reference: str | None = None):
    """(model, preprocessing) that embeds queries for ``index``: its own model, or ``reference`` when
    that is the same model (a ConfigError naming both otherwise)."""
    model, preprocessing, stamp = load_stamped_model(
        reference or index_model_reference(index.model), tracking_uri, scratch, index.model.flip
    )
    index.model.check_matches(stamp, str(index.directory))
    return model, preprocessing
