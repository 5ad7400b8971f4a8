"""Query-by-gallery distances, produced a block of query rows at a time.

The ranking engine never asks for the whole query x gallery matrix: it calls a ``Distances`` with a
slice of query rows and gets a fresh ``(rows, gallery)`` float32 block it may overwrite. Plain feature
distances and k-reciprocal re-ranking (``rerank.py``) both fit behind that one call.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from reid_platform.errors import EvaluationError
from reid_platform.evaluation.config import Metric

# Squared norms below this keep every squared Euclidean distance, |a|^2 + |b|^2 - 2ab, finite in float32.
LARGEST_SQUARED_NORM = torch.finfo(torch.float32).max / 4

class Distances(Protocol):
    num_gallery: int

    def __call__(self, rows: slice) -> torch.Tensor: ...


def squared_euclidean(a: torch.Tensor, b: torch.Tensor, a_norms: torch.Tensor, b_norms: torch.Tensor) -> torch.Tensor:
    """||a - b||^2 through one matrix product (as torch.cdist does for large inputs)."""
    return torch.addmm(b_norms.unsqueeze(0), a, b.t(), alpha=-2.0).add_(a_norms.unsqueeze(1))


def squared_norms(features: torch.Tensor, block_rows: int = 8192) -> torch.Tensor:
    """Row-wise squared L2 norms in float32, a block at a time (no temporary the size of the set)."""
    return torch.cat([block.float().square().sum(1) for block in features.split(block_rows)])


def check_magnitude(name: str, norms: torch.Tensor, metric: Metric) -> None:
    limit = LARGEST_SQUARED_NORM if metric == "euclidean" else float("inf")
    too_large = torch.nonzero(~(norms < limit)).squeeze(1)  # an overflowing norm is inf
    if too_large.numel():
        raise EvaluationError(
            f"{name}: {too_large.numel()} feature rows are too large for float32 {metric} distances "
            f"(first: row {int(too_large[0])}, squared norm {norms[too_large[0]].item():.3g}); rescale the features"
        )


def unit_rows(features: torch.Tensor, norms: torch.Tensor | None = None) -> torch.Tensor:
    """L2-normalised float32 rows, copied once up front, or the input itself when it already is.

    Model embeddings come out normalised; not copying them saves a gallery-sized array.
    """
    norms = squared_norms(features) if norms is None else norms
    if features.dtype == torch.float32 and bool(((norms - 1).abs() < 1e-6).all()):
        return features
    return F.normalize(features.float(), dim=1)


class FeatureDistances:
    """1 - cosine similarity, or squared Euclidean distance (same order as Euclidean, no sqrt)."""

    def __init__(self, query: torch.Tensor, gallery: torch.Tensor, metric: Metric = "cosine"):
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"unknown distance metric {metric!r}: use 'cosine' or 'euclidean'")
        self.metric, self.num_gallery = metric, gallery.shape[0]
        if metric == "euclidean":
            # Distances do not change under translation, but float32 |a|^2 + |b|^2 - 2ab cancels
            # badly far from the origin: centre both sets on the gallery mean first.
            centre = sum(block.double().sum(0) for block in gallery.split(8192)) / max(len(gallery), 1)
            query, gallery = query.float() - centre.float(), gallery.float() - centre.float()
        query_norms, gallery_norms = squared_norms(query), squared_norms(gallery)
        check_magnitude("query", query_norms, metric)
        check_magnitude("gallery", gallery_norms, metric)
        if metric == "cosine":
            self.query, self.gallery = unit_rows(query, query_norms), unit_rows(gallery, gallery_norms)
        else:
            self.query, self.gallery = query, gallery
            self.query_norms, self.gallery_norms = query_norms, gallery_norms

    def __call__(self, rows: slice) -> torch.Tensor:
        if self.metric == "cosine":
            return torch.addmm(torch.ones(()), self.query[rows], self.gallery.t(), alpha=-1.0)
        return squared_euclidean(self.query[rows], self.gallery, self.query_norms[rows], self.gallery_norms)
