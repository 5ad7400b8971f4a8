"""Blocked, sparse k-reciprocal re-ranking against a dense transcription of the original algorithm."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from reid_platform.errors import EvaluationError
from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.evaluation.metrics import FeatureSet
from reid_platform.evaluation.ranking import evaluate, rank_queries
from reid_platform.evaluation.rerank import RerankedDistances

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)


def dense_re_ranking(qf, gf, k1, k2, lambda_value):
    """Zhong et al. (CVPR 2017) as in the authors' code: dense (Q+G)^2 matrices, full argsort, float64."""
    num_query = len(qf)
    feat = np.concatenate([qf, gf]).astype(np.float64)
    original = ((feat[:, None, :] - feat[None, :, :]) ** 2).sum(-1)
    original = original / original.max(axis=1, keepdims=True)
    total = len(feat)
    V = np.zeros((total, total))
    initial_rank = np.argsort(original, axis=1, kind="stable")

    def reciprocal(i, k):
        forward = initial_rank[i, : k + 1]
        backward = initial_rank[forward, : k + 1]
        return forward[np.where(backward == i)[0]]

    for i in range(total):
        k_reciprocal = reciprocal(i, k1)
        expansion = k_reciprocal
        for candidate in k_reciprocal:
            candidate_set = reciprocal(candidate, int(np.around(k1 / 2)))
            if len(np.intersect1d(candidate_set, k_reciprocal)) > 2 / 3 * len(candidate_set):
                expansion = np.append(expansion, candidate_set)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        V[i, expansion] = weight / weight.sum()
    if k2 != 1:
        V = np.stack([V[initial_rank[i, :k2]].mean(axis=0) for i in range(total)])
    jaccard = np.zeros((num_query, total))
    for i in range(num_query):
        shared = np.minimum(V[i][None, :], V).sum(axis=1)
        jaccard[i] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lambda_value) + original[:num_query] * lambda_value
    return final[:, num_query:]


def clustered_problem(seed, num_query, num_gallery, ids, dim=6):
    """Identity clusters, so neighbour sets are meaningful and re-ranking changes the ranking."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(ids, dim))
    qp, gp = rng.integers(0, ids, num_query), rng.integers(0, ids, num_gallery)
    qf = centres[qp] + 0.8 * rng.normal(size=(num_query, dim))
    gf = centres[gp] + 0.8 * rng.normal(size=(num_gallery, dim))
    return qf.astype(np.float32), gf.astype(np.float32), qp, gp, rng.integers(0, 3, num_query), rng.integers(0, 3, num_gallery)


@pytest.mark.parametrize(
    "seed, k1, k2, lam, memory_mb",
    [(0, 20, 6, 0.3, 512), (1, 6, 3, 0.3, 1e-3), (2, 5, 1, 0.5, 0.01), (3, 9, 2, 0.1, 1e-4), (4, 60, 6, 0.3, 512)],
)
def test_blocked_re_ranking_equals_dense_reference(seed, k1, k2, lam, memory_mb):
    qf, gf, qp, gp, qc, gc = clustered_problem(seed, 25, 70, 8)
    expected = dense_re_ranking(qf, gf, k1, k2, lam)
    cfg = EvaluationConfig(rerank=True, rerank_k1=k1, rerank_k2=k2, rerank_lambda=lam, memory_mb=memory_mb)
    distances = RerankedDistances(torch.from_numpy(qf), torch.from_numpy(gf), cfg)
    blocks = torch.cat([distances(slice(s, min(s + 7, 25))) for s in range(0, 25, 7)])
    np.testing.assert_allclose(blocks.numpy(), expected, atol=2e-5)
    # the same ranking, hence the same metrics, as ranking the dense re-ranked matrix
    query, gallery = FeatureSet(torch.from_numpy(qf), torch.as_tensor(qp), torch.as_tensor(qc)), FeatureSet(
        torch.from_numpy(gf), torch.as_tensor(gp), torch.as_tensor(gc)
    )

    class Dense:
        num_gallery = len(gf)

        def __call__(self, rows):
            return torch.from_numpy(expected[rows]).float()

    got = rank_queries(query, gallery, distances, cfg)
    want = rank_queries(query, gallery, Dense(), EvaluationConfig())
    assert torch.equal(got.first_rank, want.first_rank)
    torch.testing.assert_close(got.average_precision, want.average_precision, atol=1e-6, rtol=0)


def test_re_ranking_helps_on_clustered_data():
    qf, gf, qp, gp, qc, gc = clustered_problem(7, 60, 400, 20)
    query = FeatureSet(torch.from_numpy(qf), torch.as_tensor(qp), torch.as_tensor(qc))
    gallery = FeatureSet(torch.from_numpy(gf), torch.as_tensor(gp), torch.as_tensor(gc))
    plain = evaluate(query, gallery, EvaluationConfig(metric="euclidean"))
    reranked = evaluate(query, gallery, EvaluationConfig(metric="euclidean", rerank=True))
    assert reranked.mAP > plain.mAP


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rerank-k1", "0"], r"evaluation.rerank_k1: Input should be greater than or equal to 1 \(got 0\)"),
        (["--rerank-k2", "0"], r"evaluation.rerank_k2: Input should be greater than or equal to 1 \(got 0\)"),
        (["--rerank-lambda", "1.5"], r"evaluation.rerank_lambda: Input should be less than or equal to 1 \(got 1.5\)"),
    ],
)
def test_bad_options_are_named(flags, message, capsys):
    """``reid eval`` builds the evaluation section from its flags: a bad value is one line, exit 2."""
    from reid_platform.cli import main

    assert main(["eval", "--model", "m", "--data", "d", "--rerank", *flags]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_identical_features_are_refused_not_scored():
    # all distances 0: the row normaliser is 0 and every re-ranked distance NaN
    query = FeatureSet(torch.ones(1, 2), torch.tensor([1]), torch.tensor([0]))
    gallery = FeatureSet(torch.ones(3, 2), torch.tensor([2, 3, 1]), torch.tensor([1, 1, 1]))
    with pytest.raises(EvaluationError, match="query 0: distances to the gallery are NaN"):
        evaluate(query, gallery, EvaluationConfig(metric="euclidean", rerank=True, rerank_k1=2, rerank_k2=1))
