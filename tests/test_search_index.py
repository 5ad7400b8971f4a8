"""The gallery index (search/index.py), its re-ranking glue (search/ranked.py) and `reid search`.

Oracles: the evaluator's ranking (``evaluation.ranking.top_ranked`` over its distances, a stable
sort) for the exact index and the re-ranked search; a brute-force numpy ranking for the filters;
exact search for the approximate index's recall. FAISS and torch compute inner products with
different kernels, so scores agree to ~1e-6, not bit for bit: rankings are compared up to swaps
inside groups of scores that tie within ``TIE``.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest
import torch

from reid_platform.errors import ConfigError, DatasetError
from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.evaluation.distance import FeatureDistances
from reid_platform.evaluation.metrics import FeatureSet
from reid_platform.evaluation.ranking import make_distances, top_ranked
from reid_platform.search.index import GalleryIndex, ModelStamp, write_index
from reid_platform.search.ranked import search_ranked

TIE = 1e-5
CAMERAS = 4


def clustered(count: int, dim: int, identities: int, seed: int, spread: float = 0.8) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1000).standard_normal((identities, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    features = centres[rng.integers(0, identities, count)] + rng.standard_normal((count, dim)).astype(np.float32) * (
        spread / np.sqrt(dim)
    )
    return (features / np.linalg.norm(features, axis=1, keepdims=True)).astype(np.float32)


def metadata_for(count: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    return pa.table({
        "path": [f"crops/{row}.jpg" for row in range(count)], "camera": rng.integers(0, CAMERAS, count),
        "timestamp": rng.uniform(0, 1000, count), "source": ["synthetic"] * count,
    })  # fmt: skip


def stamp(dim: int) -> ModelStamp:
    return ModelStamp("synthetic", None, None, None, dim, False)


def feature_set(features: np.ndarray) -> FeatureSet:
    labels = torch.zeros(len(features), dtype=torch.int64)
    return FeatureSet(torch.from_numpy(features), labels, labels)


def assert_same_ranking(found: np.ndarray, expected: np.ndarray, score_of) -> None:
    """``found`` ranks the rows ``expected`` ranks, up to reorderings among scores within TIE (and at
    the cut, a row that ties with the expected last one)."""
    found_scores, expected_scores = score_of(found), score_of(expected)
    np.testing.assert_allclose(found_scores, expected_scores, atol=TIE)
    clear = np.abs(expected_scores - expected_scores[-1]) > TIE  # rows not tied with the cut
    assert set(expected[clear]) <= set(found)
    for position in np.flatnonzero(clear):
        neighbours = np.abs(expected_scores - expected_scores[position]) <= TIE
        assert found[position] == expected[position] or found[position] in set(expected[neighbours])


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return clustered(3000, 32, identities=150, seed=1)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(40, 32, identities=150, seed=2)


@pytest.fixture(scope="module")
def flat(gallery, tmp_path_factory) -> GalleryIndex:
    return write_index(tmp_path_factory.mktemp("flat") / "index", gallery, metadata_for(len(gallery)), stamp(32))


def test_the_exact_index_ranks_every_query_as_the_evaluator(flat, gallery, queries):
    index = GalleryIndex.open(flat.directory)  # as read back from its files
    assert index.kind == "flat" and index.size == len(gallery) and index.info()["recall"]["exact"]
    top = 25
    _, rows = index.search_rows(queries, top)
    distances = FeatureDistances(torch.from_numpy(queries), torch.from_numpy(gallery))
    ranked = top_ranked(feature_set(queries), feature_set(gallery), distances, list(range(len(queries))), top, "no_camera")
    for number, (expected, _) in enumerate(ranked):
        row_distances = distances(slice(number, number + 1))[0].numpy()
        assert_same_ranking(rows[number], np.array(expected), lambda r: -row_distances[r])
    hits = index.search(queries[:1], 3)[0]
    assert [hit.path for hit in hits] == [f"crops/{row}.jpg" for row in rows[0, :3]]
    assert hits[0].score == pytest.approx(1 - distances(slice(0, 1))[0, rows[0, 0]].item(), abs=TIE)


def test_a_sharded_exact_index_answers_as_one(flat, gallery, queries, tmp_path):
    sharded = write_index(tmp_path / "sharded", gallery, metadata_for(len(gallery)), stamp(32), kind="flat", shards=3)
    assert len(GalleryIndex.open(tmp_path / "sharded").shards) == 3
    single_scores, single_rows = flat.search_rows(queries, 30, after=100.0)
    scores, rows = sharded.search_rows(queries, 30, after=100.0)
    np.testing.assert_allclose(scores, single_scores, atol=TIE)
    for found, expected, expected_scores in zip(rows, single_rows, single_scores):
        lookup = dict(zip(expected, expected_scores))
        assert_same_ranking(found, expected, lambda r: np.array([lookup.get(x, np.nan) for x in r]))


def brute_force(gallery, metadata, query, top_k, camera, after, before):
    """Filter the whole gallery, then a stable sort of the scores: the obviously right answer."""
    cameras, times = metadata.column("camera").to_numpy(), metadata.column("timestamp").to_numpy()
    keep = np.ones(len(gallery), bool)
    if camera is not None:
        keep &= cameras != camera
    if after is not None:
        keep &= times >= after
    if before is not None:
        keep &= times <= before
    rows = np.flatnonzero(keep)
    scores = gallery[rows] @ query
    order = np.argsort(-scores, kind="stable")[:top_k]
    return rows[order], scores


@pytest.mark.parametrize("after, before", [(None, None), (200.0, 700.0), (995.0, None)])
def test_filters_equal_a_brute_force_ranking(flat, gallery, queries, after, before):
    metadata = flat.metadata
    cameras = [int(c) for c in np.arange(len(queries)) % (CAMERAS + 1) - 1]  # -1: no camera to exclude
    top_k = 20
    results = flat.search(queries, top_k, query_cameras=cameras, after=after, before=before)
    full_scores = gallery @ queries.T
    for number, hits in enumerate(results):
        camera = cameras[number] if cameras[number] >= 0 else None
        expected, _ = brute_force(gallery, metadata, queries[number], top_k, camera, after, before)
        assert len(hits) == len(expected)  # top_k, or every entry that passes when fewer do
        found = np.array([hit.row for hit in hits])
        assert_same_ranking(found, expected, lambda r: full_scores[r, number])
        for hit in hits:
            assert hit.camera != camera and (after is None or hit.timestamp >= after) and (before is None or hit.timestamp <= before)


@pytest.fixture(scope="module")
def approximate(tmp_path_factory):
    """An IVF-PQ index over identity clusters, big enough to train its quantizers."""
    vectors = clustered(12_000, 64, identities=600, seed=3)
    index = write_index(tmp_path_factory.mktemp("ivfpq") / "index", vectors, metadata_for(len(vectors)), stamp(64), kind="ivfpq", shards=2)
    return index, vectors


def test_the_approximate_index_reaches_its_recall_target_against_exact(approximate):
    index, vectors = approximate
    info = GalleryIndex.open(index.directory).info()
    assert info["kind"] == "ivfpq" and info["factory"].startswith("IVF")
    assert info["recall"]["estimate"] >= info["recall"]["target"] == 0.95
    assert info["bytes_per_vector"] < vectors.shape[1] * 4  # codes, not the vectors, are in memory
    queries = clustered(300, 64, identities=600, seed=4)  # fresh draws, not gallery rows
    _, found = index.search_rows(queries, 10)
    exact = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")[:, :10]
    recall = np.mean([len(set(f) & set(e)) / 10 for f, e in zip(found, exact)])
    assert recall >= 0.95


def test_the_approximate_index_returns_top_k_when_a_filter_leaves_few_entries(approximate):
    index, vectors = approximate
    times = index.metadata.column("timestamp").to_numpy()
    after = float(np.sort(times)[-15])  # 15 entries pass, spread over every inverted list
    queries = clustered(5, 64, identities=600, seed=5)
    for query, hits in zip(queries, index.search(queries, 10, after=after)):
        expected, _ = brute_force(vectors, index.metadata, query, 10, None, after, None)
        assert sorted(hit.row for hit in hits) == sorted(expected)


@pytest.mark.parametrize("rerank, aqe_k", [(True, 0), (False, 3), (True, 2)])
def test_reranking_and_query_expansion_over_every_candidate_equal_the_evaluator(flat, gallery, queries, rerank, aqe_k):
    cfg = EvaluationConfig(rerank=rerank, aqe_k=aqe_k, rerank_k1=8, rerank_k2=3)
    results = search_ranked(flat, queries[:4], 10, cfg, candidates=len(gallery))
    for number, hits in enumerate(results):
        query = feature_set(queries[number : number + 1])
        distances = make_distances(query, feature_set(gallery), cfg)
        (expected, _), = top_ranked(query, feature_set(gallery), distances, [0], 10, "no_camera")
        row_distances = distances(slice(0, 1))[0].numpy()
        assert_same_ranking(np.array([hit.row for hit in hits]), np.array(expected), lambda r: -row_distances[r])


def test_bad_input_is_one_line_naming_it(flat, gallery, tmp_path):
    with pytest.raises(DatasetError, match=f"{tmp_path}: not a gallery index"):
        GalleryIndex.open(tmp_path)
    with pytest.raises(DatasetError, match="the gallery is empty"):
        write_index(tmp_path / "empty", np.zeros((0, 32), np.float32), metadata_for(0), stamp(32))
    with pytest.raises(ConfigError, match="top-k 3001 is not between 1 and the size of .*3000 entries"):
        flat.search(gallery[:1], 3001)
    with pytest.raises(ConfigError, match=r"queries of shape \(1, 16\) .* holds 32-d embeddings"):
        flat.search(gallery[:1, :16], 5)
    with pytest.raises(ConfigError, match="embeddings have 32 dimensions, synthetic makes 16"):
        write_index(tmp_path / "dim", gallery, metadata_for(len(gallery)), stamp(16))
    with pytest.raises(DatasetError, match=r"embedding 7 \(crops/7.jpg\) has norm 2"):
        doubled = gallery.copy()
        doubled[7] *= 2
        write_index(tmp_path / "norm", doubled, metadata_for(len(gallery)), stamp(32))
    with pytest.raises(DatasetError, match="3000 embeddings but 10 metadata rows"):
        write_index(tmp_path / "rows", gallery, metadata_for(10), stamp(32))
    built = ModelStamp("reid@champion", "reid", "3", "run", 32, False, "a" * 64)
    with pytest.raises(ConfigError, match="built with reid version 3, not reid version 4"):
        built.check_matches(ModelStamp("reid/4", "reid", "4", "run2", 32, False, "b" * 64), "INDEX")
    with pytest.raises(ConfigError, match="holds 32-d embeddings of reid version 3; .* makes 16-d ones"):
        built.check_matches(ModelStamp("other", None, None, None, 16, False), "INDEX")
    built.check_matches(ModelStamp("reid/3", "reid", "3", "run", 32, False, "a" * 64), "INDEX")  # the same model


def reid(*arguments: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-c", "import sys; from reid_platform.cli import main; sys.exit(main())", *map(str, arguments)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300)


def test_reid_search_finds_a_gallery_crop_and_refuses_bad_input(tiny_market, tmp_path):
    from reid_platform.model.artifact import save_model_dir
    from reid_platform.model.backbone import ReIDNet
    from reid_platform.model.config import ModelConfig, Preprocessing
    from reid_platform.model.inference import embed_images
    from reid_platform.search.model import load_files, resolve_model

    torch.manual_seed(0)
    model = ReIDNet(ModelConfig(arch="resnet18", pretrained="none", embedding_dim=16), Preprocessing(height=64, width=32))
    model_dir = save_model_dir(model.eval(), Preprocessing(height=64, width=32), tmp_path / "model")
    crops = sorted((tiny_market / "bounding_box_test").glob("*.jpg"))[:12]
    built_with = resolve_model(str(model_dir), None, flip=True)
    model, preprocessing = load_files(built_with.files)
    built_with = built_with.stamp
    embeddings = embed_images(model, preprocessing, crops, flip=True)
    metadata = pa.table({
        "path": [str(c) for c in crops], "camera": [int(c.name.split("_")[1][1]) for c in crops],
        "timestamp": np.arange(len(crops), dtype=float), "source": ["tiny"] * len(crops),
    })  # fmt: skip
    write_index(tmp_path / "index", embeddings, metadata, built_with)
    done = reid("search", tmp_path / "index", crops[5], "--top-k", 3, "--json")
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(done.stdout)
    assert result["hits"][0]["path"] == str(crops[5]) and result["hits"][0]["score"] == pytest.approx(1, abs=1e-5)
    assert len(result["hits"]) == 3
    camera = metadata.column("camera")[5].as_py()
    done = reid("search", tmp_path / "index", crops[5], "--top-k", 3, "--exclude-camera", camera, "--rerank", "--query-expansion", 2)
    assert done.returncode == 0, done.stderr
    header, columns, *ranked, _ = done.stdout.splitlines()
    assert columns.split() == ["RANK", "SCORE", "CAMERA", "TIME", "(UTC)", "PATH"] and len(ranked) == 3
    assert all(line.split()[2] != str(camera) and not line.endswith(str(crops[5])) for line in ranked)

    other = save_model_dir(ReIDNet(ModelConfig(arch="resnet18", pretrained="none", embedding_dim=16), Preprocessing(height=64, width=32)), Preprocessing(height=64, width=32), tmp_path / "other")
    not_an_image = tmp_path / "notes.jpg"
    not_an_image.write_text("not a picture")
    for arguments, status, message in [
        (["--model", other, "--top-k", 5], 2, "was built with"),
        (["--top-k", 5], 1, f"{not_an_image}: "),
        (["--top-k", 13], 2, "top-k 13 is not between 1 and the size"),
    ]:
        query = not_an_image if status == 1 else crops[0]
        done = reid("search", tmp_path / "index", query, *arguments)
        assert done.returncode == status and message in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr
