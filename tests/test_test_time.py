"""Test-time options: average query expansion against a slow, obviously correct reference, and
flipped embeddings in evaluation, ``reid embed`` and (in test_backbones.py) ONNX."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reid_platform.cli import main
from reid_platform.data.shard_format import META_FIELDS
from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.evaluation.distributed import extract_features
from reid_platform.evaluation.expansion import expand_queries
from reid_platform.evaluation.metrics import FeatureSet
from reid_platform.evaluation.ranking import evaluate
from reid_platform.model.artifact import save_model_dir
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig, Preprocessing

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)


def sets(seed: int = 0, queries: int = 23, gallery: int = 90):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(10, 6, generator=generator)
    qp, gp = torch.randint(0, 10, (queries,), generator=generator), torch.randint(0, 10, (gallery,), generator=generator)
    q = FeatureSet(centres[qp] + 0.7 * torch.randn(queries, 6, generator=generator), qp, torch.zeros(queries, dtype=torch.long))
    g = FeatureSet(centres[gp] + 0.7 * torch.randn(gallery, 6, generator=generator), gp, torch.ones(gallery, dtype=torch.long))
    return q, g


def slow_expansion(query: FeatureSet, gallery: FeatureSet, k: int, metric: str) -> torch.Tensor:
    """One query at a time: sort the whole gallery, average the query with the k first."""
    expanded = []
    for q in query.features.double():
        qv, gv = (F.normalize(q, dim=0), F.normalize(gallery.features.double(), dim=1)) if metric == "cosine" else (q, gallery.features.double())
        distance = 1 - gv @ qv if metric == "cosine" else ((gv - qv) ** 2).sum(1)
        mean = (qv + gv[torch.argsort(distance)[:k]].sum(0)) / (k + 1)
        expanded.append(F.normalize(mean, dim=0) if metric == "cosine" else mean)
    return torch.stack(expanded).float()


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
@pytest.mark.parametrize("k, memory_mb", [(1, 512), (5, 1e-4), (200, 512)])
def test_average_query_expansion_equals_the_slow_reference(metric, k, memory_mb):
    query, gallery = sets(k)
    cfg = EvaluationConfig(metric=metric, aqe_k=k, memory_mb=memory_mb)  # a tiny budget: blocks of one query
    expanded = expand_queries(query, gallery, cfg)
    torch.testing.assert_close(expanded.features, slow_expansion(query, gallery, min(k, len(gallery)), metric), atol=1e-5, rtol=1e-5)
    assert torch.equal(expanded.person_ids, query.person_ids)
    # and evaluation ranks the expanded queries
    expected = evaluate(expanded, gallery, EvaluationConfig(metric=metric, protocol="no_camera"))
    got = evaluate(query, gallery, EvaluationConfig(metric=metric, protocol="no_camera", aqe_k=k))
    assert got.mAP == pytest.approx(expected.mAP, abs=1e-6) and got.mAP != evaluate(query, gallery, EvaluationConfig(metric=metric, protocol="no_camera")).mAP


def test_flipped_features_average_each_image_with_its_mirror():
    model = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=8), Preprocessing(height=64, width=32)).eval()
    images = torch.randn(5, 3, 64, 32)
    meta = torch.zeros(5, len(META_FIELDS), dtype=torch.long)
    features, _ = extract_features(model, [(images, meta)], torch.device("cpu"), flip=True)
    with torch.no_grad():
        expected = F.normalize(model(images) + model(torch.flip(images, dims=[3])), dim=1)
    torch.testing.assert_close(features, expected)
    plain, _ = extract_features(model, [(images, meta)], torch.device("cpu"))
    assert not torch.allclose(plain, features)


def test_reid_embed_flip(tmp_path, tiny_market):
    """`reid embed --flip` against its definition, computed without the flip code path: the mean of
    each image's embedding (the network's output, before the L2 normalisation ``embed`` applies) and
    its horizontal mirror's, then L2-normalised."""
    model = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=8), Preprocessing(height=64, width=32)).eval()
    directory = save_model_dir(model, Preprocessing(height=64, width=32), tmp_path / "model")
    images = sorted((tiny_market / "query").glob("*.jpg"))[:3]
    assert main(["embed", "--model", str(directory), *map(str, images), "--flip", "--out", str(tmp_path / "e.npz")]) == 0
    with np.load(tmp_path / "e.npz") as saved:
        embeddings = saved["embeddings"]
    pre = Preprocessing(height=64, width=32)
    batch = torch.from_numpy(np.stack([
        (np.asarray(Image.open(p).convert("RGB").resize((32, 64), Image.Resampling.BILINEAR), np.float32) / 255 - pre.mean) / pre.std
        for p in images
    ]).transpose(0, 3, 1, 2).astype(np.float32))  # fmt: skip
    mirrored = torch.flip(batch, dims=[3])  # (N, C, H, W): dimension 3 runs left to right
    with torch.no_grad():
        mean = (model(batch) + model(mirrored)) / 2
    np.testing.assert_allclose(embeddings, F.normalize(mean, dim=1).numpy(), atol=1e-5)
    with torch.no_grad():  # the mirror changes the embeddings: a --flip that did nothing would fail above
        assert not np.allclose(embeddings, F.normalize(model(batch), dim=1).numpy(), atol=1e-3)
