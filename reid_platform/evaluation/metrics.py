"""Re-ID retrieval metrics: CMC, mAP and mINP under the Market-1501 protocol.

Protocol (as torchreid and fast-reid): for each query, gallery items with the same person id *and*
the same camera are junk and removed; the rest is ranked by distance, ties broken by gallery index
(a stable sort). A query with no true match left is skipped and counted. AP averages precision at
the rank of every true match over the whole list; INP is (true matches) / (rank of the last one).

Queries are processed in chunks, so memory is bounded by ``chunk x gallery``, never query x gallery.
Every query yields a ``QueryResult`` row; summing rows in query order gives the same floats however the
queries were split between processes.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

Metric = Literal["cosine", "euclidean"]


class EvaluationError(ValueError):
    """Inputs that cannot be evaluated; the message names the problem and the count."""


@dataclass(frozen=True)
class FeatureSet:
    features: torch.Tensor  # (N, d)
    person_ids: torch.Tensor  # (N,) int64
    camera_ids: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.features.shape[0]


@dataclass(frozen=True)
class QueryResults:
    """Per-query outcomes, aligned with the queries. ``first_rank`` is 0 for skipped queries."""

    first_rank: torch.Tensor  # (Q,) int64, 1-based rank of the first true match
    average_precision: torch.Tensor  # (Q,) float64
    inverse_negative_penalty: torch.Tensor  # (Q,) float64
    valid: torch.Tensor  # (Q,) bool

    @staticmethod
    def empty() -> QueryResults:
        no_rows = torch.zeros(0, dtype=torch.float64)
        return QueryResults(torch.zeros(0, dtype=torch.int64), no_rows, no_rows, torch.zeros(0, dtype=torch.bool))


@dataclass(frozen=True)
class RetrievalMetrics:
    cmc: np.ndarray  # (max_rank,) fraction of valid queries matched within the top k
    mAP: float
    mINP: float
    valid_queries: int
    skipped_queries: int

    def summary(self) -> dict[str, float | int]:
        ranks = {f"rank{k}": float(self.cmc[k - 1]) for k in (1, 5, 10) if k <= len(self.cmc)}
        return {
            **ranks,
            "mAP": self.mAP,
            "mINP": self.mINP,
            "valid_queries": self.valid_queries,
            "skipped_queries": self.skipped_queries,
        }


def _check(name: str, features: FeatureSet) -> None:
    n = len(features)
    if n == 0:
        raise EvaluationError(f"{name} set is empty")
    for field in ("person_ids", "camera_ids"):
        length = getattr(features, field).shape[0]
        if length != n:
            raise EvaluationError(f"{name}: {n} feature rows but {length} {field}")
    bad = torch.nonzero(~torch.isfinite(features.features).all(dim=1)).squeeze(1)
    if bad.numel():
        raise EvaluationError(
            f"{name}: {bad.numel()} of {n} feature rows contain NaN or infinite values (first: row {int(bad[0])})"
        )


def pairwise_distance(query: torch.Tensor, gallery: torch.Tensor, metric: Metric) -> torch.Tensor:
    """Distances whose order is the ranking: 1 - cosine, or squared Euclidean."""
    if metric == "cosine":
        return 1.0 - F.normalize(query, dim=1) @ F.normalize(gallery, dim=1).t()
    return torch.cdist(query, gallery).square_()


def rank_queries(
    query: FeatureSet,
    gallery: FeatureSet,
    metric: Metric = "cosine",
    chunk_size: int = 256,
    rows: slice = slice(None),
) -> QueryResults:
    """Per-query first-match rank, AP and INP for ``query[rows]``, ``chunk_size`` queries at a time.

    Inputs are checked whole, so every process of a distributed evaluation agrees on whether they
    are valid, even one whose slice of queries is empty.
    """
    _check("query", query)
    _check("gallery", gallery)
    parts = [QueryResults.empty()]
    first_row, last_row, _ = rows.indices(len(query))
    for start in range(first_row, last_row, chunk_size):
        rows = slice(start, min(start + chunk_size, last_row))
        distance = pairwise_distance(query.features[rows], gallery.features, metric)
        order = torch.sort(distance, dim=1, stable=True).indices
        same_id = gallery.person_ids[order] == query.person_ids[rows, None]
        keep = ~(same_id & (gallery.camera_ids[order] == query.camera_ids[rows, None]))
        match = same_id & keep
        rank_in_kept = torch.cumsum(keep, dim=1)
        matches_so_far = torch.cumsum(match, dim=1)
        num_matches = match.sum(dim=1)
        valid = num_matches > 0
        first = torch.where(match, rank_in_kept, torch.iinfo(torch.int64).max).min(dim=1).values
        last = torch.where(match, rank_in_kept, 0).max(dim=1).values
        precision = torch.where(match, matches_so_far.double() / rank_in_kept, 0.0)
        denominator = num_matches.clamp_min(1).to(torch.float64)
        parts.append(
            QueryResults(
                first_rank=torch.where(valid, first, 0),
                average_precision=torch.where(valid, precision.sum(dim=1) / denominator, 0.0),
                inverse_negative_penalty=torch.where(valid, num_matches / last.clamp_min(1).double(), 0.0),
                valid=valid,
            )
        )
    return QueryResults(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(QueryResults)})


def summarize(results: QueryResults, max_rank: int = 10) -> RetrievalMetrics:
    """Average per-query results over the valid queries."""
    valid = int(results.valid.sum())
    if valid == 0:
        raise EvaluationError(
            f"none of the {results.valid.numel()} queries has a true match in the gallery "
            "after removing same-id same-camera images"
        )
    first = results.first_rank[results.valid]
    cmc = np.array([(first <= k).sum().item() / valid for k in range(1, max_rank + 1)])
    return RetrievalMetrics(
        cmc=cmc,
        mAP=results.average_precision[results.valid].sum().item() / valid,
        mINP=results.inverse_negative_penalty[results.valid].sum().item() / valid,
        valid_queries=valid,
        skipped_queries=results.valid.numel() - valid,
    )


def evaluate(
    query: FeatureSet, gallery: FeatureSet, metric: Metric = "cosine", max_rank: int = 10, chunk_size: int = 256
) -> RetrievalMetrics:
    return summarize(rank_queries(query, gallery, metric, chunk_size), max_rank)
