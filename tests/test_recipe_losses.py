"""The recipe's losses and normalisation across ranks, each against an independent oracle:

- pair-wise Circle and batch-hard triplet over the global batch: pytorch-metric-learning's CircleLoss
  and TripletMarginLoss with a BatchHardMiner on the same batch; on 1, 2 and 3 gloo ranks the DDP
  backbone's gradients equal that dense single-process loss's;
- label smoothing on the sharded classifier: torch's cross_entropy(label_smoothing=) on the dense
  logits written from the paper;
- SyncBatchNorm on 2 and 3 ranks: torch's BatchNorm2d on the whole batch in one process; on a timm
  backbone with norm-act layers, the unconverted network;
- the classifier's row-wise Adam and AdamW: torch.optim.Adam / AdamW, over several steps.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import distances, losses, miners, reducers
from timm.layers.norm_act import BatchNormAct2d

from reid_platform.errors import ConfigError
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig, Preprocessing
from reid_platform.parallel import row_optim
from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.parallel.config import LossConfig, PairwiseConfig
from reid_platform.parallel.criterion import Criterion
from reid_platform.parallel.losses import sharded_margin_loss
from reid_platform.parallel.pairwise import pairwise_share
from reid_platform.parallel.row_optim import RowAdam
from reid_platform.parallel.sync_batchnorm import SyncBatchNorm, convert_sync_batchnorm
from tests.gloo import run_gloo
from tests.tolerances import FLOAT64

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)

DIM, CLASSES = 8, 7
# 12 samples: five identities of 2-3 images and one alone (an anchor without positives)
LABELS = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3, 3, 4, 6])
PAIRWISE = {
    "circle": PairwiseConfig(name="circle"),
    "circle_re-id": PairwiseConfig(name="circle", scale=128.0, margin=0.25),
    "triplet": PairwiseConfig(name="triplet", margin=0.3),
    "soft_triplet": PairwiseConfig(name="triplet", margin=0.0, soft=True),
}


def inputs(seed: int = 0) -> torch.Tensor:
    return torch.randn(len(LABELS), DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def metric_learning_oracle(embeddings: torch.Tensor, labels: torch.Tensor, cfg: PairwiseConfig) -> torch.Tensor:
    if cfg.name == "circle":
        return losses.CircleLoss(m=cfg.margin, gamma=cfg.scale)(embeddings, labels)
    triplet = losses.TripletMarginLoss(
        margin=cfg.margin, smooth_loss=cfg.soft, reducer=reducers.MeanReducer(),
        distance=distances.LpDistance(normalize_embeddings=True, p=2),
    )  # fmt: skip
    return triplet(embeddings, labels, miners.BatchHardMiner()(embeddings, labels))


@pytest.mark.parametrize("name", list(PAIRWISE))
def test_pairwise_losses_equal_pytorch_metric_learning(name):
    cfg = PAIRWISE[name]
    x = inputs(1).requires_grad_(True)
    ours = pairwise_share(x, LABELS, slice(None), cfg)
    ours.backward()
    y = inputs(1).requires_grad_(True)
    theirs = metric_learning_oracle(y, LABELS, cfg)
    theirs.backward()
    assert ours.item() > 0
    assert ours.dtype == theirs.dtype == torch.float64
    torch.testing.assert_close(ours, theirs, **FLOAT64)
    torch.testing.assert_close(x.grad, y.grad, **FLOAT64)


def criterion_rank(rank: int, world_size: int, loss: LossConfig) -> dict:
    """A DDP linear backbone under the whole criterion, each rank its part of the global batch."""
    torch.manual_seed(0)
    backbone = torch.nn.Linear(DIM, DIM).double()
    model = torch.nn.parallel.DistributedDataParallel(backbone) if world_size > 1 else backbone
    classifier = ShardedClassifier(CLASSES, DIM, rank, world_size, loss).double()
    share = len(LABELS) // world_size
    mine = slice(rank * share, (rank + 1) * share)
    result = Criterion(classifier, loss)(model(inputs()[mine]), LABELS[mine])
    result.total.backward()
    return {"value": result.value, "grads": {name: p.grad for name, p in backbone.named_parameters()}}


def dense_logits(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, loss: LossConfig) -> torch.Tensor:
    """The class-level logits written from the paper (Sun et al. 2020, eq. 4 as softmax logits)."""
    cosine = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
    s, m = loss.scale, loss.margin
    negative = s * (cosine.detach() + m).clamp_min(0) * (cosine - m)
    positive = -(-s * (1 + m - cosine.detach()).clamp_min(0) * (cosine - (1 - m)))
    own = F.one_hot(labels, weight.shape[0]).bool()
    return torch.where(own, positive, negative)


@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("pairwise", ["circle", "triplet", None])
def test_the_criterion_gives_a_ddp_backbone_the_dense_gradient(world_size, pairwise):
    loss = LossConfig(name="circle", scale=32.0, margin=0.25, label_smoothing=0.1,
                      pairwise=PAIRWISE[pairwise] if pairwise else None)  # fmt: skip
    torch.manual_seed(0)
    backbone = torch.nn.Linear(DIM, DIM).double()
    embeddings = backbone(inputs())
    weight = ShardedClassifier(CLASSES, DIM, 0, 1, loss).double().weight.detach()  # the same rows on any world size
    dense = F.cross_entropy(dense_logits(embeddings, weight, LABELS, loss), LABELS, label_smoothing=0.1)
    if pairwise:
        dense = dense + metric_learning_oracle(embeddings, LABELS, loss.pairwise).double()
    dense.backward()
    results = run_gloo(world_size, criterion_rank, loss) if world_size > 1 else [criterion_rank(0, 1, loss)]
    for result in results:
        torch.testing.assert_close(result["value"], dense.detach(), **FLOAT64)
        for name, parameter in backbone.named_parameters():
            torch.testing.assert_close(result["grads"][name], parameter.grad, **FLOAT64)


def label_smoothing_rank(rank: int, world_size: int, loss: LossConfig) -> dict:
    classifier = ShardedClassifier(CLASSES, DIM, rank, world_size, loss).double()
    share = len(LABELS) // world_size
    x = inputs(2)[rank * share : (rank + 1) * share].clone().requires_grad_(True)
    value = Criterion(classifier, loss)(x, LABELS[rank * share : (rank + 1) * share]).total
    value.backward()
    return {"value": value.detach(), "rows": classifier.weight.grad, "x": x.grad}


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_label_smoothing_on_the_sharded_classifier_equals_torch_cross_entropy(world_size):
    loss = LossConfig(name="circle", scale=64.0, margin=0.25, label_smoothing=0.2)
    full = ShardedClassifier(CLASSES, DIM, 0, 1, loss).double()
    weight = full.weight.detach().clone().requires_grad_(True)
    x = inputs(2).requires_grad_(True)
    dense = F.cross_entropy(dense_logits(x, weight, LABELS, loss), LABELS, label_smoothing=0.2)
    dense.backward()
    results = run_gloo(world_size, label_smoothing_rank, loss) if world_size > 1 else [label_smoothing_rank(0, 1, loss)]
    share = len(LABELS) // world_size
    torch.testing.assert_close(torch.cat([r["rows"] for r in results]), weight.grad, **FLOAT64)
    for rank, result in enumerate(results):
        torch.testing.assert_close(result["value"], dense.detach(), **FLOAT64)
        torch.testing.assert_close(result["x"], world_size * x.grad[rank * share : (rank + 1) * share], **FLOAT64)


def sync_bn_rank(rank: int, world_size: int, x: torch.Tensor, weights: torch.Tensor) -> dict:
    torch.manual_seed(0)
    norm = convert_sync_batchnorm(torch.nn.Sequential(torch.nn.BatchNorm2d(3))).double().train()
    share = x.shape[0] // world_size
    mine = x[rank * share : (rank + 1) * share].clone().requires_grad_(True)
    out = norm(mine)
    (out * weights[rank * share : (rank + 1) * share]).sum().backward()
    layer = norm[0]
    return {"out": out.detach(), "x": mine.grad, "w": layer.weight.grad, "b": layer.bias.grad,
            "mean": layer.running_mean, "var": layer.running_var, "type": type(layer).__name__}  # fmt: skip


@pytest.mark.parametrize("world_size", [2, 3])
def test_sync_batchnorm_equals_one_batchnorm_over_the_global_batch(world_size):
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(12, 3, 5, 4, generator=generator, dtype=torch.float64) * 3 + 1
    weights = torch.randn(12, 3, 5, 4, generator=generator, dtype=torch.float64)
    torch.manual_seed(0)
    dense = torch.nn.BatchNorm2d(3).double().train()
    reference = x.clone().requires_grad_(True)
    out = dense(reference)
    (out * weights).sum().backward()
    results = run_gloo(world_size, sync_bn_rank, x, weights)
    assert {r["type"] for r in results} == {"SyncBatchNorm"}
    torch.testing.assert_close(torch.cat([r["out"] for r in results]), out.detach())
    torch.testing.assert_close(torch.cat([r["x"] for r in results]), reference.grad)
    torch.testing.assert_close(sum(r["w"] for r in results), dense.weight.grad)  # DDP averages these sums
    torch.testing.assert_close(sum(r["b"] for r in results), dense.bias.grad)
    for result in results:
        torch.testing.assert_close(result["mean"], dense.running_mean)
        torch.testing.assert_close(result["var"], dense.running_var)


def test_sync_bn_keeps_the_activation_of_timm_norm_act_layers():
    """EfficientNet-style backbones normalise with timm's BatchNormAct2d (BatchNorm, dropout, then an
    activation in one layer): the converted network computes the same function, in evaluation (the
    running statistics) and in training (the batch's, in one process)."""
    network = ReIDNet(ModelConfig(arch="timm/mobilenetv3_small_050", embedding_dim=16), Preprocessing(height=64, width=32))
    norm_acts = [m for m in network.modules() if isinstance(m, BatchNormAct2d)]
    assert any(not isinstance(m.act, torch.nn.Identity) for m in norm_acts)  # the test needs activations to keep
    images = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    original = network.double()
    converted = convert_sync_batchnorm(copy.deepcopy(original))
    assert not any(isinstance(m, BatchNormAct2d) for m in converted.modules())
    assert sum(isinstance(m, SyncBatchNorm) for m in converted.modules()) == len(norm_acts) + 1  # and the BNNeck
    for training in (False, True):
        with torch.no_grad():
            torch.testing.assert_close(converted.train(training)(images), original.train(training)(images), **FLOAT64)


class _ScaledBatchNorm(torch.nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


@pytest.mark.parametrize(
    "layer, why",
    [(torch.nn.BatchNorm2d(3, affine=False), "has no affine parameters"),
     (torch.nn.BatchNorm2d(3, momentum=None), "has no momentum"),
     (_ScaledBatchNorm(3), "is a tests.test_recipe_losses._ScaledBatchNorm")],
)  # fmt: skip
def test_sync_bn_refuses_a_norm_it_cannot_reproduce_naming_the_layer(layer, why):
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.Sequential(torch.nn.ReLU(), layer))
    with pytest.raises(ConfigError, match=rf"model.sync_bn: layer 1\.1 {why}"):
        convert_sync_batchnorm(network)


@pytest.mark.parametrize("block_rows", [7, row_optim.UPDATE_BLOCK_ROWS])  # 30 rows in 5 blocks, or in one
@pytest.mark.parametrize("decoupled", [False, True])
def test_row_wise_adam_at_full_rate_is_torch_adam(decoupled, block_rows, monkeypatch):
    """In float64, so that the comparison is of the rule, not of float32 rounding (which Adam's
    division by the root of tiny second moments amplifies)."""
    monkeypatch.setattr(row_optim, "UPDATE_BLOCK_ROWS", block_rows)
    loss = LossConfig(name="circle", scale=32.0, margin=0.25)
    row_adam = RowAdam(0.01, (0.9, 0.99), 1e-8, 1e-2, decoupled)
    model = ShardedClassifier(30, 8, loss=loss, optimizer=row_adam).double()
    reference = torch.nn.Parameter(model.weight.detach().clone())
    adam = (torch.optim.AdamW if decoupled else torch.optim.Adam)([reference], lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=1e-2)
    for step in range(5):
        x = torch.randn(10, 8, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        labels = torch.arange(10) * 3
        model(x, labels).backward()
        model.step()
        adam.zero_grad()
        sharded_margin_loss(x, reference, labels, loss).backward()
        adam.step()
    torch.testing.assert_close(model.weight.detach(), reference.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.state("exp_avg"), adam.state[reference]["exp_avg"], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(model.state("exp_avg_sq"), adam.state[reference]["exp_avg_sq"], rtol=1e-12, atol=1e-14)
    assert (model.state("steps") == 5).all()


def test_sampled_rows_take_lazy_adam_steps_and_the_others_rest():
    loss = LossConfig(name="circle", scale=32.0, margin=0.25, sample_rate=0.1)
    row_adam = RowAdam(0.01, (0.9, 0.999), 1e-8, 0.0, decoupled=False)
    model = ShardedClassifier(200, 8, loss=loss, optimizer=row_adam)
    before = model.weight.detach().clone()
    drawn = torch.zeros(200, dtype=torch.bool)
    for step in range(3):
        model(torch.randn(16, 8), torch.randint(0, 200, (16,))).backward()
        drawn[model._active[0]] = True
        model.step()
    steps = model.state("steps").squeeze(1)
    assert (steps[~drawn] == 0).all() and (steps[drawn] >= 1).all() and steps.max() <= 3
    assert torch.equal(model.weight.detach()[~drawn], before[~drawn])
    assert (model.state("exp_avg")[~drawn] == 0).all()
    assert (model.weight.detach()[drawn] != before[drawn]).any(dim=1).all()


def test_a_classifier_saved_with_another_optimizer_is_refused_by_name():
    from reid_platform.errors import ModelFormatError

    sgd = ShardedClassifier(10, 4)
    adam = ShardedClassifier(10, 4, optimizer=RowAdam(0.01, (0.9, 0.999), 1e-8, 0.0, decoupled=False))
    with pytest.raises(ModelFormatError, match="have no exp_avg, exp_avg_sq, steps state but momentum: saved with another train.optimizer"):
        adam.load_shards([sgd.shard_state()])


