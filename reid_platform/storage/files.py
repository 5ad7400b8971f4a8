"""File operations on a location, local or in the object store: what the platform's readers and
writers call instead of ``open`` and ``Path`` methods where a location may be remote."""

from __future__ import annotations

import atexit
import fcntl
import hashlib
import io
import itertools
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

from reid_platform.storage import s3
from reid_platform.storage.location import S3_SCHEME, S3Uri

Location = Path | S3Uri


def is_file(location: Location) -> bool:
    return s3.size(location) is not None if isinstance(location, S3Uri) else location.is_file()


def size(location: Location) -> int | None:
    """Its size in bytes, or None when there is no such file (object)."""
    if isinstance(location, S3Uri):
        return s3.size(location)
    return location.stat().st_size if location.is_file() else None


def sizes(folder: Location, names: list[str] | None = None) -> dict[str, int]:
    """The files under ``folder`` by their path relative to it (with '/'), with their sizes: in a
    store one listing (a request per thousand objects); on a disk those of ``names`` only, when
    given (a shared file system's folder may hold much else), else every file under it."""
    if isinstance(folder, S3Uri):
        return s3.sizes(folder)
    if names is not None:
        return {name: (folder / name).stat().st_size for name in names if (folder / name).is_file()}
    if not folder.is_dir():
        return {}
    return {path.relative_to(folder).as_posix(): path.stat().st_size for path in folder.rglob("*") if path.is_file()}


def read_bytes(location: Location) -> bytes:
    return s3.read_bytes(location) if isinstance(location, S3Uri) else location.read_bytes()


def read_text(location: Location) -> str:
    return read_bytes(location).decode()


def write_bytes(location: Location, data: bytes) -> None:
    """Written whole or not at all: a local file through a temporary file renamed over it; an
    object is only ever visible complete."""
    if isinstance(location, S3Uri):
        s3.write_bytes(location, data)
        return
    location.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=location.parent, prefix=f".{location.name}.", delete=False) as handle:
        handle.write(data)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(handle.name, 0o666 & ~umask)  # as a file written in place: a temporary file is private
    os.replace(handle.name, location)


def write_text(location: Location, text: str) -> None:
    write_bytes(location, text.encode())


def open_ranged(location: Location, buffer: int = 64 << 10) -> BinaryIO:
    """A seekable binary file: an object's reads are ranged GETs of ``buffer`` bytes or more."""
    if isinstance(location, S3Uri):
        return io.BufferedReader(s3.RangedReader(location), buffer_size=buffer)
    return open(location, "rb")  # noqa: SIM115 - the caller closes it


def open_stream(location: Location) -> BinaryIO:
    """A file read front to back: an object's from one GET."""
    if isinstance(location, S3Uri):
        return io.BufferedReader(_StreamReader(location), buffer_size=s3.READ_BLOCK)
    return open(location, "rb")  # noqa: SIM115 - the caller closes it


class _StreamReader(io.RawIOBase):
    def __init__(self, uri: S3Uri) -> None:
        self.blocks, self.pending = s3.stream(uri), b""

    def close(self) -> None:
        self.blocks.close()  # the GET's connection back to the pool, though the body was not read to its end
        super().close()

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while not self.pending:
            self.pending = next(self.blocks, b"")
            if not self.pending:
                return 0
        count = min(len(buffer), len(self.pending))
        buffer[:count], self.pending = self.pending[:count], self.pending[count:]
        return count


def sha256(location: Location) -> str:
    """Its sha256, streamed (an object is read once, front to back, never stored)."""
    digest = hashlib.sha256()
    with open_stream(location) as handle:
        for block in iter(lambda: handle.read(s3.READ_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()


def upload(local: Path, location: Location) -> None:
    """A local file copied to ``location`` (checked against its digest when it is an object)."""
    if isinstance(location, S3Uri):
        s3.upload_file(local, location)
    elif local.resolve() != location.resolve():
        location.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, location)


def upload_folder(local: Path, location: Location) -> None:
    """Every file under the folder ``local`` copied to the same relative path under ``location``."""
    pairs = [(path, location / path.relative_to(local).as_posix()) for path in sorted(local.rglob("*")) if path.is_file()]
    if isinstance(location, S3Uri):
        s3.upload_many(pairs)
    else:
        for path, target in pairs:
            upload(path, target)


def download(location: Location, local: Path) -> None:
    local.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(location, S3Uri):
        s3.download_file(location, local)
    else:
        shutil.copyfile(location, local)


_cache_lock = threading.Lock()
_cache: dict[tuple[int, str], Path] = {}
_cache_dir: dict[int, Path] = {}
_cache_names = itertools.count()


def local_copy(location: Location) -> Path:
    """A local path with the file's bytes: the path itself, or the object downloaded once per process
    into a folder of its own that goes with the process (small files read often: DALI indexes,
    sample tables). Nothing is kept between processes, so a fresh machine needs no local state."""
    if not isinstance(location, S3Uri):
        return location
    key = (os.getpid(), str(location))  # a forked process makes its own folder: the parent removes its
    with _cache_lock:
        if key in _cache:
            return _cache[key]
        if os.getpid() not in _cache_dir:
            folder = Path(tempfile.mkdtemp(prefix="reid-objects-"))
            atexit.register(shutil.rmtree, folder, ignore_errors=True)
            _cache_dir[os.getpid()] = folder
        path = _cache_dir[os.getpid()] / f"{next(_cache_names)}-{location.name}"
    download(location, path)
    with _cache_lock:
        _cache[key] = path
    return path


def local_copies(locations: list[Location]) -> list[Path]:
    """``local_copy`` of each, fetched by a pool of threads (a request's latency, not its bytes, is
    what thousands of small objects cost)."""
    with ThreadPoolExecutor(s3.PARALLEL_PARTS * 2) as pool:
        return list(pool.map(local_copy, locations))


def for_arrow(location: Location) -> tuple[str, object | None]:
    """``location`` as pyarrow (and so Ray Train's ``storage_path``) takes it: a local path and no
    file system, or ``bucket/key`` (pyarrow refuses the scheme with an explicit file system) and
    the S3 file system of this process's AWS environment."""
    if isinstance(location, S3Uri):
        return f"{location.bucket}/{location.key}".rstrip("/"), s3.arrow_filesystem()
    return str(location), None


def from_arrow(path: str, storage: Location) -> str:
    """What a path pyarrow gave back for a place under ``storage`` (a Ray checkpoint's) stands for."""
    return f"{S3_SCHEME}{path}" if isinstance(storage, S3Uri) else path


STAGE_DIR = "REID_STAGE_DIR"


def stage_folder() -> Path:
    """Where this node keeps whole local copies of objects (``staged``): $REID_STAGE_DIR, else a
    folder of this user's in the temporary folder, shared by the user's processes on the node."""
    if os.environ.get(STAGE_DIR):
        return Path(os.environ[STAGE_DIR])
    folder = Path(tempfile.gettempdir()) / f"reid-staged-{os.getuid()}"
    folder.mkdir(mode=0o700, exist_ok=True)  # nobody else's files stand in for the objects
    return folder


def staged(locations: list[Location]) -> list[Path]:
    """Whole local copies of files that a reader would otherwise fetch piece by piece: local paths as
    they are, objects downloaded (in parallel, each in parallel parts) into ``stage_folder()`` by
    bucket and key. A copy is used again while the object keeps its ETag (a repacked shard of the
    same size is fetched anew); processes of the node that want the same object wait for the one
    fetching it (a lock per object), and a copy appears only complete (renamed into place)."""
    with ThreadPoolExecutor(s3.PARALLEL_PARTS) as pool:
        return list(pool.map(_staged, locations))


def _staged(location: Location) -> Path:
    if not isinstance(location, S3Uri):
        return location
    folder = stage_folder()
    path = (folder / location.bucket / location.key).resolve()
    if not path.is_relative_to(folder.resolve()):
        raise s3.StoreError(f"{location}: its key leaves the stage folder {folder}")
    found = s3.head(location)
    if found is None:
        raise s3.StoreError(f"{location}: no such object")
    path.parent.mkdir(parents=True, exist_ok=True)
    etag = path.with_name(f".{path.name}.etag")
    with open(path.with_name(f".{path.name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path.is_file() and etag.is_file() and etag.read_text() == found[1] and path.stat().st_size == found[0]):
            partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
            s3.download_file(location, partial)
            os.replace(partial, path)
            etag.write_text(found[1])
    return path
