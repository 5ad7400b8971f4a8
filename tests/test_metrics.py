"""Chunked metrics against a slow, obviously-correct per-query implementation of the protocol."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reid_platform.evaluation.metrics import EvaluationError, FeatureSet, evaluate


def reference_metrics(qf, gf, qp, gp, qc, gc, max_rank, metric):
    """Textbook protocol: loop over queries, full stable argsort, drop junk, walk the list."""
    cmc_hits, aps, inps, skipped = np.zeros(max_rank), [], [], 0
    for i in range(len(qf)):
        if metric == "cosine":
            a = qf[i] / np.linalg.norm(qf[i])
            dist = [1 - float(a @ (g / np.linalg.norm(g))) for g in gf]
        else:
            dist = [float(((qf[i] - g) ** 2).sum()) for g in gf]
        order = np.argsort(np.array(dist), kind="stable")
        ranked = [j for j in order if not (gp[j] == qp[i] and gc[j] == qc[i])]
        hits = [gp[j] == qp[i] for j in ranked]
        if not any(hits):
            skipped += 1
            continue
        positions = [k + 1 for k, hit in enumerate(hits) if hit]
        aps.append(np.mean([(n + 1) / pos for n, pos in enumerate(positions)]))
        inps.append(len(positions) / positions[-1])
        for k in range(max_rank):
            cmc_hits[k] += positions[0] <= k + 1
    valid = len(aps)
    return cmc_hits / valid, float(np.mean(aps)), float(np.mean(inps)), valid, skipped


def random_problem(seed, num_query, num_gallery, ids, cams, dim=8, ties=False):
    rng = np.random.default_rng(seed)
    gf = rng.normal(size=(num_gallery, dim))
    if ties:  # duplicated gallery rows give exact distance ties
        gf[1::3] = gf[0::3][: len(gf[1::3])]
    qf = rng.normal(size=(num_query, dim))
    gp = rng.integers(0, ids, num_gallery)  # id 0 acts as distractor: never a query id below
    qp = rng.integers(1, ids, num_query)
    return qf, gf, qp, gp, rng.integers(0, cams, num_query), rng.integers(0, cams, num_gallery)


def as_sets(qf, gf, qp, gp, qc, gc):
    t = torch.as_tensor
    return FeatureSet(t(qf), t(qp), t(qc)), FeatureSet(t(gf), t(gp), t(gc))


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_chunked_metrics_equal_reference(seed, metric):
    sizes = [(30, 50, 6, 3), (17, 5, 4, 2), (40, 120, 20, 6), (9, 12, 3, 2)][seed % 4]
    problem = random_problem(seed, *sizes, ties=seed % 3 == 0)
    cmc, mAP, mINP, valid, skipped = reference_metrics(*problem, max_rank=10, metric=metric)
    result = evaluate(*as_sets(*problem), metric=metric, max_rank=10, chunk_size=7)
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-6)
    assert result.mAP == pytest.approx(mAP, abs=1e-6)
    assert result.mINP == pytest.approx(mINP, abs=1e-6)
    assert (result.valid_queries, result.skipped_queries) == (valid, skipped)


def test_junk_and_skipped_queries_are_handled_by_hand():
    # query id 1 camera 0; gallery: [same id same cam (junk), other id, same id other cam]
    q = FeatureSet(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), torch.tensor([0]))
    g = FeatureSet(
        torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5]]), torch.tensor([1, 2, 1]), torch.tensor([0, 1, 1])
    )
    result = evaluate(q, g, max_rank=3)
    assert result.cmc.tolist() == [0.0, 1.0, 1.0]
    assert result.mAP == pytest.approx(0.5) and result.mINP == pytest.approx(0.5)
    # a second query whose only match is junk is skipped and counted
    q2 = FeatureSet(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 3]), torch.tensor([0, 0]))
    g2 = FeatureSet(torch.cat([g.features, torch.tensor([[0.0, 1.0]])]), torch.tensor([1, 2, 1, 3]), torch.tensor([0, 1, 1, 0]))
    result = evaluate(q2, g2, max_rank=3)
    assert (result.valid_queries, result.skipped_queries) == (1, 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, g: (FeatureSet(q.features[:0], q.person_ids[:0], q.camera_ids[:0]), g), "query set is empty"),
        (lambda q, g: (q, FeatureSet(g.features, g.person_ids[:-1], g.camera_ids)), "gallery: 5 feature rows but 4 person_ids"),
        (lambda q, g: (FeatureSet(q.features.index_fill(0, torch.tensor([1]), float("nan")), q.person_ids, q.camera_ids), g), "query: 1 of 4 feature rows contain NaN"),
        (lambda q, g: (FeatureSet(q.features, q.person_ids + 100, q.camera_ids), g), "none of the 4 queries has a true match"),
    ],
)
def test_bad_input_is_named(change, message):
    q, g = as_sets(*random_problem(0, 4, 5, 3, 2))
    with pytest.raises(EvaluationError, match=message):
        evaluate(*change(q, g))
