"""Pack parsed datasets into WebDataset tar shards with DALI index files and a manifest.

What a shard holds (each sample's members, the DALI index and the sample table beside each tar) is
the shard format, ``shard_format.py``. The sample tables give every sample's meta fields and JPEG
offset, so that nothing has to read the meta members one by one to learn the labels.

Images are checked (fully decoded) by a pool of worker processes while the main process writes, in
a fixed order, so the same input and seed give byte-identical shards. Files that fail go to the
manifest's ``quarantine`` list with the reason instead of into a shard. Training samples are
shuffled across shards (DALI's shuffle buffer is local to the reader), so every shard holds a mix of
identities. Labels are assigned before checking, so an identity whose every image is quarantined
keeps its (unused) classifier row rather than shifting every later label.

The output is a local folder or an ``s3://bucket/prefix``; the same input and seed give the same
bytes in either. Into the store, each shard is written to a local scratch folder, uploaded while the
next ones are packed, and deleted; the manifest goes last (``_into_store``).
"""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.pool
import os
import random
import secrets
import shutil
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from tqdm import tqdm
from wds2idx import IndexCreator

from reid_platform.data.datasets import SPLITS, Sample, combine, load_dataset, with_labels
from reid_platform.data.images import prepare_job
from reid_platform.data.manifest import (
    MANIFEST,
    Manifest,
    QuarantineEntry,
    ShardDataset,
    ShardEntry,
    SplitEntry,
    file_sha256,
    files_sha256,
)  # fmt: skip
from reid_platform.data.sample_table import table_rows, write_table
from reid_platform.data.shard_format import (
    IMAGE_EXT,
    INDEX_SUFFIX,
    META_EXT,
    SOURCE_EXT,
    encode_meta,
    index_sample_count,
    member_key,
    sample_key,
    shard_pattern,
)
from reid_platform.errors import ConfigError, DatasetError
from reid_platform.storage import files, location, s3
from reid_platform.storage.location import S3Uri

# Shards uploading, or waiting to, while the next one is packed into the store: the scratch folder
# holds at most this many plus the one being written (or waiting for room), each at most --shard-mb
# with its index and table (and the writer's next tar, opened empty).
UPLOADS_IN_FLIGHT = 2


@dataclass(frozen=True)
class PackOptions:
    """How to pack; each field is the `reid data pack` flag of the same name (``--samples-per-shard``).

    A value that cannot be packed with (no samples or bytes per shard, no workers) raises a
    ``ConfigError`` naming the field when the options are made, before anything is written.
    """

    samples_per_shard: int = 1000
    shard_mb: float = 256.0  # largest shard size, in MiB
    seed: int = 0
    resize: tuple[int, int] | None = None  # (height, width) at pack time
    workers: int = max(1, os.cpu_count() or 1)
    jpeg_quality: int = 95

    def __post_init__(self) -> None:
        _require_whole("samples_per_shard", self.samples_per_shard, 1)
        if not (isinstance(self.shard_mb, (int, float)) and 0 < self.shard_mb < math.inf):
            raise ConfigError(f"{_named('shard_mb')} must be a positive number of MiB (got {self.shard_mb!r})")
        _require_whole("workers", self.workers, 1)
        _require_whole("jpeg_quality", self.jpeg_quality, 1, 100)
        if self.resize is not None and not (
            len(self.resize) == 2 and all(isinstance(side, int) and side >= 1 for side in self.resize)
        ):
            raise ConfigError(f"{_named('resize')} must be (height, width), whole pixels from 1 (got {self.resize!r})")

    @property
    def bytes_per_shard(self) -> int:
        return math.ceil(self.shard_mb * 2**20)  # at least 1: a shard that may hold nothing would stay empty


def _named(field: str) -> str:
    """A field as both its names: a library caller knows the field, a command-line user the flag."""
    return f"{field} (--{field.replace('_', '-')})"


def _require_whole(name: str, value: object, least: int, most: int | None = None) -> None:
    whole = isinstance(value, int) and not isinstance(value, bool)  # True samples per shard is a slip, not 1
    if whole and value >= least and (most is None or value <= most):
        return
    bounds = f"at least {least}" if most is None else f"from {least} to {most}"
    raise ConfigError(f"{_named(name)} must be a whole number {bounds} (got {value!r})")


def _relative(sample: Sample, roots: dict[str, Path]) -> str:
    root = roots.get(sample.source)
    if root is not None and sample.path.is_relative_to(root):
        return str(sample.path.relative_to(root))
    return str(sample.path)


@dataclass(frozen=True)
class _Output:
    """Where packing writes: every file into ``folder``, and each shard's files (tar, index, table),
    once complete, handed to ``shard_written``."""

    folder: Path
    shard_written: Callable[[list[Path]], None] = lambda paths: None


def _shard_entry(tar: Path) -> ShardEntry:
    """A complete tar's DALI index and sample table, written beside it, and its manifest entry."""
    index_path = tar.with_suffix(INDEX_SUFFIX)
    with IndexCreator(str(tar), str(index_path), verbose=False) as creator:
        creator.create_index()
    table = write_table(tar, index_path)
    return ShardEntry(
        file=tar.name,
        index=index_path.name,
        samples=index_sample_count(index_path),
        bytes=tar.stat().st_size,
        sha256=file_sha256(tar),
        table=table.name,
        index_sha256=file_sha256(index_path),
        table_sha256=file_sha256(table),
    )


def _write_split(
    split: str,
    samples: list[Sample],
    roots: dict[str, Path],
    output: _Output,
    options: PackOptions,
    pool: multiprocessing.pool.Pool,
    quarantine: list[QuarantineEntry],
    progress: bool,
) -> tuple[list[ShardEntry], list[Sample]]:
    """Write the shards of one split; returns their manifest entries and the samples written."""
    if not samples:  # e.g. a CSV manifest with training rows only
        return [], []
    order = list(range(len(samples)))
    if split == "train":
        random.Random(options.seed).shuffle(order)
    jobs = ((samples[i].path, options.resize, options.jpeg_quality) for i in order)
    written: list[Sample] = []
    shards: list[ShardEntry] = []
    # The writer names each tar here once it has closed it; the tar is finished (indexed, handed on)
    # between writes rather than in the writer's callback, which also runs on a tar cut short by an error.
    closed: list[str] = []

    def finish_closed() -> None:
        for name in closed:
            shards.append(entry := _shard_entry(Path(name)))
            output.shard_written([output.folder / file for file in (entry.file, entry.index, entry.table)])
        closed.clear()

    pattern = str(output.folder / shard_pattern(split))
    with wds.ShardWriter(
        pattern, maxcount=options.samples_per_shard, maxsize=options.bytes_per_shard, post=closed.append,
        verbose=0, mtime=0.0,
    ) as writer:  # fmt: skip
        prepared = pool.imap(prepare_job, jobs, chunksize=16)
        for i, (data, reason) in tqdm(zip(order, prepared), total=len(order), desc=f"packing {split}", unit="img", disable=not progress):
            sample = samples[i]
            where = {"source": sample.source, "path": _relative(sample, roots)}
            if data is None:
                quarantine.append(QuarantineEntry(**where, split=split, reason=reason))
                continue
            index = len(written)  # contiguous over the written samples, in write order
            writer.write(
                {
                    "__key__": sample_key(split, index),
                    IMAGE_EXT: data,
                    META_EXT: encode_meta(sample.label, sample.person_id, sample.camera_id, index),
                    SOURCE_EXT: json.dumps(where).encode(),
                }
            )
            written.append(sample)
            finish_closed()
    if samples and not written:
        reasons = "; ".join(f"{q.path}: {q.reason}" for q in quarantine if q.split == split)
        raise DatasetError(f"every {split} image was quarantined, nothing to pack ({reasons[:500]})")
    finish_closed()  # the last tar, closed with the writer
    return shards, written


def _root_folder(root: str | Path) -> Path:
    """The folder stored paths are relative to (a CSV manifest's own folder)."""
    root = Path(root).resolve()
    return root.parent if root.is_file() else root


def pack_dataset(
    sources: list[tuple[str, str | Path]],
    out: str | Path | S3Uri,
    options: PackOptions = PackOptions(),
    progress: bool = True,
) -> Manifest:
    """Parse, check and write every split of ``sources`` (dataset name, root) into ``out``.

    Several sources are combined into one dataset with disjoint person and camera ids. ``out`` is a
    folder or an ``s3://bucket/prefix`` (text is parsed as a location). Returns the manifest (also
    written to ``out/manifest.json``).
    """
    if len({name for name, _ in sources}) != len(sources):
        raise DatasetError("the same dataset name is given twice; pack each dataset once")
    splits, offsets = combine([load_dataset(name, root) for name, root in sources])
    splits["train"] = with_labels(splits["train"])
    described = [
        {"dataset": name, "root": str(_root_folder(root)), **offset} for (name, root), offset in zip(sources, offsets)
    ]
    return pack_splits(splits, described, out, options, progress)


def pack_splits(
    splits: dict[str, list[Sample]],
    sources: list[dict],
    out: str | Path | S3Uri,
    options: PackOptions,
    progress: bool = True,
) -> Manifest:
    """Write labelled splits (``Sample.source`` naming an entry of ``sources``) and the manifest into
    ``out``, a folder (``_into_folder``) or an ``s3://bucket/prefix`` (``_into_store``): either is
    missing or empty, never more (a finished pack there is not replaced), and a pack that fails or
    is stopped leaves no manifest there, so nothing takes it for a finished one."""
    out = location.parse(out)
    with _into_store(out) if isinstance(out, S3Uri) else _into_folder(out) as output:
        return _pack_into(output, splits, sources, options, progress)


@contextmanager
def _into_folder(out: Path) -> Iterator[_Output]:
    """Everything is written into a hidden sibling of ``out`` that is renamed to ``out`` once complete
    (one atomic step: same parent), so a pack that fails or is stopped leaves no half-written
    ``out`` and the same command can run again."""
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: output folder is not empty; choose a new one or remove it")
    target = out.resolve()  # "." has no name to put beside it; a link to an empty folder stays a link
    target.parent.mkdir(parents=True, exist_ok=True)
    # hidden, and named so that the leftover of a killed pack (no cleanup runs) is recognisable
    staging = target.with_name(f".{target.name}.{secrets.token_hex(4)}.partial")
    staging.mkdir()
    try:
        yield _Output(staging)
        staging.rename(target)  # replaces an empty folder; fails on one that got files meanwhile
    except BaseException:  # also an interrupt: the next run starts clean
        shutil.rmtree(staging, ignore_errors=True)
        raise


@contextmanager
def _into_store(out: S3Uri) -> Iterator[_Output]:
    """Each shard is written into a local scratch folder (a temporary directory, under TMPDIR), then
    uploaded while the next ones are packed and deleted once its object is checked against the
    file's digest: the scratch folder holds at most ``UPLOADS_IN_FLIGHT`` + 1 shards' bytes, whatever
    the dataset's size. The manifest is uploaded last, once every shard is in the store: S3 has no
    rename to publish a pack in one step, and readers take a prefix for a pack only when it has a
    manifest, so a pack stopped at any point (even killed) is never read as a finished one.

    The prefix is listed first, one cheap request, so that a missing bucket or a refused key ends
    the pack before anything is packed. After a failure the objects sent are deleted (as far as the
    store allows), so the same command can run again."""
    if found := s3.sizes(out):
        raise DatasetError(f"{out}: output prefix is not empty ({len(found)} objects); choose a new one or remove them")
    with tempfile.TemporaryDirectory(prefix="reid-pack-") as scratch:
        uploads = _Uploads(out)
        try:
            yield _Output(Path(scratch), uploads.send)
            uploads.finish(Path(scratch) / MANIFEST)
        except BaseException:
            uploads.discard()
            raise


class _Uploads:
    """Files sent to ``out`` by background threads, each deleted locally once its object is checked
    (``s3.upload_file``). ``send`` waits while ``UPLOADS_IN_FLIGHT`` sends are running or waiting,
    and raises the failure of one it waited for: a store that refuses uploads stops the packing
    within a shard or two."""

    def __init__(self, out: S3Uri) -> None:
        self.out = out
        self.pool = ThreadPoolExecutor(UPLOADS_IN_FLIGHT, thread_name_prefix="pack-upload")
        self.pending: deque[Future] = deque()
        self.sent: list[S3Uri] = []  # every object an upload was started for, to delete after a failure

    def send(self, paths: list[Path]) -> None:
        while len(self.pending) >= UPLOADS_IN_FLIGHT:
            self.pending.popleft().result()
        self.pending.append(self.pool.submit(self._upload, paths))

    def _upload(self, paths: list[Path]) -> None:
        for path in paths:
            self.sent.append(self.out / path.name)
            s3.upload_file(path, self.out / path.name)
            path.unlink()

    def finish(self, manifest: Path) -> None:
        """Every upload waited for, then the manifest sent: it lists only objects already there."""
        while self.pending:
            self.pending.popleft().result()
        self._upload([manifest])
        self.pool.shutdown()

    def discard(self) -> None:
        """The uploads not started dropped, the running ones waited for, and every object sent
        deleted, the manifest first; a deletion the store refuses is left: the error being raised
        is the one to report."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        for uri in reversed(self.sent):
            with suppress(s3.StoreError):
                s3.delete(uri)


def _pack_into(
    output: _Output, splits: dict[str, list[Sample]], sources: list[dict], options: PackOptions, progress: bool
) -> Manifest:
    roots = {source["dataset"]: Path(source["root"]) for source in sources}
    quarantine: list[QuarantineEntry] = []
    written_splits = {}
    context = multiprocessing.get_context("spawn")  # no fork of a process that may hold torch threads
    with context.Pool(options.workers) as pool:
        for split in SPLITS:
            shards, written = _write_split(split, splits[split], roots, output, options, pool, quarantine, progress)
            written_splits[split] = SplitEntry(
                samples=len(written), identities=len({s.person_id for s in written}), shards=shards
            )
    manifest = Manifest(
        dataset="+".join(roots),
        sources=sources,
        seed=options.seed,
        resize=options.resize,
        num_classes=max((s.label for s in splits["train"]), default=-1) + 1,
        splits=written_splits,
        quarantine=quarantine,
    )
    manifest.write(output.folder)
    return manifest


def read_images(dataset: ShardDataset, split: str, indices: Iterable[int]) -> dict[int, bytes]:
    """JPEG bytes of the samples of ``split`` with the given dataset indices (for pictures)."""
    wanted = {f"{sample_key(split, index)}.{IMAGE_EXT}": index for index in indices}
    found: dict[int, bytes] = {}
    for tar_path in dataset.split(split).tars:
        with files.open_stream(location.parse(tar_path)) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                if member.name in wanted:
                    found[wanted[member.name]] = tar.extractfile(member).read()
        if len(found) == len(wanted):
            break
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise DatasetError(f"{dataset.root}: {split} samples {missing[:5]} are not in its shards")
    return found


def _tar_sample_count(tar: Path) -> int:
    with tarfile.open(tar) as handle:
        return len({member_key(member.name) for member in handle if member.isfile()})


def _sidecars_as_packed(shards_dir: Path | S3Uri, shard: ShardEntry, present: dict[str, int]) -> bool:
    """Whether the shard's index and table have the sha256 recorded at packing (False when none was
    recorded, or a file is missing or cannot be read: then they are rebuilt and compared instead)."""
    recorded = [(shard.index, shard.index_sha256)] + ([(shard.table, shard.table_sha256)] if shard.table else [])
    try:
        return all(
            digest is not None and name in present and file_sha256(shards_dir / name) == digest for name, digest in recorded
        )
    except DatasetError:
        return False


def _fetched(place: Path | S3Uri, scratch: Path) -> Path:
    """A local path holding the file: itself, or the object downloaded into ``scratch``."""
    if not isinstance(place, S3Uri):
        return place
    path = scratch / place.name
    files.download(place, path)
    return path


def _table_matches(table: Path, tar: Path, index: Path) -> bool:
    try:
        return np.array_equal(np.load(table, allow_pickle=False), table_rows(tar, index))
    except (OSError, ValueError, EOFError, DatasetError):
        return False


@dataclass
class ShardCheck:
    """What ``verify_shards`` found: every mismatch, the shards checked, and which of them changed
    their bytes (split, shard number: their sha256 differs from the manifest's)."""

    problems: list[str]
    checked: int
    changed: list[tuple[str, int]]


def verify_shards(shards_dir: str | Path, progress: bool = False) -> ShardCheck:
    """Every mismatch between the shards and the manifest: size, sha256 (hashed in parallel first,
    with a progress bar if asked), sample count, DALI index, sample table. A shard whose tar, index
    and table all have their packed sha256 is as packed: its index and table are not rebuilt from
    the tar (packing wrote them from those bytes) and its samples are counted in its index. A tar
    that cannot be read raises a ``DatasetError`` naming it."""
    shards_dir = location.parse(shards_dir)
    manifest = Manifest.read(shards_dir)
    listed = {}
    for split, info in manifest.splits.items():
        listed.update({(split, number): shard for number, shard in enumerate(info.shards)})
    present = files.sizes(shards_dir, manifest.files())
    found = [key for key, shard in listed.items() if shard.file in present]
    digests = dict(zip(found, files_sha256([shards_dir / listed[key].file for key in found], progress)))
    problems, changed = [], []
    for (split, number), shard in listed.items():
        tar = shards_dir / shard.file
        if (split, number) not in digests:
            problems.append(f"{tar}: missing ({split} shard listed in the manifest)")
            continue
        if (size := present[shard.file]) != shard.bytes:
            problems.append(f"{tar}: {size} bytes, the manifest says {shard.bytes}")
        if (digest := digests[split, number]) != shard.sha256:
            problems.append(f"{tar}: sha256 {digest[:16]}..., the manifest says {shard.sha256[:16]}...")
            changed.append((split, number))
        as_packed = digest == shard.sha256 and _sidecars_as_packed(shards_dir, shard, present)
        # a shard in an object store is checked from local copies, one shard at a time
        with tempfile.TemporaryDirectory(prefix="reid-verify-") as scratch:
            problems += _shard_problems(shards_dir, shard, as_packed, present, Path(scratch))
    return ShardCheck(problems, len(listed), changed)


def _shard_problems(
    shards_dir: Path | S3Uri, shard: ShardEntry, as_packed: bool, present: dict[str, int], scratch: Path
) -> list[str]:
    """The mismatches of one shard's sample count, DALI index and sample table with what packing
    wrote (its size and sha256 are checked already)."""
    tar, index = shards_dir / shard.file, shards_dir / shard.index
    if as_packed:  # its index and table are the ones packing wrote from these bytes: count in the index
        samples = index_sample_count(_fetched(index, scratch))
        return [] if samples == shard.samples else [f"{tar}: {samples} samples, the manifest says {shard.samples}"]
    local_tar = _fetched(tar, scratch)
    try:
        samples = _tar_sample_count(local_tar)
    except (tarfile.TarError, OSError) as error:
        return [f"{tar}: not a readable tar file: {error}"]
    problems = [] if samples == shard.samples else [f"{tar}: {samples} samples, the manifest says {shard.samples}"]
    if shard.index not in present:
        return [*problems, f"{index}: missing DALI index"]
    local_index = _fetched(index, scratch)
    fresh = scratch / f"rebuilt-{index.name}"
    with IndexCreator(str(local_tar), str(fresh), verbose=False) as creator:
        creator.create_index()
    if fresh.read_bytes() != local_index.read_bytes():
        return [*problems, f"{index}: does not match {tar.name} (the tar or the index changed)"]
    table = shards_dir / shard.table if shard.table else None
    if table is not None and (shard.table not in present or not _table_matches(_fetched(table, scratch), local_tar, local_index)):
        problems.append(f"{table}: missing, unreadable or does not match {tar.name}")
    return problems
