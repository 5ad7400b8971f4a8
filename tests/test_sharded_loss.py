"""The sharded Circle loss equals a dense single-process oracle, loss and every gradient."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from reid_platform.parallel.classifier import CircleSpec, ShardedCircleClassifier, shard_range
from reid_platform.parallel.losses import circle_logits, distributed_cross_entropy
from tests.gloo import run_gloo

NUM_CLASSES, DIM, PER_RANK = 11, 6, 4
SPEC = CircleSpec(gamma=64.0, margin=0.25)


def paper_circle_loss(embeddings, weight, labels, gamma, margin):
    """Sun et al. eq. (4), one sample at a time, straight from the paper's formula."""
    losses = []
    for x, y in zip(embeddings, labels):
        cos = F.normalize(weight, dim=1) @ F.normalize(x, dim=0)
        s_p = cos[y]
        s_n = torch.cat([cos[:y], cos[y + 1 :]])
        a_p = torch.clamp_min(1 + margin - s_p.detach(), 0)
        a_n = torch.clamp_min(s_n.detach() + margin, 0)
        negative = torch.logsumexp(gamma * a_n * (s_n - margin), dim=0)
        losses.append(F.softplus(negative - gamma * a_p * (s_p - (1 - margin))))
    return torch.stack(losses).mean()


def make_problem(world_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(world_size * PER_RANK, DIM, generator=g, dtype=torch.float64)
    # repeated classes, and classes 1, 5 and 9 absent from the batch
    pool = torch.tensor([0, 2, 3, 4, 6, 7, 8, 10])
    labels = pool[torch.randint(len(pool), (world_size * PER_RANK,), generator=g)]
    labels[:2] = 3
    weight = torch.randn(NUM_CLASSES, DIM, generator=g, dtype=torch.float64)
    return embeddings, labels, weight


def sharded_rank(rank, world_size):
    embeddings, labels, weight = make_problem(world_size)
    model = ShardedCircleClassifier(NUM_CLASSES, DIM, rank, world_size, SPEC).double()
    with torch.no_grad():
        model.weight.copy_(weight[model.start : model.end])
    local = embeddings[rank * PER_RANK : (rank + 1) * PER_RANK].clone().requires_grad_(True)
    loss = model(local, labels[rank * PER_RANK : (rank + 1) * PER_RANK])
    loss.backward()
    return {"loss": loss.detach(), "x_grad": local.grad, "w_grad": model.weight.grad, "rows": (model.start, model.end)}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_sharded_circle_loss_equals_dense_paper_formula(world_size):
    embeddings, labels, weight = make_problem(world_size)
    x = embeddings.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    dense = paper_circle_loss(x, w, labels, SPEC.gamma, SPEC.margin)
    dense.backward()

    results = run_gloo(world_size, sharded_rank) if world_size > 1 else [sharded_rank(0, 1)]
    rows_seen = []
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["loss"], dense.detach(), atol=1e-5, rtol=1e-5)
        local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        torch.testing.assert_close(result["x_grad"], x.grad[local], atol=1e-5, rtol=1e-5)
        start, end = result["rows"]
        torch.testing.assert_close(result["w_grad"], w.grad[start:end], atol=1e-5, rtol=1e-5)
        rows_seen.extend(range(start, end))
    assert rows_seen == list(range(NUM_CLASSES))
    assert w.grad[[1, 5, 9]].abs().sum() > 0  # absent classes still get negative gradients


def test_loss_is_exact_where_probabilities_underflow():
    # gamma 256: z_p spans about [-1008, 16]; a -log(softmax) form would saturate near 69-104.
    cosine = torch.tensor([[-0.9, 0.95, 0.9]])
    target = torch.tensor([0])
    logits = circle_logits(cosine, target, gamma=256.0, margin=0.25)
    loss = distributed_cross_entropy(logits, target)
    expected = torch.logsumexp(logits.double(), dim=1) - logits.double()[0, 0]
    assert loss.item() > 500
    torch.testing.assert_close(loss.double(), expected[0], rtol=1e-6, atol=1e-3)


def test_shard_range_partitions_rows():
    for classes in (5, 7, 100):
        for world in (1, 2, 3, 5):
            ranges = [shard_range(classes, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == classes
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    with pytest.raises(ValueError, match="cannot be split"):
        shard_range(2, 0, 3)
