"""Where every sample of a split lies, without opening its tar: one compact table per shard.

Packing writes, next to each shard ``S.tar`` and its DALI index ``S.idx``, the table
``S.samples.npy``: one int64 row per sample, in shard order, of the meta member's four fields (label,
person id, camera id, sample index) and the JPEG member's byte offset and size in the tar. Whatever
picks samples itself (the identity sampler, the search for a sample that no longer decodes) loads
these few bytes per sample instead of reading every sample's meta member: at two million samples
that is a second of ``np.load`` instead of two million seeks. Shards packed before the tables
existed (no ``table`` in their manifest entry) are read the slow way, from index and meta members.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reid_platform.data.manifest import META_FIELDS, ShardDataset
from reid_platform.errors import DatasetError

COLUMNS = (*META_FIELDS, "offset", "size")
TABLE_SUFFIX = ".samples.npy"


def sample_key(split: str, index: int) -> str:
    """The tar key of the sample of ``split`` with dataset index ``index`` (as packing names it)."""
    return f"{split}_{index:09d}"


def index_members(index_path: str | Path) -> Iterator[tuple[str, dict[str, tuple[int, int]]]]:
    """(key, {extension: (offset, size)}) of every sample line of a DALI webdataset index."""
    with open(index_path) as handle:
        handle.readline()  # "v1.2 COUNT"
        for line in handle:
            fields = line.split()
            members = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
            yield fields[3].split(".", 1)[0], members


def table_rows(tar: str | Path, index_path: str | Path) -> np.ndarray:
    """The (samples, len(COLUMNS)) table of one shard, read from its index and meta members."""
    rows = []
    with open(tar, "rb") as handle:
        for key, members in index_members(index_path):
            if "jpg" not in members or "meta" not in members:
                raise DatasetError(f"{index_path}: sample {key} lacks a jpg or meta member")
            offset, size = members["meta"]
            if size != 8 * len(META_FIELDS):
                raise DatasetError(f"{tar}: sample {key} has a meta member of {size} bytes, {8 * len(META_FIELDS)} expected")
            handle.seek(offset)
            rows.append([*np.frombuffer(handle.read(size), "<i8"), *members["jpg"]])
    return np.array(rows, dtype=np.int64).reshape(-1, len(COLUMNS))


def write_table(tar: Path, index_path: Path) -> Path:
    path = tar.with_suffix(TABLE_SUFFIX)
    np.save(path, table_rows(tar, index_path))
    return path


def _load_table(path: str, samples: int) -> np.ndarray:
    try:
        rows = np.load(path, allow_pickle=False)
    except (ValueError, EOFError) as error:  # an OSError (a storage hiccup) is left as it is: it may pass
        raise DatasetError(f"{path}: sample table does not load ({error}); repack the shard") from None
    if rows.shape != (samples, len(COLUMNS)) or rows.dtype != np.int64:
        raise DatasetError(
            f"{path}: sample table of {rows.dtype} {rows.shape}, expected int64 ({samples}, {len(COLUMNS)}); repack the shard"
        )
    return rows


@dataclass(frozen=True)
class SampleTable:
    """Every sample of one split: its shard (position in ``tars``) and its row of ``COLUMNS``."""

    split: str
    tars: tuple[str, ...]
    shard: np.ndarray  # (N,) int64
    rows: np.ndarray  # (N, len(COLUMNS)) int64

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
        rows = np.concatenate(parts) if parts else np.zeros((0, len(COLUMNS)), np.int64)
        return SampleTable(split, info.tars, shard, rows)

    @property
    def meta(self) -> np.ndarray:
        """(N, 4): label, person id, camera id, index, as the meta members hold them."""
        return self.rows[:, : len(META_FIELDS)]

    @property
    def labels(self) -> np.ndarray:
        return self.rows[:, 0]

    def key(self, i: int) -> str:
        return sample_key(self.split, int(self.rows[i, 3]))

    def reader(self, open_files: int = 64):
        """A function from sample positions to their JPEG bytes, keeping the last ``open_files`` shards
        it read open (thousands of shards would exhaust the process's file descriptors)."""
        handles: OrderedDict[int, object] = OrderedDict()
        offset, size = COLUMNS.index("offset"), COLUMNS.index("size")

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
                handle.seek(int(self.rows[i, offset]))
                out.append(np.frombuffer(handle.read(int(self.rows[i, size])), np.uint8))
            return out

        return read
