"""The sort-free ranking engine against slow, obviously-correct per-query implementations."""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pytest
import torch

from reid_platform.errors import EvaluationError
from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.evaluation.distance import FeatureDistances
from reid_platform.evaluation.metrics import FeatureSet
from reid_platform.evaluation.ranking import evaluate, top_ranked

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)


def distances_of(qf, gf, metric):
    if metric == "cosine":
        a = qf / np.linalg.norm(qf, axis=1, keepdims=True)
        b = gf / np.linalg.norm(gf, axis=1, keepdims=True)
        return 1 - a @ b.T
    return ((qf[:, None, :] - gf[None, :, :]) ** 2).sum(-1)


def reference_metrics(qf, gf, qp, gp, qc, gc, max_rank, metric, protocol="market", priorities=None):
    """Textbook protocol: per query, full stable argsort, drop junk, walk the list.

    CUHK03: per repeat, keep one gallery image per identity (lowest priority; the query's own
    identity among its kept images), rank that list, average CMC over repeats.
    """
    dist = distances_of(qf, gf, metric)
    cmc_hits, aps, inps, skipped = np.zeros(max_rank), [], [], 0
    for i in range(len(qf)):
        order = np.argsort(dist[i], kind="stable")
        junk = lambda j: protocol != "no_camera" and gp[j] == qp[i] and gc[j] == qc[i]  # noqa: E731
        ranked = [j for j in order if not junk(j)]
        hits = [gp[j] == qp[i] for j in ranked]
        if not any(hits):
            skipped += 1
            continue
        positions = [k + 1 for k, hit in enumerate(hits) if hit]
        aps.append(np.mean([(n + 1) / pos for n, pos in enumerate(positions)]))
        inps.append(len(positions) / positions[-1])
        if protocol != "cuhk03":
            cmc_hits += np.arange(1, max_rank + 1) >= positions[0]
            continue
        for priority in priorities:
            by_id = defaultdict(list)
            for j in ranked:
                by_id[gp[j]].append(j)
            chosen = {min(js, key=lambda j: priority[j]) for js in by_id.values()}
            single_shot = [gp[j] == qp[i] for j in ranked if j in chosen]
            cmc_hits += (np.arange(1, max_rank + 1) >= single_shot.index(True) + 1) / len(priorities)
    valid = len(aps)
    return cmc_hits / valid, float(np.mean(aps)), float(np.mean(inps)), valid, skipped


def random_problem(seed, num_query, num_gallery, ids, cams, dim=8, ties=False):
    rng = np.random.default_rng(seed)
    gf = rng.normal(size=(num_gallery, dim)).astype(np.float32)
    if ties:  # duplicated gallery rows give exact distance ties, some between a match and a negative
        gf[1::3] = gf[0::3][: len(gf[1::3])]
    qf = rng.normal(size=(num_query, dim)).astype(np.float32)
    gp = rng.integers(0, ids, num_gallery)  # id 0 acts as distractor: never a query id below
    qp = rng.integers(1, ids, num_query)
    return qf, gf, qp, gp, rng.integers(0, cams, num_query), rng.integers(0, cams, num_gallery)


def as_sets(qf, gf, qp, gp, qc, gc):
    t = torch.as_tensor
    return FeatureSet(t(qf), t(qp), t(qc)), FeatureSet(t(gf), t(gp), t(gc))


SIZES = [(30, 50, 6, 3), (17, 5, 4, 2), (40, 120, 20, 6), (9, 12, 3, 2), (25, 300, 60, 15)]


def assert_same(result, expected):
    cmc, mAP, mINP, valid, skipped = expected
    np.testing.assert_allclose(result.cmc, cmc, atol=1e-6)
    assert result.mAP == pytest.approx(mAP, abs=1e-6)
    assert result.mINP == pytest.approx(mINP, abs=1e-6)
    assert (result.valid_queries, result.skipped_queries) == (valid, skipped)


@pytest.mark.parametrize("seed", range(15))
@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("protocol", ["market", "no_camera"])
def test_blocked_metrics_equal_reference(seed, metric, protocol):
    problem = random_problem(seed, *SIZES[seed % len(SIZES)], ties=seed % 3 == 0)
    expected = reference_metrics(*problem, max_rank=10, metric=metric, protocol=protocol)
    # a tiny budget forces blocks of one or a few query rows
    cfg = EvaluationConfig(metric=metric, protocol=protocol, memory_mb=[1e-3, 0.01, 512][seed // 3 % 3])
    assert_same(evaluate(*as_sets(*problem), cfg, max_rank=10), expected)


@pytest.mark.parametrize("seed", range(6))
def test_cuhk03_protocol_equals_reference(seed):
    problem = random_problem(seed, *SIZES[seed % len(SIZES)], ties=seed % 2 == 0)
    cfg = EvaluationConfig(protocol="cuhk03", cuhk03_repeats=4, cuhk03_seed=seed, memory_mb=0.005)
    priorities = torch.rand(4, len(problem[1]), generator=torch.Generator().manual_seed(seed)).numpy()
    expected = reference_metrics(*problem, max_rank=10, metric="cosine", protocol="cuhk03", priorities=priorities)
    assert_same(evaluate(*as_sets(*problem), cfg, max_rank=10), expected)


def test_cuhk03_draws_are_seeded_and_average_over_repeats():
    query, gallery = as_sets(*random_problem(3, 40, 200, 6, 2))  # identities 0..5
    runs = [evaluate(query, gallery, EvaluationConfig(protocol="cuhk03", cuhk03_seed=s)).cmc for s in (0, 0, 1)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    # one image per identity leaves six candidates, so the true match is always within rank 6
    assert runs[0][5] == 1.0 and evaluate(query, gallery).cmc[5] < 1.0


def test_ties_between_matches_and_negatives_go_to_the_lower_gallery_index():
    # every gallery image is at the same distance: the ranking is the gallery order minus junk
    q = FeatureSet(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), torch.tensor([0]))
    ids = torch.tensor([2, 1, 1, 3, 1, 2, 1])  # index 1 is junk (same camera)
    g = FeatureSet(torch.ones(7, 2), ids, torch.tensor([1, 0, 2, 1, 1, 1, 2]))
    result = evaluate(q, g, max_rank=6)
    # kept order: 0(neg) 2(match) 3(neg) 4(match) 5(neg) 6(match) -> match ranks 2, 4, 6
    assert result.cmc.tolist() == [0, 1, 1, 1, 1, 1]
    assert result.mAP == pytest.approx((1 / 2 + 2 / 4 + 3 / 6) / 3) and result.mINP == pytest.approx(3 / 6)
    [(indices, matches)] = top_ranked(q, g, FeatureDistances(q.features, g.features), [0], 4, "market")
    assert indices == [0, 2, 3, 4] and matches == [False, True, False, True]


def test_junk_and_skipped_queries_are_handled_by_hand():
    # query id 1 camera 0; gallery: [same id same cam (junk), other id, same id other cam]
    q = FeatureSet(torch.tensor([[1.0, 0.0]]), torch.tensor([1]), torch.tensor([0]))
    g = FeatureSet(
        torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.5, 0.5]]), torch.tensor([1, 2, 1]), torch.tensor([0, 1, 1])
    )
    result = evaluate(q, g, max_rank=3)
    assert result.cmc.tolist() == [0.0, 1.0, 1.0]
    assert result.mAP == pytest.approx(0.5) and result.mINP == pytest.approx(0.5)
    no_camera = evaluate(q, g, EvaluationConfig(protocol="no_camera"), max_rank=3)
    assert no_camera.cmc.tolist() == [1.0, 1.0, 1.0]  # the same-camera image now counts, first
    assert no_camera.mAP == pytest.approx((1 / 1 + 2 / 3) / 2) and no_camera.mINP == pytest.approx(2 / 3)
    # a second query whose only match is junk is skipped and counted
    q2 = FeatureSet(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([1, 3]), torch.tensor([0, 0]))
    g2 = FeatureSet(torch.cat([g.features, torch.tensor([[0.0, 1.0]])]), torch.tensor([1, 2, 1, 3]), torch.tensor([0, 1, 1, 0]))
    result = evaluate(q2, g2, max_rank=3)
    assert (result.valid_queries, result.skipped_queries) == (1, 1)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda q, g: (FeatureSet(q.features[:0], q.person_ids[:0], q.camera_ids[:0]), g), "query set is empty"),
        (lambda q, g: (q, FeatureSet(g.features[:0], g.person_ids[:0], g.camera_ids[:0])), "gallery set is empty"),
        (lambda q, g: (q, FeatureSet(g.features, g.person_ids[:-1], g.camera_ids)), "gallery: 5 feature rows but 4 person_ids"),
        (lambda q, g: (FeatureSet(q.features, q.person_ids, q.camera_ids[:2]), g), "query: 4 feature rows but 2 camera_ids"),
        (lambda q, g: (FeatureSet(q.features.index_fill(0, torch.tensor([1]), float("nan")), q.person_ids, q.camera_ids), g), "query: 1 of 4 feature rows contain NaN"),
        (lambda q, g: (q, FeatureSet(g.features.index_fill(0, torch.tensor([0, 3]), float("inf")), g.person_ids, g.camera_ids)), "gallery: 2 of 5 feature rows contain NaN or infinite values .first: row 0"),
        (lambda q, g: (FeatureSet(q.features, q.person_ids + 100, q.camera_ids), g), "none of the 4 queries has a true match"),
        (lambda q, g: (FeatureSet(q.features[:, :3], q.person_ids, q.camera_ids), g), "query features have 3 dimensions, gallery features 8"),
        (lambda q, g: (FeatureSet(q.features * 1e30, q.person_ids, q.camera_ids), FeatureSet(g.features * 1e30, g.person_ids, g.camera_ids)), "query: 4 feature rows are too large for float32 euclidean distances .first: row 0"),
    ],
)
def test_bad_input_is_named(change, message):
    q, g = as_sets(*random_problem(0, 4, 5, 3, 2))
    with pytest.raises(EvaluationError, match=message):
        evaluate(*change(q, g), EvaluationConfig(metric="euclidean"))


def test_euclidean_far_from_the_origin_keeps_float64_order():
    # float32 |a|^2 + |b|^2 - 2ab would cancel to noise here; centring keeps the exact order
    qf, gf, qp, gp, qc, gc = random_problem(4, 20, 60, 6, 3)
    problem = (qf * 0.01 + 300, gf * 0.01 + 300, qp, gp, qc, gc)
    expected = reference_metrics(*problem, max_rank=10, metric="euclidean")
    assert_same(evaluate(*as_sets(*problem), EvaluationConfig(metric="euclidean")), expected)
