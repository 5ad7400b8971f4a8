"""Gallery search at 100 k and 1 M entries: build time, index bytes per vector, query latency and
recall against the exact ranking of ``reid_platform.evaluation``, in the same run.

Galleries are synthetic 512-d embeddings clustered by identity (seeded): ``IMAGES_PER_ID`` images per
identity on average, each its identity's unit centre plus isotropic noise scaled so that two
images of one identity have cosine similarity ``SAME_ID_COSINE`` on average (a trained re-ID model's
same-identity similarity is about 0.5-0.7; distinct identities are near 0). Queries are fresh
draws of gallery identities, not gallery entries. The exact ranking is the evaluator's:
``evaluation.ranking.top_ranked`` over ``FeatureDistances`` (cosine distance, stable sort), so recall
is measured against what ``reid eval`` ranks, not against FAISS's own exact index.

For each gallery size and index kind (``flat``: exact; ``ivfpq``: the default above
``FLAT_LIMIT``, nprobe and refine tuned at build against a recall@10 target of 0.95), the index is
built through ``write_index`` and queried through ``GalleryIndex.search_rows``; latency is the
wall time of one call at batch 1 (each of ``--queries`` queries) and at batch 64. ``bytes_per_vector``
is the in-memory index (FAISS files: codes, ids, quantizers) over the gallery size; an ivfpq
index also keeps the float32 vectors on disk for the exact re-scoring of its shortlist
(``vectors_disk_bytes_per_vector``, memory-mapped: the page cache holds what queries touch).

    python benchmarks/search.py --sizes 100000 1000000

One JSON line per gallery size, index kind and batch. The embedding throughput on real packed
images (issue 27's other benchmark) is measured by the gallery builder's benchmark, not here.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid_platform.evaluation.distance import FeatureDistances
from reid_platform.evaluation.metrics import FeatureSet
from reid_platform.evaluation.ranking import top_ranked
from reid_platform.search.index import GalleryIndex, ModelStamp, write_index

DIM = 512
IMAGES_PER_ID = 20
SAME_ID_COSINE = 0.6
BATCH = 64


def clustered(count: int, centres: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``count`` unit vectors around random identity centres (see the module docstring), by blocks."""
    noise = np.sqrt(1 / SAME_ID_COSINE - 1) / np.sqrt(centres.shape[1])
    out = np.empty((count, centres.shape[1]), np.float32)
    for start in range(0, count, 65536):
        stop = min(start + 65536, count)
        block = centres[rng.integers(0, len(centres), stop - start)]
        block += rng.standard_normal(block.shape, dtype=np.float32) * noise
        out[start:stop] = block / np.linalg.norm(block, axis=1, keepdims=True)
    return out


def exact_ranking(gallery: np.ndarray, queries: np.ndarray, top: int) -> np.ndarray:
    """Each query's ``top`` gallery rows as the evaluator ranks them."""
    labels = torch.zeros(len(gallery), dtype=torch.int64)
    gallery_set = FeatureSet(torch.from_numpy(gallery), labels, labels)
    query_labels = torch.ones(len(queries), dtype=torch.int64)
    query_set = FeatureSet(torch.from_numpy(queries), query_labels, query_labels)
    distances = FeatureDistances(query_set.features, gallery_set.features)
    ranked = top_ranked(query_set, gallery_set, distances, list(range(len(queries))), top, "no_camera")
    return np.array([rows for rows, _ in ranked])


def recall(found: np.ndarray, exact: np.ndarray, at: int) -> float:
    return float(np.mean([len(np.intersect1d(f[:at], e[:at])) / at for f, e in zip(found, exact)]))


def measure(index: GalleryIndex, queries: np.ndarray, batch: int) -> tuple[list[float], np.ndarray]:
    """Per-call latencies (ms) and the rows found (top 10), at ``batch`` queries a call."""
    index.search_rows(queries[:batch], 10)  # warm: page in the index and the shortlisted vectors' pages
    latencies, rows = [], []
    for start in range(0, len(queries) - batch + 1, batch):
        started = time.perf_counter()
        _, found = index.search_rows(queries[start : start + batch], 10)
        latencies.append((time.perf_counter() - started) * 1e3)
        rows.append(found)
    return latencies, np.concatenate(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--kinds", nargs="+", default=["flat", "ivfpq"], choices=["flat", "ivfpq"])
    parser.add_argument("--queries", type=int, default=640, help="queries timed at batch 1 (and at batch 64)")
    parser.add_argument("--scratch", default=None, help="folder for the indexes (default: a temporary one)")
    args = parser.parse_args()
    stamp = ModelStamp("synthetic", None, None, None, DIM, False)
    for size in args.sizes:
        rng = np.random.default_rng(size)
        centres = rng.standard_normal((max(1, size // IMAGES_PER_ID), DIM), dtype=np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        gallery, queries = clustered(size, centres, rng), clustered(args.queries, centres, rng)
        started = time.perf_counter()
        exact = exact_ranking(gallery, queries, 10)
        exact_s = time.perf_counter() - started
        metadata = pa.table({
            "path": [f"synthetic/{row}.jpg" for row in range(size)], "camera": rng.integers(0, 6, size),
            "timestamp": np.zeros(size), "source": ["synthetic"] * size,
        })  # fmt: skip
        for kind in args.kinds:
            with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
                index = write_index(Path(scratch) / "index", gallery, metadata, stamp, kind=kind)
                info = index.info()
                for batch in (1, BATCH):
                    latencies, found = measure(index, queries, batch)
                    print(json.dumps({
                        "gallery": size, "index": kind, "batch": batch,
                        "p50_ms": round(float(np.percentile(latencies, 50)), 3),
                        "p99_ms": round(float(np.percentile(latencies, 99)), 3),
                        "recall_at_1": recall(found, exact[: len(found)], 1),
                        "recall_at_10": recall(found, exact[: len(found)], 10),
                        "bytes_per_vector": round(info["bytes_per_vector"], 2),
                        "build_s": info["build_s"],
                        "factory": info["factory"], "nprobe": info["params"]["nprobe"], "refine": info["params"]["refine"],
                        "recall_at_10_estimated_at_build": info["recall"]["estimate"],
                        "vectors_disk_bytes_per_vector": round(info["vectors_on_disk_bytes"] / size, 2),
                        "queries": len(found), "exact_ranking_s": round(exact_s, 1),
                        "load_average": round(os.getloadavg()[0], 2),
                    }), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
