"""The packed shard format, version ``FORMAT_VERSION``: what `reid data pack` writes and every reader reads.

A packed split is WebDataset tar shards ``SPLIT-NNNNNN.tar``. Each sample is three tar members
sharing a dot-free key, ``SPLIT_NNNNNNNNN`` (``sample_key``: the split and the sample index):

- ``KEY.jpg``  JPEG bytes (the original file, or re-encoded for PNG sources and resizing),
- ``KEY.meta`` the ``META_FIELDS``, little-endian int64 each (``META_DTYPE``, ``META_BYTES``):
  ``LABEL`` (training label, the classifier row; -1 outside the training split), ``PERSON_ID``,
  ``CAMERA_ID`` and ``SAMPLE_INDEX`` (the sample's position in its split, 0 to N-1, in packing
  order). Raw integers rather than webdataset's ASCII ``cls``: DALI reads them exactly (as INT64) for
  any number of classes, and the index restores the original order after a sharded evaluation.
- ``KEY.json`` the source dataset and the path relative to its root, for errors and pictures.

Beside each ``S.tar`` lie:

- ``S.idx``, its DALI index, as DALI's ``wds2idx`` writes it: a header line ``VERSION COUNT``
  (``v1.2`` and the number of samples), then a line per sample of ``EXT OFFSET SIZE KEY.EXT`` per
  member, the data's byte offset and size in the tar (``IndexEntry``, ``read_index``, ``write_index``);
- ``S.samples.npy``, its sample table: one int64 row per sample, in shard order, of the
  ``TABLE_COLUMNS``: the meta fields (same positions, so ``LABEL`` ... ``SAMPLE_INDEX`` index a table
  row as they do a meta row) then the JPEG member's ``OFFSET`` and ``SIZE`` (``sample_table.py``;
  packs made before the tables have none, and are read from the index and the meta members).

``manifest.json`` (``manifest.py``) records ``FORMAT_VERSION`` and the ``META_FIELDS``; a change of
anything above is a change of this module and of ``FORMAT_VERSION``, and packs of another version
are refused when opened.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reid_platform.errors import DatasetError

FORMAT_VERSION = 1

IMAGE_EXT, META_EXT, SOURCE_EXT = "jpg", "meta", "json"  # the member extensions of a sample
INDEX_SUFFIX, TABLE_SUFFIX = ".idx", ".samples.npy"  # beside S.tar: S.idx and S.samples.npy

META_FIELDS = ("label", "person_id", "camera_id", "index")
LABEL, PERSON_ID, CAMERA_ID, SAMPLE_INDEX = range(len(META_FIELDS))  # columns of a meta (or table) row
META_DTYPE = np.dtype("<i8")
META_BYTES = META_DTYPE.itemsize * len(META_FIELDS)

TABLE_COLUMNS = (*META_FIELDS, "offset", "size")
OFFSET, SIZE = len(META_FIELDS), len(META_FIELDS) + 1  # the JPEG member's, in the tar
TABLE_DTYPE = np.dtype(np.int64)


def sample_key(split: str, index: int) -> str:
    """The tar key of the sample of ``split`` with sample index ``index``."""
    return f"{split}_{index:09d}"


def member_key(name: str) -> str:
    """The sample key of a tar member's name (``KEY.EXT``)."""
    return name.split(".", 1)[0]


def shard_pattern(split: str) -> str:
    """The file names of a split's shards, with ``%06d`` for the shard's number (WebDataset's writer)."""
    return f"{split}-%06d.tar"


def encode_meta(label: int, person_id: int, camera_id: int, index: int) -> bytes:
    """A sample's ``.meta`` member."""
    return np.array([label, person_id, camera_id, index], META_DTYPE).tobytes()


def decode_meta(raw: bytes) -> np.ndarray:
    """A ``.meta`` member as a (writable) int64 row, indexed by ``LABEL`` ... ``SAMPLE_INDEX``."""
    return np.frombuffer(raw, META_DTYPE).copy()


@dataclass(frozen=True)
class IndexEntry:
    """A sample line of a DALI index: the sample's key and each member's (offset, size) in the tar,
    by extension, in the tar's order."""

    key: str
    members: dict[str, tuple[int, int]]

    def line(self) -> str:
        members = self.members.items()
        return " ".join(f"{ext} {offset} {size} {self.key}.{ext}" for ext, (offset, size) in members)


@dataclass(frozen=True)
class ShardIndex:
    version: str  # of the index format, from its header ("v1.2")
    entries: list[IndexEntry]


def _refused(path: str | Path, number: int, what: str) -> DatasetError:
    return DatasetError(f"{path}:{number}: {what}; repack the shard")


def _header(path: str | Path, line: str) -> tuple[str, int]:
    fields = line.split()
    if len(fields) != 2 or not fields[1].isdecimal():
        raise _refused(path, 1, f"not a DALI index header (VERSION COUNT): {line.strip()[:80]!r}")
    return fields[0], int(fields[1])


def _entry(path: str | Path, number: int, line: str) -> IndexEntry:
    fields = line.split()
    if not fields or len(fields) % 4:
        what = f"not a DALI index line (EXT OFFSET SIZE NAME per member): {line.strip()[:80]!r}"
        raise _refused(path, number, what)
    key = member_key(fields[3])
    members = {}
    for ext, offset, size, name in zip(*[iter(fields)] * 4):
        if not (offset.isdecimal() and size.isdecimal() and name == f"{key}.{ext}"):
            raise _refused(path, number, f"member {ext} {offset} {size} {name} of sample {key} is malformed")
        members[ext] = (int(offset), int(size))
    return IndexEntry(key, members)


def index_sample_count(index_path: str | Path) -> int:
    """Samples in a shard, from the header of its DALI index (its other lines are not read)."""
    with open(index_path) as handle:
        return _header(index_path, handle.readline())[1]


def read_index(index_path: str | Path) -> ShardIndex:
    """A DALI index file; a malformed line raises a ``DatasetError`` naming the file and line."""
    with open(index_path) as handle:
        version, _ = _header(index_path, handle.readline())
        entries = [_entry(index_path, number, line) for number, line in enumerate(handle, 2)]
    return ShardIndex(version, entries)


def write_index(index_path: str | Path, index: ShardIndex) -> None:
    lines = [f"{index.version} {len(index.entries)}", *(entry.line() for entry in index.entries)]
    Path(index_path).write_text("\n".join(lines) + "\n")
