"""Ranking split over real gloo processes equals the single-process evaluation exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.evaluation.distributed import rank_across_ranks
from reid_platform.evaluation.metrics import FeatureSet, summarize
from reid_platform.evaluation.ranking import make_distances
from reid_platform.input.partition import Partition
from tests.gloo import run_gloo

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)


def problem(num_query):
    generator = torch.Generator().manual_seed(5)
    centres = torch.randn(12, 16, generator=generator)
    qp, gp = torch.randint(1, 12, (num_query,), generator=generator), torch.randint(0, 12, (150,), generator=generator)
    query_features = centres[qp] + torch.randn(num_query, 16, generator=generator)
    query = FeatureSet(query_features, qp, torch.randint(0, 4, (num_query,), generator=generator))
    gallery = FeatureSet(centres[gp] + torch.randn(150, 16, generator=generator), gp, torch.randint(0, 4, (150,), generator=generator))
    return query, gallery


def evaluate_on_rank(rank, world_size, num_query, protocol, rerank):
    query, gallery = problem(num_query)
    cfg = EvaluationConfig(protocol=protocol, memory_mb=0.002, cuhk03_repeats=3, **rerank)
    distances = make_distances(query, gallery, cfg)
    return rank_across_ranks(query, gallery, distances, cfg, Partition(rank, world_size, None))


@pytest.mark.parametrize(
    "world_size, num_query, protocol, rerank",
    [
        (2, 37, "market", {}),
        (3, 37, "cuhk03", {}),
        (3, 2, "market", {}),  # rank 0 gets no query at all
        (2, 37, "no_camera", {"rerank": True, "rerank_k1": 8, "rerank_k2": 3}),
    ],
)
def test_ranks_together_equal_one_process(world_size, num_query, protocol, rerank):
    single = evaluate_on_rank(0, 1, num_query, protocol, rerank)
    for results in run_gloo(world_size, evaluate_on_rank, num_query, protocol, rerank):
        for name in ("first_rank", "average_precision", "inverse_negative_penalty", "valid"):
            assert torch.equal(getattr(results, name), getattr(single, name)), name
    expected, got = summarize(single), summarize(results)
    np.testing.assert_array_equal(got.cmc, expected.cmc)
    assert (got.mAP, got.mINP) == (expected.mAP, expected.mINP)
