"""The sharded margin losses equal a dense single-process oracle, loss and every gradient, and the
classifier's gradient contract gives a DDP backbone the single-process gradient."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from reid_platform.parallel.classifier import ShardedClassifier, shard_range
from reid_platform.parallel.config import LossConfig
from reid_platform.parallel.criterion import Criterion
from reid_platform.parallel.losses import sharded_margin_loss
from tests.gloo import run_gloo
from tests.tolerances import FLOAT64

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)

NUM_CLASSES, DIM, PER_RANK = 11, 6, 4
SPECS = {
    "circle": LossConfig(name="circle", scale=64.0, margin=0.25),
    "cosface": LossConfig(name="cosface", scale=30.0, margin=0.35),
    "arcface": LossConfig(name="arcface", scale=30.0, margin=0.5),
    "softmax": LossConfig(name="softmax", scale=16.0, margin=0.0),
}


def dense_oracle(embeddings, weight, labels, spec):
    """Each loss from its paper's formula, one sample at a time, over the full class matrix."""
    s, m = spec.scale, spec.margin
    losses = []
    for x, y in zip(embeddings, labels):
        cos = F.normalize(weight, dim=1) @ F.normalize(x, dim=0)
        s_p, s_n = cos[y], torch.cat([cos[:y], cos[y + 1 :]])
        if spec.name == "circle":  # Sun et al. 2020, eq. (4)
            a_p = torch.clamp_min(1 + m - s_p.detach(), 0)
            a_n = torch.clamp_min(s_n.detach() + m, 0)
            negative = torch.logsumexp(s * a_n * (s_n - m), dim=0)
            losses.append(F.softplus(negative - s * a_p * (s_p - (1 - m))))
            continue
        theta = torch.acos(s_p)
        arcface = torch.cos(theta + m) if theta + m <= math.pi else s_p - m * math.sin(m)
        positive = {
            "cosface": s * (s_p - m),  # Wang et al. 2018
            "arcface": s * arcface,  # Deng et al. 2019, past theta = pi - m as in their code
            "softmax": s * s_p,
        }[spec.name]
        losses.append(torch.logsumexp(torch.cat([positive[None], s * s_n]), dim=0) - positive)
    return torch.stack(losses).mean()


def make_problem(world_size: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(world_size * PER_RANK, DIM, generator=g, dtype=torch.float64)
    pool = torch.tensor([0, 2, 3, 4, 6, 7, 8, 10])  # classes 1, 5 and 9 are absent from the batch
    labels = pool[torch.randint(len(pool), (world_size * PER_RANK,), generator=g)]
    labels[:2] = 3  # several samples of one class
    weight = torch.randn(NUM_CLASSES, DIM, generator=g, dtype=torch.float64)
    return embeddings, labels, weight


def sharded_rank(rank, world_size, spec):
    embeddings, labels, weight = make_problem(world_size)
    model = ShardedClassifier(NUM_CLASSES, DIM, rank, world_size, spec).double()
    with torch.no_grad():
        model.weight.copy_(weight[model.start : model.end])
    local = embeddings[rank * PER_RANK : (rank + 1) * PER_RANK].clone().requires_grad_(True)
    loss = Criterion(model, spec)(local, labels[rank * PER_RANK : (rank + 1) * PER_RANK]).total
    loss.backward()
    return {"loss": loss.detach(), "x_grad": local.grad, "w_grad": model.weight.grad, "rows": (model.start, model.end)}


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("name", list(SPECS))
def test_sharded_loss_equals_dense_oracle(world_size, name):
    spec = SPECS[name]
    embeddings, labels, weight = make_problem(world_size)
    x, w = embeddings.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    dense = dense_oracle(x, w, labels, spec)
    dense.backward()

    results = run_gloo(world_size, sharded_rank, spec) if world_size > 1 else [sharded_rank(0, 1, spec)]
    rows_seen = []
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["loss"], dense.detach(), **FLOAT64)
        local = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
        # the gradient contract: world size x the dense gradient, which DDP's average turns back into it
        torch.testing.assert_close(result["x_grad"], world_size * x.grad[local], **FLOAT64)
        start, end = result["rows"]
        torch.testing.assert_close(result["w_grad"], w.grad[start:end], **FLOAT64)
        rows_seen.extend(range(start, end))
    assert rows_seen == list(range(NUM_CLASSES))
    assert w.grad[[1, 5, 9]].abs().sum() > 0  # absent classes still get negative gradients


@pytest.mark.parametrize("name", list(SPECS))
def test_class_chunks_do_not_change_the_result(name):
    embeddings, labels, weight = make_problem(2, seed=5)
    results = []
    for chunk in (3, 4, NUM_CLASSES):
        x, w = embeddings.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        loss = sharded_margin_loss(x, w, labels, SPECS[name], chunk_size=chunk)
        loss.backward()
        results.append((loss.detach(), x.grad, w.grad))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b)


def test_arcface_logit_falls_monotonically_with_the_angle():
    from reid_platform.parallel.losses import margin_logits

    cosine = torch.linspace(-1, 1, 401)[:, None]
    logits = margin_logits(cosine, torch.zeros(401, dtype=torch.long), LossConfig(name="arcface", scale=1.0, margin=0.5))[:, 0]
    assert (logits[1:] >= logits[:-1]).all()  # a larger cosine (smaller angle) never lowers it


def test_loss_is_exact_where_probabilities_underflow():
    # gamma 256: z_p spans about [-1008, 16]; a -log(softmax) form would saturate near 69-104.
    weight = torch.tensor([[-0.9, math.sqrt(1 - 0.81)], [0.95, math.sqrt(1 - 0.9025)]], dtype=torch.float64)
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    gamma_256 = LossConfig(name="circle", scale=256.0, margin=0.25)
    loss = sharded_margin_loss(x, weight, torch.tensor([0]), gamma_256)
    expected = dense_oracle(x, weight, torch.tensor([0]), gamma_256)
    assert loss.item() > 500
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=1e-6)


def ddp_backbone_rank(rank, world_size, spec):
    """A DDP linear backbone under the sharded classifier, each rank its part of the global batch."""
    inputs, labels, weight = make_problem(world_size, seed=7)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(DIM, DIM).double()
    model = torch.nn.parallel.DistributedDataParallel(backbone) if world_size > 1 else backbone
    classifier = ShardedClassifier(NUM_CLASSES, DIM, rank, world_size, spec).double()
    with torch.no_grad():
        classifier.weight.copy_(weight[classifier.start : classifier.end])
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    Criterion(classifier, spec)(model(inputs[mine]), labels[mine]).total.backward()
    return {name: p.grad for name, p in backbone.named_parameters()}


@pytest.mark.parametrize("world_size", [2, 3])
def test_ddp_backbone_gradients_equal_the_single_process_dense_computation(world_size):
    spec = SPECS["circle"]
    inputs, labels, weight = make_problem(world_size, seed=7)
    torch.manual_seed(0)
    backbone = torch.nn.Linear(DIM, DIM).double()
    dense_oracle(backbone(inputs), weight, labels, spec).backward()  # the whole batch, one process
    for grads in run_gloo(world_size, ddp_backbone_rank, spec):
        for name, parameter in backbone.named_parameters():
            torch.testing.assert_close(grads[name], parameter.grad, **FLOAT64)


def test_shard_range_partitions_rows():
    for classes in (5, 7, 100):
        for world in (1, 2, 3, 5):
            ranges = [shard_range(classes, r, world) for r in range(world)]
            assert ranges[0][0] == 0 and ranges[-1][1] == classes
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1
    with pytest.raises(ValueError, match="cannot be split"):
        shard_range(2, 0, 3)
