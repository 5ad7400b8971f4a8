"""Exact CMC, AP and INP without sorting the gallery.

AP and INP need only the rank of each true match among the kept gallery, and CMC only the rank of the
first one. A query has few true matches (tens) against a gallery of up to millions, so instead of
argsorting each distance row we sort the true matches and count the negatives before each of them
(``kernels.py``, one pass over the row):

    rank of the k-th true match (1-based) = k + negatives before it

Ties in distance are broken by gallery index, exactly like a stable sort. Query rows are processed
in blocks whose float32 distances fit the memory budget, so peak memory is ``budget + features``,
never query x gallery.

Protocols (``config.Protocol``): "market" removes gallery images with the query's id and camera
(Market-1501, DukeMTMC-reID, MSMT17); "no_camera" keeps them all; "cuhk03" is the old CUHK03 protocol:
CMC averaged over repeats that each keep one random gallery image per identity (the query's own
identity draws among its kept images), while mAP and mINP use the whole kept gallery, as torchreid.
"""

from __future__ import annotations

import torch

from reid_platform.errors import EvaluationError
from reid_platform.evaluation.config import EvaluationConfig, Protocol
from reid_platform.evaluation.distance import Distances, FeatureDistances, unit_rows
from reid_platform.evaluation.expansion import expand_queries
from reid_platform.evaluation.kernels import negatives_before_matches
from reid_platform.evaluation.metrics import FeatureSet, QueryResults, RetrievalMetrics, check_sets, summarize
from reid_platform.evaluation.rerank import RerankedDistances

NO_INDEX = torch.iinfo(torch.int64).max


class GalleryByIdentity:
    """Gallery positions grouped by person id, to list each query's same-id images in a block."""

    def __init__(self, person_ids: torch.Tensor):
        self.order = torch.argsort(person_ids, stable=True)
        self.ids, self.counts = torch.unique_consecutive(person_ids[self.order], return_counts=True)
        self.starts = torch.cumsum(self.counts, 0) - self.counts

    def same_identity(self, query_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(gallery indices (rows, most), present mask): each query's same-id images, in index order."""
        position = torch.searchsorted(self.ids, query_ids).clamp(max=len(self.ids) - 1)
        count = torch.where(self.ids[position] == query_ids, self.counts[position], 0)
        offsets = torch.arange(max(int(count.max()), 1))
        present = offsets < count[:, None]
        flat = (self.starts[position, None] + offsets).clamp(max=len(self.order) - 1)
        return self.order[flat], present

    def one_per_identity(self, priorities: torch.Tensor) -> torch.Tensor:
        """The gallery index of lowest priority in each identity: a uniform draw of one image per id."""
        group = torch.repeat_interleave(torch.arange(len(self.ids)), self.counts)
        by_priority = torch.argsort(group.double() + priorities[self.order].double())
        return self.order[by_priority[self.starts]]


def make_distances(query: FeatureSet, gallery: FeatureSet, cfg: EvaluationConfig) -> Distances:
    """The distances ``cfg`` asks for: plain ``cfg.metric`` ones, or those re-ranked; of the expanded
    queries with average query expansion."""
    if cfg.aqe_k:
        query = expand_queries(query, gallery, cfg)
    if not cfg.rerank:
        return FeatureDistances(query.features, gallery.features, cfg.metric)
    query_features, gallery_features = query.features, gallery.features
    if cfg.metric == "cosine":
        query_features, gallery_features = unit_rows(query_features), unit_rows(gallery_features)
    return RerankedDistances(query_features, gallery_features, cfg)


def evaluate(
    query: FeatureSet, gallery: FeatureSet, cfg: EvaluationConfig = EvaluationConfig(), max_rank: int = 10
) -> RetrievalMetrics:
    """Query-vs-gallery metrics in one process."""
    check_sets(query, gallery)
    return summarize(rank_queries(query, gallery, make_distances(query, gallery, cfg), cfg), max_rank)


def rank_queries(
    query: FeatureSet,
    gallery: FeatureSet,
    distances: Distances,
    cfg: EvaluationConfig = EvaluationConfig(),
    rows: slice = slice(None),
) -> QueryResults:
    """Per-query results for ``query[rows]``, a block of rows at a time within ``cfg.memory_mb``.

    Inputs are checked whole, so every process of a distributed evaluation agrees on whether they are
    valid, even one whose slice of queries is empty. Draws are seeded, so every process samples the
    same CUHK03 galleries.
    """
    check_sets(query, gallery)
    if distances.num_gallery != len(gallery):
        raise EvaluationError(f"distances cover {distances.num_gallery} gallery images, the gallery has {len(gallery)}")
    by_identity = GalleryByIdentity(gallery.person_ids)
    draws = None
    if cfg.protocol == "cuhk03":
        generator = torch.Generator().manual_seed(cfg.cuhk03_seed)
        priorities = torch.rand(cfg.repeats, len(gallery), generator=generator)
        draws = (priorities, torch.stack([by_identity.one_per_identity(p) for p in priorities]))
    block_rows = cfg.block_rows(len(gallery))
    first, last, _ = rows.indices(len(query))
    parts = [_no_queries(cfg.repeats)]
    for start in range(first, last, block_rows):
        block = slice(start, min(start + block_rows, last))
        parts.append(_rank_block(distances(block), query, block, gallery, by_identity, cfg.protocol, draws))
    return QueryResults.concat(parts)


def _no_queries(repeats: int) -> QueryResults:
    none = torch.zeros(0, dtype=torch.float64)
    return QueryResults(torch.zeros(0, repeats, dtype=torch.int64), none, none, torch.zeros(0, dtype=torch.bool))


def _rank_block(
    distance: torch.Tensor,
    query: FeatureSet,
    block: slice,
    gallery: FeatureSet,
    by_identity: GalleryByIdentity,
    protocol: Protocol,
    draws: tuple[torch.Tensor, torch.Tensor] | None,
) -> QueryResults:
    query_ids = query.person_ids[block]
    same, present = by_identity.same_identity(query_ids)
    is_match = present.clone()
    if protocol != "no_camera":
        is_match &= gallery.camera_ids[same] != query.camera_ids[block, None]
    # Same-id images are listed in gallery order, so a stable sort orders them by (distance, index).
    by_distance = torch.sort(torch.where(is_match, distance.gather(1, same), float("inf")), dim=1, stable=True)
    match_distance = by_distance.values
    match_index = torch.where(is_match, same, NO_INDEX).gather(1, by_distance.indices)
    num_matches = is_match.sum(1)
    counts, not_a_number = negatives_before_matches(
        distance, gallery.person_ids, query_ids, match_distance, match_index, num_matches
    )
    if bool(not_a_number.any()) or bool(match_distance.isnan().any()):
        first = block.start + int(torch.nonzero(not_a_number.bool() | match_distance.isnan().any(1))[0])
        raise EvaluationError(f"query {first}: distances to the gallery are NaN (degenerate or overflowing features)")
    width = match_distance.shape[1]
    position = torch.arange(1, width + 1)
    rank = position + torch.cumsum(counts, 1)[:, :width]
    counted = position <= num_matches[:, None]
    valid = num_matches > 0
    matches = num_matches.clamp_min(1)
    average_precision = torch.where(counted, position.double() / rank, 0.0).sum(1) / matches
    last_rank = rank.gather(1, (matches - 1)[:, None]).squeeze(1)
    first_rank = rank[:, :1]
    if draws is not None:
        first_rank = _single_shot_ranks(distance, query_ids, gallery.person_ids, same, is_match, *draws)
    return QueryResults(
        first_rank=torch.where(valid[:, None], first_rank, 0),
        average_precision=torch.where(valid, average_precision, 0.0),
        inverse_negative_penalty=torch.where(valid, num_matches / last_rank.double(), 0.0),
        valid=valid,
    )


def _single_shot_ranks(
    distance: torch.Tensor,
    query_ids: torch.Tensor,
    gallery_ids: torch.Tensor,
    same: torch.Tensor,
    is_match: torch.Tensor,
    priorities: torch.Tensor,
    drawn_per_repeat: torch.Tensor,
) -> torch.Tensor:
    """CUHK03: per repeat, the rank of the query's drawn true match among one drawn image per identity."""
    ranks = []
    for priority, drawn in zip(priorities, drawn_per_repeat):
        own = same.gather(1, torch.where(is_match, priority[same], float("inf")).argmin(1, keepdim=True))
        own_distance = distance.gather(1, own)
        others = distance[:, drawn]
        before = (others < own_distance) | ((others == own_distance) & (drawn < own))
        ranks.append(1 + (before & (gallery_ids[drawn] != query_ids[:, None])).sum(1))
    return torch.stack(ranks, dim=1)


def top_ranked(
    query: FeatureSet, gallery: FeatureSet, distances: Distances, queries: list[int], top: int, protocol: Protocol
) -> list[tuple[list[int], list[bool]]]:
    """For each query index: its ``top`` nearest kept gallery indices and whether each is a true match."""
    ranked = []
    for row in queries:
        order = torch.sort(distances(slice(row, row + 1))[0], stable=True).indices
        same_id = gallery.person_ids[order] == query.person_ids[row]
        kept = order
        if protocol != "no_camera":
            kept = order[~(same_id & (gallery.camera_ids[order] == query.camera_ids[row]))]
        nearest = kept[:top]
        ranked.append((nearest.tolist(), (gallery.person_ids[nearest] == query.person_ids[row]).tolist()))
    return ranked
