"""Where every sample of a split lies, without opening its tar: one compact table per shard.

Packing writes, next to each shard ``S.tar``, the table ``S.samples.npy``: a row per sample of its
meta fields and the JPEG member's byte offset and size in the tar (``shard_format.py``). Whatever
picks samples itself (the identity sampler, the search for a sample that no longer decodes) loads
these few bytes per sample instead of reading every sample's meta member: at two million samples
that is a second of ``np.load`` instead of two million seeks. Shards packed before the tables
existed (no ``table`` in their manifest entry) are read the slow way, from index and meta members.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reid_platform.data.manifest import ShardDataset
from reid_platform.data.shard_format import (
    IMAGE_EXT,
    LABEL,
    META_BYTES,
    META_EXT,
    META_FIELDS,
    OFFSET,
    SAMPLE_INDEX,
    SIZE,
    TABLE_COLUMNS,
    TABLE_DTYPE,
    TABLE_SUFFIX,
    decode_meta,
    read_index,
    sample_key,
)
from reid_platform.errors import DatasetError
from reid_platform.storage import files, location, s3
from reid_platform.storage.location import S3Uri

# samples of a batch read from an object store at once
REMOTE_READS = 32


def table_rows(tar: str | Path, index_path: str | Path) -> np.ndarray:
    """The (samples, len(TABLE_COLUMNS)) table of one shard, read from its index and meta members."""
    rows = []
    with files.open_ranged(location.parse(tar)) as handle:
        for entry in read_index(index_path).entries:
            key, members = entry.key, entry.members
            if IMAGE_EXT not in members or META_EXT not in members:
                raise DatasetError(f"{index_path}: sample {key} lacks a {IMAGE_EXT} or {META_EXT} member")
            offset, size = members[META_EXT]
            if size != META_BYTES:
                raise DatasetError(
                    f"{tar}: sample {key} has a meta member of {size} bytes, {META_BYTES} expected"
                )
            handle.seek(offset)
            rows.append([*decode_meta(handle.read(size)), *members[IMAGE_EXT]])
    return np.array(rows, dtype=TABLE_DTYPE).reshape(-1, len(TABLE_COLUMNS))


def write_table(tar: Path, index_path: Path) -> Path:
    path = tar.with_suffix(TABLE_SUFFIX)
    np.save(path, table_rows(tar, index_path))
    return path


def _load_table(path: str, samples: int) -> np.ndarray:
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:  # an OSError (a storage hiccup) is left as it is: it may pass
        raise DatasetError(f"{path}: sample table does not load ({error}); repack the shard") from None
    if rows.shape != (samples, len(TABLE_COLUMNS)) or rows.dtype != TABLE_DTYPE:
        raise DatasetError(
            f"{path}: sample table of {rows.dtype} {rows.shape}, "
            f"expected {TABLE_DTYPE} ({samples}, {len(TABLE_COLUMNS)}); repack the shard"
        )
    return rows


@dataclass(frozen=True)
class SampleTable:
    """Every sample of one split: its shard (position in ``tars``) and its row of ``TABLE_COLUMNS``."""

    split: str
    tars: tuple[str, ...]
    shard: np.ndarray  # (N,) int64
    rows: np.ndarray  # (N, len(TABLE_COLUMNS)) int64

    @staticmethod
    def read(dataset: ShardDataset, split: str = "train", shards: list[int] | None = None) -> SampleTable:
        """The table of ``split`` (of only its shards numbered ``shards``, when given)."""
        info = dataset.split(split)
        numbers = range(len(info.tars)) if shards is None else shards
        parts = [
            _load_table(info.tables[n], info.shard_samples[n]) if info.tables[n] else table_rows(info.tars[n], info.indexes[n])
            for n in numbers
        ]
        shard = np.concatenate([np.full(len(part), n, np.int64) for n, part in zip(numbers, parts)] or [np.zeros(0, np.int64)])
        rows = np.concatenate(parts) if parts else np.zeros((0, len(TABLE_COLUMNS)), TABLE_DTYPE)
        return SampleTable(split, info.tars, shard, rows)

    @property
    def meta(self) -> np.ndarray:
        """(N, len(META_FIELDS)): label, person id, camera id, index, as the meta members hold them."""
        return self.rows[:, : len(META_FIELDS)]

    @property
    def labels(self) -> np.ndarray:
        return self.rows[:, LABEL]

    def key(self, i: int) -> str:
        return sample_key(self.split, int(self.rows[i, SAMPLE_INDEX]))

    def reader(self, open_files: int = 64):
        """A function from sample positions to their JPEG bytes. Local shards: the last ``open_files``
        it read stay open (thousands of shards would exhaust the process's file descriptors). Shards
        in an object store: one ranged GET per sample, many at once (a request's latency, not its
        bytes, is what a sample costs there)."""
        if self.tars and isinstance(location.parse(self.tars[0]), S3Uri):
            return self._remote_reader()
        handles: OrderedDict[int, object] = OrderedDict()

        def read(positions: np.ndarray) -> list[np.ndarray]:
            out = []
            for i in positions:
                number = int(self.shard[i])
                if number not in handles:
                    if len(handles) >= open_files:
                        handles.popitem(last=False)[1].close()
                    handles[number] = open(self.tars[number], "rb")  # noqa: SIM115 - lives with the reader
                handles.move_to_end(number)
                handle = handles[number]
                handle.seek(int(self.rows[i, OFFSET]))
                out.append(np.frombuffer(handle.read(int(self.rows[i, SIZE])), np.uint8))
            return out

        return read

    def _remote_reader(self):
        uris = [location.parse(tar) for tar in self.tars]
        pool = ThreadPoolExecutor(REMOTE_READS)

        def fetch(i: int) -> np.ndarray:
            data = s3.read_bytes(uris[self.shard[i]], int(self.rows[i, OFFSET]), int(self.rows[i, SIZE]))
            return np.frombuffer(data, np.uint8)

        def read(positions: np.ndarray) -> list[np.ndarray]:
            return list(pool.map(fetch, positions))

        weakref.finalize(read, pool.shutdown, wait=False)
        return read
