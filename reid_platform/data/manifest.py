"""A packed dataset as one typed object: ``manifest.json`` read, validated and checked against the
shard files once per process, then handed to every stage (input, evaluation, the launcher).

``Manifest`` is the file's schema (packing writes it through the same model); ``ShardDataset`` is
the opened dataset: its splits with their shard and index paths, class count and quarantine.
"""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError
from tqdm import tqdm

from reid_platform.data.datasets import SPLITS
from reid_platform.data.shard_format import FORMAT_VERSION, META_FIELDS
from reid_platform.errors import DatasetError
from reid_platform.section import describe
from reid_platform.storage import files, location
from reid_platform.storage.location import S3Uri

MANIFEST = "manifest.json"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardEntry(_Record):
    file: str
    index: str  # the DALI index file of the tar
    samples: int
    bytes: int
    sha256: str
    table: str | None = None  # its sample table (data/sample_table.py); None in packs made before them
    # the index's and the table's own sha256: with the tar's, they prove a shard is as packed without
    # rebuilding what was written from its bytes (``verify_shards``); None in packs made before them
    index_sha256: str | None = None
    table_sha256: str | None = None


class SplitEntry(_Record):
    samples: int
    identities: int
    shards: list[ShardEntry]


class QuarantineEntry(_Record):
    source: str
    path: str
    split: str
    reason: str


class Manifest(_Record):
    format_version: Literal[FORMAT_VERSION] = FORMAT_VERSION  # of the shards (shard_format.py)
    dataset: str
    sources: list[dict]  # per source dataset: name, root and its person / camera id offsets
    seed: int
    resize: tuple[int, int] | None
    meta_fields: tuple[str, ...] = META_FIELDS
    num_classes: int
    splits: dict[str, SplitEntry]
    quarantine: list[QuarantineEntry]

    @classmethod
    def read(cls, shards_dir: str | Path | S3Uri) -> Manifest:
        path = location.parse(shards_dir) / MANIFEST
        if not files.is_file(path):
            raise DatasetError(f"{path}: no manifest; run `reid data pack` to create the shards")
        try:
            tree = json.loads(files.read_text(path))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path}: manifest is not valid JSON: {error}") from None
        if isinstance(tree, dict) and tree.get("format_version") != FORMAT_VERSION:
            raise DatasetError(f"{path}: format_version {tree.get('format_version')!r}, expected {FORMAT_VERSION}")
        try:
            manifest = cls.model_validate(tree)
        except ValidationError as error:
            raise DatasetError(f"{path}: not a manifest of `reid data pack`: {describe(error)}") from None
        missing = [split for split in SPLITS if split not in manifest.splits]
        if missing:
            raise DatasetError(f"{path}: no {', '.join(missing)} split")
        return manifest

    def files(self) -> list[str]:
        """Every file the manifest lists: each shard's tar, DALI index and sample table."""
        return [
            name for split in self.splits.values() for shard in split.shards
            for name in (shard.file, shard.index, shard.table) if name
        ]  # fmt: skip

    def write(self, shards_dir: Path) -> None:
        (shards_dir / MANIFEST).write_text(json.dumps(self.model_dump(mode="json"), indent=2))


@dataclass(frozen=True)
class Split:
    name: str
    samples: int
    identities: int
    tars: tuple[str, ...]  # local paths or s3:// URIs (the input's readers open both through storage/)
    indexes: tuple[str, ...]  # DALI index of each tar, in the same order: always a local file
    tables: tuple[str | None, ...]  # sample table of each tar (None: read its meta members): local
    shard_samples: tuple[int, ...]
    sha256: tuple[str, ...]  # of each tar, as packed


@dataclass(frozen=True)
class ShardDataset:
    root: Path | S3Uri
    manifest: Manifest
    splits: dict[str, Split]

    @classmethod
    def open(cls, root: str | Path | S3Uri) -> ShardDataset:
        """Read the manifest and check that every shard it lists is there with its packed size.

        A shard whose size changed is refused here, before a worker reads it (``reid data verify``
        compares the contents too). Shards in an object store stay there (DALI and the torch loader
        stream them, the samplers read them by range); their DALI indexes and sample tables, small
        and read by every pipeline, are fetched once into this process's local copies.
        """
        root = location.parse(root)
        manifest = Manifest.read(root)
        present = files.sizes(root, manifest.files())  # a store: one listing, a request per 1000 objects
        splits = {}
        for name, entry in manifest.splits.items():
            for shard in entry.shards:
                for file in (shard.file, shard.index, shard.table or shard.file):
                    if file not in present:
                        raise DatasetError(f"{root / file}: shard file listed in the manifest is missing")
                if present[shard.file] != shard.bytes:
                    raise DatasetError(
                        f"{root / shard.file}: {present[shard.file]} bytes, the manifest says {shard.bytes}; "
                        "the shard changed after packing"
                    )
            tables = [root / shard.table if shard.table else None for shard in entry.shards]
            local_tables = iter(files.local_copies([table for table in tables if table is not None]))
            splits[name] = Split(
                name, entry.samples, entry.identities, tuple(str(root / shard.file) for shard in entry.shards),
                tuple(str(path) for path in files.local_copies([root / shard.index for shard in entry.shards])),
                tuple(str(next(local_tables)) if table else None for table in tables),
                tuple(shard.samples for shard in entry.shards), tuple(shard.sha256 for shard in entry.shards),
            )  # fmt: skip
        return cls(root, manifest, splits)

    @property
    def num_classes(self) -> int:
        return self.manifest.num_classes

    @property
    def quarantine(self) -> list[QuarantineEntry]:
        return self.manifest.quarantine

    def split(self, name: str) -> Split:
        return self.splits[name]

    def changed_shards(self, splits: tuple[str, ...] = SPLITS, progress: bool = False) -> list[tuple[str, int]]:
        """(split, shard number) of every shard whose sha256 is no longer the packed one."""
        jobs = [(split, number) for split in splits for number in range(len(self.split(split).tars))]
        digests = files_sha256([self.split(split).tars[number] for split, number in jobs], progress)
        return [job for job, digest in zip(jobs, digests) if digest != self.split(job[0]).sha256[job[1]]]


def files_sha256(paths: list[str | Path | S3Uri], progress: bool = False) -> list[str]:
    """Each file's (object's) sha256, hashed by a thread pool (hashlib releases the GIL on large
    blocks; objects stream): at about the disk's or the network's speed."""
    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = pool.map(file_sha256, paths)
        return list(tqdm(digests, total=len(paths), desc="sha256", unit="file", disable=not progress))


def file_sha256(path: str | Path | S3Uri) -> str:
    try:
        return files.sha256(location.parse(path))
    except OSError as error:  # gone or unreadable since it was listed: named, not a pool thread's traceback
        raise DatasetError(f"{path}: cannot be read to hash it: {error.strerror or error}") from None
