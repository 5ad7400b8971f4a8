"""A gallery's entries, listed from where its crops are, and any entry's encoded image read back.

Three kinds of source (``list_entries``):

- packed shards (a folder or ``s3://`` prefix holding ``manifest.json``): the samples of one split
  (``gallery`` by default) or of all of them, in shard order; an entry's path is ``TAR#MEMBER``
  (``.../gallery-000000.tar#gallery_000000012.jpg``), its camera the packed camera id and its source
  the packed dataset the camera belongs to (``manifest.json`` records each dataset's camera offset);
- a folder of images (``.jpg``, ``.jpeg``, ``.png`` below it, sorted): cameras from the file names
  when every name follows the Market-1501 pattern (``0002_c1s1_000451_03.jpg``), else unknown;
- a CSV file of ``path[,camera_id[,timestamp]]`` rows, or any columns under a header that names
  ``path`` (and optionally ``camera_id`` or ``camera``, and ``timestamp``): paths relative to the
  file or ``s3://`` URIs, an empty camera unknown, timestamps seconds since the epoch or ISO 8601
  (UTC unless they say otherwise).

Entries are a pyarrow table of the index's metadata columns (``index.METADATA_SCHEMA``): camera -1 and
timestamp NaN where unknown. ``read_crop`` turns any entry's path back into its image's bytes: the
builder's actors read the gallery through it and the service shows crops with it. A packed sample
is one ranged read: its offset comes from the shard's sample table (or its DALI index), loaded once
per shard per process.
"""

from __future__ import annotations

import csv
import functools
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa

from reid_platform.data.datasets import parse_market_style_name
from reid_platform.data.manifest import MANIFEST, ShardDataset
from reid_platform.data.sample_table import SampleTable
from reid_platform.data.shard_format import (
    CAMERA_ID,
    IMAGE_EXT,
    INDEX_SUFFIX,
    OFFSET,
    SAMPLE_INDEX,
    SIZE,
    TABLE_SUFFIX,
    read_index,
    sample_key,
)
from reid_platform.errors import ConfigError, DatasetError
from reid_platform.model.inference import expand_image_paths
from reid_platform.search.index import METADATA_SCHEMA
from reid_platform.storage import files, location, s3
from reid_platform.storage.location import S3Uri

ALL_SPLITS = "all"
MEMBER_SEPARATOR = "#"  # TAR#MEMBER: a sample inside a packed shard


def list_entries(data: str, split: str = "gallery") -> pa.Table:
    """The entries of the gallery at ``data`` (shards, an image folder or a CSV file); a one-line
    DatasetError when it is missing or holds no image."""
    where = location.parse(data)
    if isinstance(where, S3Uri) or (where / MANIFEST).is_file():
        table, what = _shard_entries(where, split), f"no samples in the {split} split"
    elif where.is_dir():
        table, what = _folder_entries(where), "no .jpg, .jpeg or .png images below it"
    elif where.is_file():
        table, what = _csv_entries(where), "no rows"
    else:
        raise DatasetError(f"{data}: no such folder or file (packed shards, a folder of images or a CSV of paths)")
    if table.num_rows == 0:
        raise DatasetError(f"{data}: the gallery is empty ({what})")
    return table


def _table(paths: list[str], cameras, timestamps, sources) -> pa.Table:
    columns = [paths, cameras, timestamps, sources]
    return pa.table([pa.array(values, field.type) for values, field in zip(columns, METADATA_SCHEMA)], schema=METADATA_SCHEMA)


def _shard_entries(root: Path | S3Uri, split: str) -> pa.Table:
    dataset = ShardDataset.open(root if isinstance(root, S3Uri) else root.resolve())
    splits = list(dataset.splits) if split == ALL_SPLITS else [split]
    unknown = [name for name in splits if name not in dataset.splits]
    if unknown:
        raise ConfigError(f"{root}: no split {unknown[0]!r} (splits: {', '.join(dataset.splits)}, or {ALL_SPLITS})")
    # each source dataset's cameras start at its offset: a camera id names the dataset it came from
    offsets = sorted((int(source.get("camera_id_offset", 0)), str(source.get("dataset", ""))) for source in dataset.manifest.sources)
    starts = np.array([start for start, _ in offsets], np.int64)
    names = np.array([name for _, name in offsets] or [dataset.manifest.dataset], dtype=object)
    parts = []
    for name in splits:
        table = SampleTable.read(dataset, name)
        cameras = table.rows[:, CAMERA_ID]
        paths = [
            f"{table.tars[shard]}{MEMBER_SEPARATOR}{sample_key(name, int(index))}.{IMAGE_EXT}"
            for shard, index in zip(table.shard, table.rows[:, SAMPLE_INDEX])
        ]
        sources = names[np.maximum(np.searchsorted(starts, cameras, side="right") - 1, 0)] if len(starts) else names[[0] * len(paths)]
        parts.append(_table(paths, cameras, np.full(len(paths), np.nan), list(sources)))
    return pa.concat_tables(parts)


def _folder_entries(folder: Path) -> pa.Table:
    try:
        paths = expand_image_paths([folder.resolve()])
    except DatasetError:
        return _table([], [], [], [])
    try:
        cameras = [parse_market_style_name(path)[1] for path in paths]
    except DatasetError:  # not every name carries a camera: none is trusted
        cameras = [-1] * len(paths)
    return _table([str(path) for path in paths], cameras, [math.nan] * len(paths), [str(folder.resolve())] * len(paths))


def _csv_entries(path: Path) -> pa.Table:
    """Rows of a CSV of crops (see the module's docstring)."""
    path = path.resolve()
    with path.open(newline="") as handle:
        rows = [(number, row) for number, row in enumerate(csv.reader(handle), 1) if row and any(cell.strip() for cell in row)]
    columns = {"path": 0, "camera": 1, "timestamp": 2}
    if rows and "path" in [cell.strip().lower() for cell in rows[0][1]]:
        header = [cell.strip().lower() for cell in rows.pop(0)[1]]
        columns = {"path": header.index("path")}
        for name, aliases in (("camera", ("camera_id", "camera")), ("timestamp", ("timestamp",))):
            found = [header.index(alias) for alias in aliases if alias in header]
            if found:
                columns[name] = found[0]
    paths, cameras, timestamps = [], [], []
    for number, row in rows:
        cell = {name: row[column].strip() if column < len(row) else "" for name, column in columns.items()}
        if not cell["path"]:
            raise DatasetError(f"{path}:{number}: no path in the row")
        target = location.parse(cell["path"])
        paths.append(str(target if isinstance(target, S3Uri) else path.parent / target))
        try:
            cameras.append(int(cell["camera"]) if cell.get("camera") else -1)
        except ValueError:
            raise DatasetError(f"{path}:{number}: camera id must be a whole number, got {cell['camera']!r}") from None
        timestamps.append(_timestamp(cell.get("timestamp", ""), f"{path}:{number}"))
    return _table(paths, cameras, timestamps, [str(path)] * len(paths))


def seconds_since_epoch(text: str) -> float:
    """Seconds since the epoch from a number or an ISO 8601 time (UTC when it names no zone); a
    ValueError when it is neither."""
    try:
        return float(text)
    except ValueError:
        moment = datetime.fromisoformat(text)
    return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()


def _timestamp(text: str, where: str) -> float:
    """A CSV row's time (``seconds_since_epoch``); NaN if empty."""
    if not text:
        return math.nan
    try:
        return seconds_since_epoch(text)
    except ValueError:
        raise DatasetError(f"{where}: timestamp {text!r} is neither seconds since the epoch nor ISO 8601") from None


def read_crop(path: str) -> bytes:
    """The encoded image of an entry's ``path``: a file, an ``s3://`` object, or ``TAR#MEMBER`` (a
    sample of a packed shard, read by its offset). A DatasetError naming it when it cannot be read."""
    tar, separator, member = path.rpartition(MEMBER_SEPARATOR)
    try:
        if not separator:
            return files.read_bytes(location.parse(path))
        offset, size = _member_location(tar, member)
        if isinstance(shard := location.parse(tar), S3Uri):
            return s3.read_bytes(shard, offset, size)
        with open(shard, "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
    except OSError as error:
        raise DatasetError(f"{path}: cannot be read: {error.strerror or error}") from None
    if len(data) != size:
        raise DatasetError(f"{path}: the shard ends before the sample's {size} bytes; repack the shard")
    return data


def _member_location(tar: str, member: str) -> tuple[int, int]:
    """(offset, size) of ``member`` in the shard ``tar``: from its sample table for the image member,
    else from its DALI index."""
    key, _, extension = member.rpartition(".")
    split, _, number = key.rpartition("_")
    if extension == IMAGE_EXT and number.isdecimal() and location.parse(tar).name.startswith(f"{split}-"):
        table = _sample_table(tar)
        if table is not None:
            rows = table[table[:, SAMPLE_INDEX] == int(number)]
            if len(rows) and sample_key(split, int(number)) == key:
                return int(rows[0, OFFSET]), int(rows[0, SIZE])
    found = _index_members(tar).get(member)
    if found is None:
        raise DatasetError(f"{tar}{MEMBER_SEPARATOR}{member}: the shard has no such member")
    return found


def _beside(tar: str, suffix: str) -> Path | S3Uri:
    shard = location.parse(tar)
    return shard.parent / (shard.name.removesuffix(".tar") + suffix)


@functools.lru_cache(maxsize=256)
def _sample_table(tar: str) -> np.ndarray | None:
    """The shard's sample table (a local copy of an object's), or None for a pack made before them."""
    path = _beside(tar, TABLE_SUFFIX)
    if not files.is_file(path):
        return None
    return np.load(files.local_copy(path), allow_pickle=False)


@functools.lru_cache(maxsize=256)
def _index_members(tar: str) -> dict[str, tuple[int, int]]:
    """Every member of the shard by name, from its DALI index."""
    path = _beside(tar, INDEX_SUFFIX)
    if not files.is_file(path):
        raise DatasetError(f"{tar}: no DALI index {path.name} beside the shard; repack it")
    return {
        f"{entry.key}.{extension}": place
        for entry in read_index(files.local_copy(path)).entries for extension, place in entry.members.items()
    }  # fmt: skip
