"""A gallery embedded with Ray Data into an index: `reid index build`.

The entries (``sources.list_entries``) are cut into parts of ``PART_ROWS`` consecutive entries; a
part's file name carries a digest of its entries' paths and of the model (weights, description,
flip), so the same gallery and model give the same parts on every run. Only the parts missing from
``INDEX_DIR/embeddings/`` are embedded: a build that was interrupted (killed, a lost node, a bad
sample with ``--on-bad-sample fail``) embeds only the rest when run again, and a changed gallery
or model re-embeds only the parts whose digest changed.

The missing parts flow through one Ray Data ``map_batches`` stage over a pool of actors, each
holding the model once (one GPU per actor where the cluster has GPUs, else a node's cores). An
actor reads its part's crops (``sources.read_crop``) and decodes them with the model's own
preprocessing (``model/preprocess.eval_transform``) on a few threads while the network embeds the
previous batch, and returns every entry's embedding or the reason its image does not decode. The
driver writes each part as it completes (a parquet file, renamed into place), then concatenates
them and writes the index (``search/index.write_index``) with the model's stamp.
"""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reid_platform.errors import ConfigError, DatasetError
from reid_platform.search.index import METADATA_COLUMNS, GalleryIndex, write_index
from reid_platform.search.model import GalleryModel, load_files
from reid_platform.search.sources import list_entries, read_crop

PART_ROWS = 1024  # entries per part: the unit of resumption and of an actor's call
PARTS_FOLDER = "embeddings"  # INDEX_DIR/embeddings/part-NNNNN-DIGEST.parquet


@dataclass(frozen=True)
class BuildResult:
    index: GalleryIndex
    entries: int  # in the gallery's listing
    embedded: int  # entries embedded by this run (the others' parts were there)
    skipped: list[tuple[str, str]]  # (path, why) of the entries left out of the index
    seconds: float


@dataclass(frozen=True)
class _Part:
    number: int
    rows: range  # positions of its entries in the listing
    path: Path


def plan_parts(entries: pa.Table, model: GalleryModel, folder: Path, part_rows: int = PART_ROWS) -> list[_Part]:
    """The parts of a listing: consecutive runs of ``part_rows`` entries, each named by its number and
    a digest of its entries' paths and the model."""
    paths = entries.column("path").to_pylist()
    parts = []
    for number, start in enumerate(range(0, len(paths), part_rows)):
        rows = range(start, min(start + part_rows, len(paths)))
        digest = hashlib.sha256(model.fingerprint.encode())
        for path in paths[start : rows.stop]:
            digest.update(path.encode() + b"\0")
        parts.append(_Part(number, rows, folder / f"part-{number:05d}-{digest.hexdigest()[:16]}.parquet"))
    return parts


def build_gallery(
    model: GalleryModel,
    data: str,
    out: Path,
    split: str = "gallery",
    kind: str = "auto",
    shards: int = 1,
    batch_size: int = 64,
    actors: int | None = None,
    on_bad_sample: str = "skip",
    part_rows: int = PART_ROWS,
    progress: bool = True,
) -> BuildResult:
    """Embed the gallery at ``data`` with ``model`` into an index at ``out`` (see the module's
    docstring). The listing, the output folder and the model are checked before Ray starts."""
    started = time.perf_counter()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out}: a file is there, not a folder")
    entries = list_entries(data, split)
    folder = out / PARTS_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    parts = plan_parts(entries, model, folder, part_rows)
    planned = {part.path.name for part in parts}
    for stale in folder.iterdir():  # other galleries' or models' parts, and files of a killed write
        if stale.name not in planned:
            stale.unlink()
    missing = [part for part in parts if not part.path.exists()]
    if missing:
        _embed_parts(model, entries, missing, batch_size, actors, on_bad_sample, progress)
    table = pa.concat_tables([pq.read_table(part.path) for part in parts])
    problems = table.column("problem").to_numpy(zero_copy_only=False)
    bad = np.flatnonzero(problems != "")
    skipped = [(entries.column("path")[int(row)].as_py(), str(problems[row])) for row in bad]
    if skipped and on_bad_sample == "fail":
        raise _bad_sample_error(skipped, len(entries))
    good = np.flatnonzero(problems == "")
    if not len(good):
        raise DatasetError(f"{data}: none of the {len(entries)} gallery images decodes (first: {skipped[0][0]}: {skipped[0][1]})")
    embeddings = _embedding_matrix(table.column("embedding"), model.stamp.feature_dim)[good]
    metadata = entries.select(list(METADATA_COLUMNS)).take(pa.array(good))
    index = write_index(out, embeddings, metadata, model.stamp, kind=kind, shards=shards)
    embedded = sum(len(part.rows) for part in missing)
    return BuildResult(index, len(entries), embedded, skipped, time.perf_counter() - started)


def _bad_sample_error(skipped: list[tuple[str, str]], total: int) -> DatasetError:
    named = "; ".join(f"{path}: {why}" for path, why in skipped[:10])
    more = f" (and {len(skipped) - 10} more)" if len(skipped) > 10 else ""
    return DatasetError(
        f"{len(skipped)} of {total} gallery images do not decode: {named}{more} "
        "(--on-bad-sample skip leaves them out of the index)"
    )


def _embedding_matrix(column: pa.ChunkedArray, dimension: int) -> np.ndarray:
    values = pa.concat_arrays([chunk.flatten() for chunk in column.chunks])
    return values.to_numpy(zero_copy_only=False).astype(np.float32, copy=False).reshape(-1, dimension)


def _embed_parts(
    model: GalleryModel, entries: pa.Table, parts: list[_Part], batch_size: int, actors: int | None,
    on_bad_sample: str, progress: bool,
) -> None:  # fmt: skip
    """The parts embedded by a Ray Data actor pool, each written as soon as all its rows are back."""
    import ray
    import ray.data

    from reid_platform.run.launcher import connect_ray

    own_cluster = connect_ray()
    try:
        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = progress
        context.enable_operator_progress_bars = progress
        paths = entries.column("path")
        blocks = [
            pa.table({"row": pa.array(part.rows, pa.int64()), "part": pa.array([part.number] * len(part.rows), pa.int64()),
                      "path": paths.slice(part.rows.start, len(part.rows))})
            for part in parts
        ]  # fmt: skip
        resources = _actor_resources(ray.cluster_resources(), len(ray.nodes()), actors)
        embedded = ray.data.from_arrow(blocks).map_batches(
            Embedder,
            batch_size=None,  # a whole part per call: the actor batches for the network itself
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=resources["actors"]),
            num_cpus=resources["num_cpus"],
            num_gpus=resources["num_gpus"],
            fn_constructor_kwargs={"model": [ray.put(model.files)], "flip": model.stamp.flip,
                                   "batch_size": batch_size, "threads": int(resources["num_cpus"])},
        )  # fmt: skip
        by_number = {part.number: part for part in parts}
        pending: dict[int, list[pa.Table]] = {}
        for batch in embedded.iter_batches(batch_size=None, batch_format="pyarrow"):
            if on_bad_sample == "fail":
                problems = batch.column("problem").to_numpy(zero_copy_only=False)
                if (problems != "").any():
                    skipped = [(paths[int(row)].as_py(), str(why)) for row, why in
                               zip(batch.column("row").to_numpy(), problems) if why]  # fmt: skip
                    raise _bad_sample_error(skipped, len(entries))
            for number in np.unique(batch.column("part").to_numpy()):
                pending.setdefault(int(number), []).append(batch.filter(pc.equal(batch.column("part"), number)))
                part = by_number[int(number)]
                if sum(piece.num_rows for piece in pending[part.number]) == len(part.rows):
                    _write_part(part.path, pa.concat_tables(pending.pop(part.number)))
    finally:
        if own_cluster:
            ray.shutdown()


def _actor_resources(cluster: dict[str, float], nodes: int, actors: int | None) -> dict:
    """One actor per GPU when the cluster has GPUs (with its share of the cores for decoding),
    else one per node with the node's cores (``actors`` overrides the count)."""
    cpus, gpus = cluster.get("CPU", 1.0), int(cluster.get("GPU", 0))
    count = actors or gpus or nodes
    if gpus and count > gpus:
        raise ConfigError(f"--actors {count}: each actor holds a GPU and the cluster has {gpus}")
    return {"actors": count, "num_gpus": 1 if gpus else 0, "num_cpus": max(1.0, float(int(cpus // count)))}


def _write_part(path: Path, results: pa.Table) -> None:
    """A part's rows in order, renamed into place once written (a killed write leaves no part)."""
    results = results.select(["row", "embedding", "problem"]).sort_by("row")
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    pq.write_table(results, partial)
    os.replace(partial, path)


class Embedder:
    """A Ray Data actor: the model loaded once, then each call's entries read, decoded and embedded."""

    def __init__(self, model: list, flip: bool, batch_size: int, threads: int) -> None:
        import ray
        import torch

        from reid_platform.model.preprocess import eval_transform

        torch.set_num_threads(max(1, threads))
        network, preprocessing = load_files(ray.get(model[0]))
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.model = network.to(self.device).eval()
        self.transform = eval_transform(preprocessing)
        self.flip, self.batch_size = flip, batch_size
        self.readers = ThreadPoolExecutor(max(2, threads))  # crops read and decoded in parallel
        self.loader = ThreadPoolExecutor(1)  # the next batch's, while the network runs this one

    def _load(self, path: str):
        from reid_platform.data.images import decode_rgb

        try:
            image, problem = decode_rgb(read_crop(path))
        except DatasetError as error:
            return None, str(error).removeprefix(f"{path}: ")
        return (self.transform(image), "") if image is not None else (None, problem)

    def _load_batch(self, paths: list[str]) -> list:
        return list(self.readers.map(self._load, paths))

    def __call__(self, batch: pa.Table) -> pa.Table:
        import torch

        paths = batch.column("path").to_pylist()
        batches = [paths[start : start + self.batch_size] for start in range(0, len(paths), self.batch_size)]
        embeddings = np.zeros((len(paths), self.model.feature_dim), np.float32)
        problems = [""] * len(paths)
        upcoming = self.loader.submit(self._load_batch, batches[0]) if batches else None
        for number in range(len(batches)):
            loaded = upcoming.result()
            if number + 1 < len(batches):
                upcoming = self.loader.submit(self._load_batch, batches[number + 1])
            start = number * self.batch_size
            good = [i for i, (tensor, _) in enumerate(loaded) if tensor is not None]
            for i, (_, problem) in enumerate(loaded):
                problems[start + i] = problem
            if good:
                with torch.no_grad():
                    images = torch.stack([loaded[i][0] for i in good]).to(self.device)
                    embeddings[[start + i for i in good]] = self.model.embed(images, self.flip).float().cpu().numpy()
        vectors = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1)), self.model.feature_dim)
        return pa.table({"row": batch.column("row"), "part": batch.column("part"), "embedding": vectors,
                         "problem": pa.array(problems, pa.string())})  # fmt: skip

