"""Search with the evaluation's test-time tricks, applied to each query's top candidates only.

Average query expansion (``evaluation.expansion.expand_queries``) replaces a query by the mean of
itself and its ``aqe_k`` nearest gallery entries (found among its candidates, which hold them, the
candidates being its nearest entries) and searches the index again with it. k-reciprocal
re-ranking (``evaluation.ranking.make_distances`` with ``rerank``) reorders the candidates by
``(1 - lambda) * Jaccard + lambda * original`` distance, neighbourhoods taken among the query and its
candidates: the evaluator's algorithm on a gallery of ``candidates`` entries instead of millions.
Filters hold throughout: the candidates are the filtered search's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.evaluation.expansion import expand_queries
from reid_platform.evaluation.metrics import FeatureSet
from reid_platform.evaluation.ranking import make_distances
from reid_platform.search.index import GalleryIndex, Hit

CANDIDATES = 100


def _feature_set(features: np.ndarray) -> FeatureSet:
    """Features without labels: expansion and re-ranking use none."""
    none = torch.zeros(len(features), dtype=torch.int64)
    return FeatureSet(torch.from_numpy(np.ascontiguousarray(features, np.float32)), none, none)


def search_ranked(
    index: GalleryIndex,
    queries: np.ndarray,
    top_k: int,
    cfg: EvaluationConfig,
    query_cameras: Sequence[int] | None = None,
    after: float | None = None,
    before: float | None = None,
    candidates: int = CANDIDATES,
) -> list[list[Hit]]:
    """``index.search`` with ``cfg.aqe_k`` query expansion and ``cfg.rerank`` re-ranking of each
    query's ``candidates`` best entries (at least ``top_k``). Re-ranked hits score 1 - their re-ranked
    distance."""
    queries = index.check_queries(queries)
    pool = min(index.size, max(candidates, top_k))
    filters = dict(query_cameras=query_cameras, after=after, before=before)
    scores, rows = index.search_rows(queries, pool, **filters)
    if cfg.aqe_k:
        expanded = np.empty_like(queries)
        for number, (query, found) in enumerate(zip(queries, rows)):
            found = found[found >= 0]
            expanded[number] = query  # no entry passes the filters: nothing to expand with
            if len(found):
                expansion = expand_queries(_feature_set(query[None]), _feature_set(index.vectors(found)), cfg)
                expanded[number] = expansion.features[0].numpy()
        queries = expanded
        scores, rows = index.search_rows(queries, pool, **filters)
    if not cfg.rerank:
        return [index.hits(s[:top_k], r[:top_k]) for s, r in zip(scores, rows)]
    plain = cfg.model_copy(update={"aqe_k": 0})
    ranked = []
    for query, found in zip(queries, rows):
        found = found[found >= 0]
        if not len(found):
            ranked.append([])
            continue
        distances = make_distances(_feature_set(query[None]), _feature_set(index.vectors(found)), plain)(slice(0, 1))[0]
        best = torch.sort(distances, stable=True).indices[:top_k].numpy()
        ranked.append(index.hits(1 - distances.numpy()[best], found[best]))
    return ranked
