"""Average query expansion (AQE; Chum et al. 2007, fast-reid's TEST.AQE): each query is replaced by
the mean of itself and its k nearest gallery images before ranking.

Labels play no part (the expansion happens at test time); distances are taken a block of queries at
a time within the evaluation's memory budget, so nothing of size query x gallery is kept. Under the
cosine metric the features are unit vectors, and so is the expanded query again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.evaluation.distance import FeatureDistances
from reid_platform.evaluation.metrics import FeatureSet


def expand_queries(query: FeatureSet, gallery: FeatureSet, cfg: EvaluationConfig) -> FeatureSet:
    k = min(cfg.aqe_k, len(gallery))
    distances = FeatureDistances(query.features, gallery.features, cfg.metric)
    # under cosine the unit rows the distances compare; averaging commutes with euclidean's centring
    if cfg.metric == "cosine":
        queries, galleries = distances.query, distances.gallery
    else:
        queries, galleries = query.features.float(), gallery.features.float()
    expanded = torch.empty_like(queries)
    step = cfg.block_rows(len(gallery))
    for start in range(0, len(query), step):
        rows = slice(start, start + step)
        nearest = distances(rows).topk(k, dim=1, largest=False).indices
        expanded[rows] = (queries[rows] + galleries[nearest].sum(dim=1)) / (k + 1)
    if cfg.metric == "cosine":
        expanded = F.normalize(expanded, dim=1)
    return FeatureSet(expanded, query.person_ids, query.camera_ids)
