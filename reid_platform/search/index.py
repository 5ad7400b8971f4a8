"""A gallery of L2-normalised embeddings in FAISS, with its metadata, searched with exact filters.

An index folder holds

    gallery.json        the model stamp, the index kind and parameters (chosen by size, nprobe tuned at
                        build), the shards' row ranges and the recall measured at build; written last,
                        so a folder without it is not an index
    metadata.parquet    one row per gallery entry: path, camera, timestamp, source (``METADATA_COLUMNS``)
    index-00000.faiss   one FAISS index per shard, over a contiguous range of gallery rows
    vectors-00000.npy   (approximate kinds) the shard's float32 embeddings, memory-mapped, never loaded
                        whole: the exact re-scoring of the product-quantised shortlist reads only the
                        shortlisted rows

Kinds (``choose_params``):
- ``flat``: exact inner product (``IndexFlatIP``), the default up to ``FLAT_LIMIT`` entries. Scores
  are cosine similarities; its ranking is the evaluator's (``tests/test_search_index.py``).
- ``ivfpq``: an inverted file of ``nlist`` ~ 2 sqrt(N) lists (a flat, or from 32768 lists an HNSW,
  coarse quantizer) holding ``m``-byte product-quantisation codes: ``m`` + 8 (the id) bytes per
  vector in memory. Product quantisation alone orders close neighbours poorly (recall@10 against
  exact about 0.7 on identity clusters), so ``refine`` x top_k candidates of the coarse search are
  re-scored exactly from the memory-mapped vectors. ``nprobe`` and ``refine`` are the cheapest pair
  on a ladder whose recall@10 against exact, on a held sample of gallery vectors used as queries,
  reaches the target (0.95); the measured recall is recorded and shown by ``info()``.

Shards are searched in parallel threads (FAISS releases the GIL) and merged by score
(``merge_ranked``), so a sharded index answers exactly what one index would. Filters (exclude the
query's camera, a time window) are applied inside FAISS's scan with an ``IDSelectorBitmap``: a hit
that fails them is never ranked, and when a probe of the inverted lists finds fewer than ``top_k``
passing entries, ``nprobe`` doubles until it does or every list was scanned. ``top_k`` hits come
back whenever that many entries pass the filters.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reid_platform.errors import ConfigError, DatasetError

FORMAT = "reid-platform-gallery/1"
GALLERY_FILE, METADATA_FILE = "gallery.json", "metadata.parquet"
METADATA_COLUMNS = ("path", "camera", "timestamp", "source")
METADATA_SCHEMA = pa.schema(
    [("path", pa.string()), ("camera", pa.int64()), ("timestamp", pa.float64()), ("source", pa.string())]
)
# Exact search costs N x D multiply-adds a query: about 3 ms at 100 k x 512 on 2 cores, 30 ms at 1 M.
FLAT_LIMIT = 200_000
# k-means of the coarse quantizer and the 256-centroid PQ codebooks want ~39 training points per centroid
IVF_MINIMUM = 39 * 256
RECALL_TARGET = 0.95
RECALL_AT = 10
RECALL_QUERIES = 1000
# the build's search ladders, cheapest first: the first pair reaching the target is kept
NPROBE_LADDER = (4, 8, 16, 32, 64, 128, 256)
REFINE_LADDER = (4, 8, 16, 32)
HNSW_COARSE_FROM = 32768  # lists: from here a flat coarse quantizer costs more than the scan itself
NORM_TOLERANCE = 1e-3
BLOCK_ROWS = 65536

Kind = Literal["auto", "flat", "ivfpq"]


@dataclass(frozen=True)
class ModelStamp:
    """Which model made the embeddings; stored in the index, checked by search and the service."""

    reference: str  # as the user gave it: NAME@ALIAS, NAME/VERSION, models:/..., or a model directory
    name: str | None  # registered model name (None for a directory)
    version: str | None  # registered version the reference resolved to (None for a directory)
    run_id: str | None
    feature_dim: int
    flip: bool  # embeddings average each image with its mirror
    weights_sha256: str | None = None  # of model.safetensors: tells two model directories apart

    def describe(self) -> str:
        if self.name and self.version:
            return f"{self.name} version {self.version}"
        return self.reference + (f" (weights {self.weights_sha256[:12]})" if self.weights_sha256 else "")

    def check_matches(self, other: ModelStamp, index: str) -> None:
        """A ConfigError naming both when ``other`` would embed queries unlike this index's gallery."""
        if other.feature_dim != self.feature_dim:
            raise ConfigError(
                f"{index} holds {self.feature_dim}-d embeddings of {self.describe()}; {other.describe()} "
                f"makes {other.feature_dim}-d ones"
            )
        same_version = None
        if self.name and self.version and other.name and other.version:
            same_version = (self.name, self.version) == (other.name, other.version)
        if self.weights_sha256 and other.weights_sha256 and same_version is not True:
            same_version = self.weights_sha256 == other.weights_sha256
        if same_version is False:
            raise ConfigError(f"{index} was built with {self.describe()}, not {other.describe()}: rebuild it or search with that model")


@dataclass(frozen=True)
class Hit:
    row: int  # the entry's row in the gallery (and in metadata.parquet)
    score: float  # cosine similarity (with re-ranking: 1 - the re-ranked distance)
    path: str
    camera: int
    timestamp: float
    source: str


@dataclass(frozen=True)
class IndexParams:
    kind: Literal["flat", "ivfpq"]
    nlist: int = 0  # inverted lists
    m: int = 0  # PQ sub-quantizers: bytes per code at 8 bits
    nbits: int = 8
    coarse: Literal["flat", "hnsw"] = "flat"
    nprobe: int = 0  # lists scanned per query (tuned at build)
    refine: int = 0  # shortlist of refine x top_k candidates re-scored exactly (tuned at build)
    ef_search: int = 0  # HNSW coarse quantizer's search depth
    train_size: int = 0  # vectors the quantizers were trained on

    def factory(self) -> str:
        if self.kind == "flat":
            return "Flat"
        return f"IVF{self.nlist}{'_HNSW32' if self.coarse == 'hnsw' else ''},PQ{self.m}x{self.nbits}"


def choose_params(size: int, dim: int, kind: Kind = "auto") -> IndexParams:
    """The index for ``size`` vectors of ``dim``: exact up to ``FLAT_LIMIT``, else IVF-PQ with
    nlist ~ 2 sqrt(N) (a power of two), codes of up to 32 bytes (the largest divisor ``m`` of ``dim``
    up to 32 leaving sub-vectors of 8+ dimensions)."""
    if kind == "auto":
        kind = "flat" if size <= FLAT_LIMIT else "ivfpq"
    if kind == "flat":
        return IndexParams("flat")
    if kind != "ivfpq":
        raise ConfigError(f"index kind {kind!r}: use auto, flat or ivfpq")
    if size < IVF_MINIMUM:
        raise ConfigError(f"an ivfpq index needs at least {IVF_MINIMUM} gallery entries to train on (got {size}); use flat")
    nlist = min(2 ** round(math.log2(2 * math.sqrt(size))), size // 39)
    # sub-vectors of 8+ dimensions: FAISS's k-means is slow on fewer (minutes for 32 x 4-d), and they encode worse
    m = max([d for d in range(1, 33) if dim % d == 0 and dim // d >= 8] or [1])
    coarse = "hnsw" if nlist >= HNSW_COARSE_FROM else "flat"
    return IndexParams(
        "ivfpq", nlist=nlist, m=m, coarse=coarse, ef_search=64 if coarse == "hnsw" else 0,
        train_size=min(size, max(32 * nlist, 65536)),
    )  # fmt: skip


def merge_ranked(parts: Sequence[tuple[np.ndarray, np.ndarray]], top_k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``top_k`` best of several (scores, rows) rankings of the same queries: by score, ties by row
    (a stable sort's order, as the evaluator's); rows -1 (no entry) have score -inf and come last."""
    scores = np.concatenate([s for s, _ in parts], axis=1)
    rows = np.concatenate([r for _, r in parts], axis=1)
    scores = np.where(rows < 0, -np.inf, scores)
    by_row = np.argsort(np.where(rows < 0, np.iinfo(np.int64).max, rows), axis=1, kind="stable")
    scores, rows = np.take_along_axis(scores, by_row, 1), np.take_along_axis(rows, by_row, 1)
    by_score = np.argsort(-scores, axis=1, kind="stable")[:, :top_k]
    return np.take_along_axis(scores, by_score, 1), np.take_along_axis(rows, by_score, 1)


@dataclass
class _Shard:
    """One FAISS index over gallery rows [start, stop)."""

    index: faiss.Index
    start: int
    stop: int
    params: IndexParams
    vectors: np.ndarray | None = None  # (stop - start, D) memory-mapped, for refine (ivfpq)
    ivf: faiss.IndexIVF | None = field(default=None, init=False)

    def __post_init__(self):
        if self.params.kind == "ivfpq":
            self.ivf = faiss.extract_index_ivf(self.index)
            if self.params.coarse == "hnsw":
                faiss.downcast_index(self.ivf.quantizer).hnsw.efSearch = self.params.ef_search

    def __len__(self) -> int:
        return self.stop - self.start

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None, nprobe: int, refine: int):
        """(scores, global rows) of this shard's ``k`` best entries among ``allowed`` (a mask over the
        whole gallery, None for all), best first; -inf / -1 where fewer entries are allowed. ``nprobe``
        lists are scanned first, and ``refine`` x k candidates re-scored exactly (ivfpq)."""
        mask = None if allowed is None else allowed[self.start : self.stop]
        available = len(self) if mask is None else int(mask.sum())
        k = min(k, len(self))
        if available == 0 or k == 0:
            return np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        bitmap = None if mask is None or available == len(self) else np.packbits(mask, bitorder="little")
        selector = None if bitmap is None else faiss.IDSelectorBitmap(len(self), faiss.swig_ptr(bitmap))
        if self.ivf is None:
            scores, local = self.index.search(queries, k, params=faiss.SearchParameters(sel=selector))
            return scores, np.where(local < 0, -1, local + self.start)
        shortlist = min(k * max(refine, 1), len(self))
        wanted = min(shortlist, available)
        distances = np.empty((len(queries), shortlist), np.float32)
        local = np.empty((len(queries), shortlist), np.int64)
        todo = np.arange(len(queries))
        while len(todo):  # deeper probes for the queries whose probed lists held too few allowed entries
            params = faiss.SearchParametersIVF(sel=selector, nprobe=min(nprobe, self.params.nlist))
            distances[todo], local[todo] = self.index.search(queries[todo], shortlist, params=params)
            if nprobe >= self.params.nlist:
                break
            todo = todo[(local[todo] >= 0).sum(1) < wanted]
            nprobe *= 2
        if refine:
            return self._rescore(queries, local, k)
        scores = 1 - distances / 2  # squared L2 distance of unit vectors -> cosine
        return scores, np.where(local < 0, -1, local + self.start)

    def _rescore(self, queries: np.ndarray, local: np.ndarray, k: int):
        """Exact cosine scores of each query's shortlist, read from the memory-mapped vectors."""
        found = local >= 0
        rows = np.where(found, local, 0)
        order = np.argsort(rows, axis=None)  # ascending offsets: sequential-ish reads of the file
        gathered = np.empty((rows.size, self.vectors.shape[1]), np.float32)
        gathered[order] = self.vectors[rows.reshape(-1)[order]]
        scores = np.einsum("qkd,qd->qk", gathered.reshape(*rows.shape, -1), queries)
        scores = np.where(found, scores, -np.inf).astype(np.float32)
        return merge_ranked([(scores, np.where(found, local + self.start, -1))], k)

    def gallery_vectors(self, local: np.ndarray) -> np.ndarray:
        if self.vectors is not None:
            return np.asarray(self.vectors[local], np.float32)
        flat = faiss.rev_swig_ptr(faiss.downcast_index(self.index).get_xb(), len(self) * self.index.d)
        return flat.reshape(len(self), self.index.d)[local]


class GalleryIndex:
    """An index folder opened for search (``open``), or just written (``write_index``)."""

    def __init__(self, directory: Path, description: dict, metadata: pa.Table, shards: list[_Shard]):
        self.directory, self.description, self.metadata, self.shards = directory, description, metadata, shards
        self.model = ModelStamp(**description["model"])
        self.params = IndexParams(**description["params"])
        self.kind: str = self.params.kind
        self.size: int = description["size"]
        self.dim: int = description["dim"]
        self.cameras = metadata.column("camera").to_numpy()
        self.timestamps = metadata.column("timestamp").to_numpy()
        self._pool = ThreadPoolExecutor(max_workers=len(shards)) if len(shards) > 1 else None

    @classmethod
    def open(cls, directory: str | Path) -> GalleryIndex:
        directory = Path(directory)
        description = read_description(directory)
        try:
            metadata = pq.read_table(directory / METADATA_FILE)
        except (OSError, pa.ArrowException) as error:
            raise DatasetError(f"{directory / METADATA_FILE}: cannot be read ({error})") from None
        if metadata.num_rows != description["size"]:
            raise DatasetError(f"{directory / METADATA_FILE}: {metadata.num_rows} rows, the index holds {description['size']}")
        params = IndexParams(**description["params"])
        shards = []
        for entry in description["shards"]:
            path = directory / entry["index"]
            try:
                index = faiss.read_index(str(path))
            except RuntimeError:
                raise DatasetError(f"{path}: missing or not a FAISS index") from None
            vectors = np.load(directory / entry["vectors"], mmap_mode="r") if entry.get("vectors") else None
            shards.append(_Shard(index, entry["start"], entry["stop"], params, vectors))
        return cls(directory, description, metadata, shards)

    def search(
        self,
        queries: np.ndarray,
        top_k: int,
        query_cameras: Sequence[int] | None = None,
        after: float | None = None,
        before: float | None = None,
    ) -> list[list[Hit]]:
        """Each query's ``top_k`` best entries, best first (fewer only when fewer pass the filters).

        ``query_cameras``: per query, drop gallery entries of its camera (-1: none). ``after`` /
        ``before``: keep entries whose timestamp lies in [after, before] (unknown times fail a window).
        """
        scores, rows = self.search_rows(queries, top_k, query_cameras, after, before)
        return [self.hits(s, r) for s, r in zip(scores, rows)]

    def search_rows(
        self,
        queries: np.ndarray,
        top_k: int,
        query_cameras: Sequence[int] | None = None,
        after: float | None = None,
        before: float | None = None,
        nprobe: int = 0,
        refine: int = -1,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(scores, rows), (Q, top_k) best first; -inf / -1 past the entries that pass the filters.
        ``nprobe`` / ``refine`` override the recorded ones (the build's tuning ladder uses them)."""
        nprobe, refine = nprobe or self.params.nprobe, self.params.refine if refine < 0 else refine
        queries = self.check_queries(queries)
        self.check_top_k(top_k)
        if query_cameras is not None and len(query_cameras) != len(queries):
            raise ConfigError(f"{len(query_cameras)} query cameras for {len(queries)} queries")
        scores = np.full((len(queries), top_k), -np.inf, np.float32)
        rows = np.full((len(queries), top_k), -1, np.int64)
        for members, allowed in self._filter_groups(len(queries), query_cameras, after, before):
            block = queries[members]
            work = lambda shard: shard.search(block, top_k, allowed, nprobe, refine)  # noqa: E731
            parts = list(self._pool.map(work, self.shards) if self._pool else map(work, self.shards))
            scores[members], rows[members] = merge_ranked(parts, top_k)
        return scores, rows

    def check_top_k(self, top_k: int) -> None:
        if not 1 <= top_k <= self.size:
            raise ConfigError(f"top-k {top_k} is not between 1 and the size of {self.directory}, {self.size} entries")

    def check_queries(self, queries: np.ndarray) -> np.ndarray:
        queries = np.asarray(queries)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ConfigError(
                f"queries of shape {tuple(queries.shape)} for {self.directory}, which holds {self.dim}-d embeddings "
                f"of {self.model.describe()}"
            )
        bad = np.flatnonzero(~np.isfinite(queries).all(1))
        if len(bad):
            raise ConfigError(f"query {int(bad[0])} has NaN or infinite values")
        return np.ascontiguousarray(queries, np.float32)

    def _filter_groups(self, count: int, query_cameras, after, before):
        """(query indices, allowed mask or None) per distinct filter: queries sharing a camera share one."""
        window = None
        if after is not None or before is not None:
            window = np.ones(self.size, bool)
            if after is not None:
                window &= self.timestamps >= after
            if before is not None:
                window &= self.timestamps <= before
        cameras = np.full(count, -1, np.int64) if query_cameras is None else np.asarray(query_cameras, np.int64)
        for camera in np.unique(cameras):
            allowed = window
            if camera >= 0:
                allowed = (self.cameras != camera) if window is None else window & (self.cameras != camera)
            yield np.flatnonzero(cameras == camera), allowed

    def hits(self, scores: np.ndarray, rows: np.ndarray) -> list[Hit]:
        keep = rows >= 0
        scores, rows = scores[keep], rows[keep]
        columns = self.metadata.take(pa.array(rows)).to_pydict()
        return [
            Hit(int(row), float(score), path, int(camera), float(timestamp), source)
            for row, score, path, camera, timestamp, source in zip(
                rows, scores, columns["path"], columns["camera"], columns["timestamp"], columns["source"]
            )
        ]

    def vectors(self, rows: np.ndarray) -> np.ndarray:
        """The gallery embeddings of ``rows`` (for re-ranking and query expansion), float32 (len, D)."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), self.dim), np.float32)
        for shard in self.shards:
            inside = (rows >= shard.start) & (rows < shard.stop)
            if inside.any():
                out[inside] = shard.gallery_vectors(rows[inside] - shard.start)
        return out

    def info(self) -> dict:
        files = [self.directory / entry["index"] for entry in self.description["shards"]]
        index_bytes = sum(path.stat().st_size for path in files)
        vector_files = [self.directory / entry["vectors"] for entry in self.description["shards"] if entry.get("vectors")]
        return {
            "directory": str(self.directory),
            "size": self.size,
            "dim": self.dim,
            "kind": self.kind,
            "factory": self.params.factory(),
            "params": asdict(self.params),
            "shards": len(self.shards),
            "index_bytes": index_bytes,
            "bytes_per_vector": index_bytes / self.size,
            "vectors_on_disk_bytes": sum(path.stat().st_size for path in vector_files),
            "recall": self.description["recall"],
            "build_s": self.description["build_s"],
            "model": asdict(self.model),
        }


def read_description(directory: Path) -> dict:
    """The contents of an index folder's gallery.json; a DatasetError naming the folder when it is not an index."""
    try:
        description = json.loads((Path(directory) / GALLERY_FILE).read_text())
    except FileNotFoundError:
        raise DatasetError(f"{directory}: not a gallery index (no {GALLERY_FILE}; build one with `reid index build`)") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{Path(directory) / GALLERY_FILE}: not valid JSON: {error}") from None
    if not isinstance(description, dict) or description.get("format") != FORMAT:
        found = description.get("format") if isinstance(description, dict) else None
        raise DatasetError(f"{Path(directory) / GALLERY_FILE}: format {found!r}, expected {FORMAT!r}")
    return description


def _check_gallery(directory: Path, embeddings: np.ndarray, metadata: pa.Table, model: ModelStamp) -> pa.Table:
    if embeddings.ndim != 2 or len(embeddings) == 0:
        raise DatasetError(f"{directory}: the gallery is empty (embeddings of shape {tuple(embeddings.shape)}); nothing to index")
    if embeddings.shape[1] != model.feature_dim:
        raise ConfigError(
            f"{directory}: embeddings have {embeddings.shape[1]} dimensions, {model.describe()} makes {model.feature_dim}"
        )
    missing = [name for name in METADATA_COLUMNS if name not in metadata.column_names]
    if missing:
        raise DatasetError(f"{directory}: metadata lacks the columns {', '.join(missing)} (needs {', '.join(METADATA_COLUMNS)})")
    if metadata.num_rows != len(embeddings):
        raise DatasetError(f"{directory}: {len(embeddings)} embeddings but {metadata.num_rows} metadata rows")
    try:
        metadata = metadata.select(list(METADATA_COLUMNS)).cast(METADATA_SCHEMA)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
        raise DatasetError(f"{directory}: metadata columns do not fit {METADATA_SCHEMA}: {error}") from None
    for start in range(0, len(embeddings), BLOCK_ROWS):
        block = np.asarray(embeddings[start : start + BLOCK_ROWS], np.float32)
        norms = np.linalg.norm(block, axis=1)
        bad = np.flatnonzero(~(np.abs(norms - 1) <= NORM_TOLERANCE))  # NaN fails too
        if len(bad):
            row = start + int(bad[0])
            raise DatasetError(
                f"{directory}: embedding {row} ({metadata.column('path')[row]}) has norm {norms[bad[0]]:.4g}; "
                "the gallery must hold finite L2-normalised embeddings"
            )
    return metadata


def _blocks(embeddings: np.ndarray, start: int, stop: int):
    for first in range(start, stop, BLOCK_ROWS):
        yield np.ascontiguousarray(embeddings[first : min(first + BLOCK_ROWS, stop)], np.float32)


def write_index(
    directory: str | Path,
    embeddings: np.ndarray,
    metadata: pa.Table,
    model: ModelStamp,
    kind: Kind = "auto",
    shards: int = 1,
    params: IndexParams | None = None,
    recall_target: float = RECALL_TARGET,
    seed: int = 0,
) -> GalleryIndex:
    """Index ``embeddings`` (N, D) float32 L2-normalised, in the order of ``metadata``'s rows, into
    ``directory``; returns it opened.

    ``embeddings`` is read a block at a time, so it may be a memory-mapped array larger than memory.
    ``params`` (say ``choose_params(...)`` with a fixed nprobe) skips the choice by size; the recall
    ladder still tunes nprobe/refine when they are 0.
    """
    started = time.perf_counter()
    directory = Path(directory)
    metadata = _check_gallery(directory, embeddings, metadata, model)
    size, dim = embeddings.shape
    if not 1 <= shards <= size:
        raise ConfigError(f"{shards} shards for a gallery of {size} entries: use 1 to {size}")
    params = params or choose_params(size, dim, kind)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / GALLERY_FILE).unlink(missing_ok=True)  # the folder is not an index until it is complete
    rng = np.random.default_rng(seed)
    template = faiss.IndexFlatIP(dim)
    if params.kind == "ivfpq":
        template = faiss.index_factory(dim, params.factory(), faiss.METRIC_L2)
        sample = np.sort(rng.choice(size, params.train_size, replace=False))
        template.train(np.ascontiguousarray(embeddings[sample], np.float32))
    bounds = [int(b) for b in np.linspace(0, size, shards + 1).round()]
    entries, opened = [], []
    for number, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        index = faiss.clone_index(template)
        entry = {"index": f"index-{number:05d}.faiss", "start": start, "stop": stop}
        vectors = None
        if params.kind == "ivfpq":
            entry["vectors"] = f"vectors-{number:05d}.npy"
            vectors = np.lib.format.open_memmap(directory / entry["vectors"], "w+", np.float32, (stop - start, dim))
        for first, block in zip(range(start, stop, BLOCK_ROWS), _blocks(embeddings, start, stop)):
            index.add(block)
            if vectors is not None:
                vectors[first - start : first - start + len(block)] = block
        if vectors is not None:
            vectors.flush()
            vectors = np.load(directory / entry["vectors"], mmap_mode="r")
        faiss.write_index(index, str(directory / entry["index"]))
        entries.append(entry)
        opened.append(_Shard(index, start, stop, params, vectors))
    pq.write_table(metadata, directory / METADATA_FILE)
    description = {
        "format": FORMAT, "model": asdict(model), "size": size, "dim": dim, "params": asdict(params),
        "shards": entries, "recall": {}, "build_s": 0.0,
    }  # fmt: skip
    gallery = GalleryIndex(directory, description, metadata, opened)
    recall = _tune(gallery, embeddings, recall_target, rng)
    gallery.params = params = replace(params, nprobe=recall.pop("nprobe"), refine=recall.pop("refine"))
    description.update(params=asdict(params), recall=recall, build_s=round(time.perf_counter() - started, 3))
    (directory / GALLERY_FILE).write_text(json.dumps(description, indent=2))
    return gallery


def exact_top(gallery_vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Rows of each query's ``k`` largest inner products over the whole gallery (brute force, by blocks)."""
    flat = faiss.IndexFlatIP(gallery_vectors.shape[1])
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start, block in zip(range(0, len(gallery_vectors), BLOCK_ROWS), _blocks(gallery_vectors, 0, len(gallery_vectors))):
        flat.reset()
        flat.add(block)
        scores, rows = flat.search(queries, min(k, len(block)))
        best_scores, best_rows = merge_ranked([(best_scores, best_rows), (scores, rows + start)], k)
    return best_rows


def recall_at(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean fraction of each query's exact top rows that the approximate ranking also returns."""
    return float(np.mean([len(np.intersect1d(a[a >= 0], e)) / len(e) for a, e in zip(approximate, exact)]))


def _tune(gallery: GalleryIndex, embeddings: np.ndarray, target: float, rng: np.random.Generator) -> dict:
    """The recall@10 against exact on a held sample of gallery vectors as queries (each query's own
    row excluded from both rankings), and for ivfpq the cheapest (nprobe, refine) reaching ``target``."""
    params = gallery.params
    if params.kind == "flat":
        return {"at": RECALL_AT, "estimate": 1.0, "queries": 0, "target": target, "exact": True, "nprobe": 0, "refine": 0}
    held = np.sort(rng.choice(gallery.size, min(RECALL_QUERIES, gallery.size), replace=False))
    queries = np.ascontiguousarray(embeddings[held], np.float32)
    k = min(RECALL_AT + 1, gallery.size)

    def without_self(rows):
        return np.stack([r[r != own][: k - 1] if (r == own).any() else r[: k - 1] for r, own in zip(rows, held)])

    exact = without_self(exact_top(embeddings, queries, k))
    ladder = [(nprobe, refine) for refine in ((params.refine,) if params.refine else REFINE_LADDER)
              for nprobe in ((params.nprobe,) if params.nprobe else NPROBE_LADDER) if nprobe <= params.nlist]  # fmt: skip
    measured = None
    for nprobe, refine in ladder:
        _, rows = gallery.search_rows(queries, k, nprobe=nprobe, refine=refine)
        measured = {"nprobe": nprobe, "refine": refine, "estimate": recall_at(without_self(rows), exact)}
        if measured["estimate"] >= target:
            break
    return {"at": RECALL_AT, "queries": len(held), "target": target, "exact": False, **measured}
