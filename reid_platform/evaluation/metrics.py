"""Re-ID retrieval metrics: the per-query outcomes and their averages (CMC, mAP, mINP).

``ranking.py`` turns features into one ``QueryResults`` row per query; ``summarize`` averages the
valid rows. Summing rows in query order gives the same floats however the queries were split
between processes, which is what makes a distributed evaluation equal a single-process one.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from reid_platform.errors import EvaluationError


@dataclass(frozen=True)
class FeatureSet:
    features: torch.Tensor  # (N, d)
    person_ids: torch.Tensor  # (N,) int64
    camera_ids: torch.Tensor  # (N,) int64

    def __len__(self) -> int:
        return self.features.shape[0]

    def check(self, name: str) -> None:
        n = len(self)
        if n == 0:
            raise EvaluationError(f"{name} set is empty")
        for field in ("person_ids", "camera_ids"):
            length = getattr(self, field).shape[0]
            if length != n:
                raise EvaluationError(f"{name}: {n} feature rows but {length} {field}")
        # by blocks: isfinite(...).all(dim=1) on a whole gallery would briefly double its memory
        finite = torch.cat([torch.isfinite(block).all(dim=1) for block in self.features.split(8192)])
        bad = torch.nonzero(~finite).squeeze(1)
        if bad.numel():
            raise EvaluationError(
                f"{name}: {bad.numel()} of {n} feature rows contain NaN or infinite values (first: row {int(bad[0])})"
            )


def check_sets(query: FeatureSet, gallery: FeatureSet) -> None:
    query.check("query")
    gallery.check("gallery")
    if query.features.shape[1] != gallery.features.shape[1]:
        raise EvaluationError(
            f"query features have {query.features.shape[1]} dimensions, gallery features {gallery.features.shape[1]}"
        )


@dataclass(frozen=True)
class QueryResults:
    """Per-query outcomes, aligned with the queries; skipped queries hold zeros.

    ``first_rank[q, r]`` is the 1-based rank of the first true match in repeat ``r`` (one repeat,
    except under the CUHK03 protocol, which samples the gallery several times).
    """

    first_rank: torch.Tensor  # (Q, repeats) int64
    average_precision: torch.Tensor  # (Q,) float64
    inverse_negative_penalty: torch.Tensor  # (Q,) float64
    valid: torch.Tensor  # (Q,) bool

    @staticmethod
    def concat(parts: list[QueryResults]) -> QueryResults:
        return QueryResults(**{f.name: torch.cat([getattr(p, f.name) for p in parts]) for f in fields(QueryResults)})


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


def summarize(results: QueryResults, max_rank: int = 10) -> RetrievalMetrics:
    """Average per-query results over the valid queries."""
    valid = int(results.valid.sum())
    if valid == 0:
        raise EvaluationError(
            f"none of the {results.valid.numel()} queries has a true match in the gallery (an image of "
            "its person id; from another camera, unless the protocol is no_camera)"
        )
    first = results.first_rank[results.valid]
    hits = torch.stack([(first <= k).double().mean(dim=1).sum() for k in range(1, max_rank + 1)])
    return RetrievalMetrics(
        cmc=(hits / valid).numpy(),
        mAP=results.average_precision[results.valid].sum().item() / valid,
        mINP=results.inverse_negative_penalty[results.valid].sum().item() / valid,
        valid_queries=valid,
        skipped_queries=results.valid.numel() - valid,
    )
