"""Negative-class sampling (Partial FC) and the classifier's own row-wise SGD update."""

from __future__ import annotations

import pytest
import torch

from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.parallel.config import LossConfig
from reid_platform.parallel.losses import sharded_margin_loss
from reid_platform.parallel.row_optim import RowSGD

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)

SPEC = LossConfig(name="circle", scale=32.0, margin=0.25)


def sampling(rate: float) -> LossConfig:
    return SPEC.model_copy(update={"sample_rate": rate})


def test_sampled_rows_keep_every_positive_and_remap_targets():
    model = ShardedClassifier(1000, 8, rank=1, world_size=3, loss=sampling(0.1))  # owns rows [334, 667)
    torch.manual_seed(0)
    for _ in range(20):
        labels = torch.randint(0, 1000, (64,))
        target = model.local_target(labels)
        rows, remapped = model.sample_rows(target)
        positives = set(target[target >= 0].tolist())
        assert positives <= set(rows.tolist())
        assert len(rows) == max(int(0.1 * 333), len(positives)) and len(set(rows.tolist())) == len(rows)
        owned = target >= 0
        assert torch.equal(rows[remapped[owned]], target[owned]) and (remapped[~owned] == -1).all()


def test_a_shard_without_positives_still_samples_a_row():
    model = ShardedClassifier(40, 4, rank=1, world_size=4, loss=sampling(0.05))  # 10 rows, 0.5 wanted
    rows, remapped = model.sample_rows(model.local_target(torch.tensor([0, 1, 35])))  # none in [10, 20)
    assert len(rows) == 1 and (remapped == -1).all()


def test_sampled_loss_is_the_exact_loss_over_the_sampled_classes():
    model = ShardedClassifier(50, 8, loss=sampling(0.3)).double()
    x = torch.randn(6, 8, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, 1, 7, 20, 33, 49])
    torch.manual_seed(3)
    loss = model(x, labels)
    rows, active = model._active
    reference = sharded_margin_loss(x, model.weight.detach()[rows], torch.searchsorted(rows, labels), SPEC)
    torch.testing.assert_close(loss, reference)
    assert len(rows) == 15 and active.shape == (15, 8)


def test_only_sampled_rows_and_their_momentum_change():
    model = ShardedClassifier(200, 8, loss=sampling(0.1), optimizer=RowSGD(0.1, 0.9, 5e-4))
    before = model.weight.detach().clone()
    x = torch.randn(16, 8, requires_grad=True)
    model(x, torch.randint(0, 200, (16,))).backward()
    rows = model._active[0]
    assert model.weight.grad is None  # no dense gradient at all
    model.step()
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(model.weight.detach()[untouched], before[untouched])
    assert (model.state("momentum")[untouched] == 0).all()
    assert (model.weight.detach()[rows] != before[rows]).any(dim=1).all()
    assert (model.state("momentum")[rows] != 0).any(dim=1).all()


def test_full_rate_step_matches_torch_sgd():
    model = ShardedClassifier(30, 8, loss=SPEC, optimizer=RowSGD(0.05, 0.9, 1e-3))
    reference = torch.nn.Parameter(model.weight.detach().clone())
    optimizer = torch.optim.SGD([reference], lr=0.05, momentum=0.9, weight_decay=1e-3)
    for step in range(3):
        x = torch.randn(10, 8, generator=torch.Generator().manual_seed(step))
        labels = torch.arange(10) * 3
        model(x, labels).backward()
        model.step()
        optimizer.zero_grad()
        sharded_margin_loss(x, reference, labels, SPEC).backward()
        optimizer.step()
    torch.testing.assert_close(model.weight.detach(), reference.detach())
    torch.testing.assert_close(model.state("momentum"), optimizer.state[reference]["momentum_buffer"])


def test_step_without_backward_is_an_error():
    model = ShardedClassifier(10, 4)
    try:
        model.step()
    except RuntimeError as error:
        assert "forward and backward" in str(error)
    else:
        raise AssertionError("step() ran without gradients")
