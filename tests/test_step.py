"""The training step on CPU, with the GPU settings forced: bf16 autocast and channels-last must give
the fp32 contiguous step's result (within bf16 precision), and the schedule must not depend on how
many steps an epoch has."""

from __future__ import annotations

import copy

import pytest
import torch

from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig
from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.parallel.config import LossConfig
from reid_platform.parallel.criterion import Criterion
from reid_platform.train.schedule import lr_factor
from reid_platform.train.step import StepSettings, train_step

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)


def one_step(settings: StepSettings) -> tuple[float, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = settings.prepare_model(ReIDNet(ModelConfig(arch="resnet18", embedding_dim=32))).train()
    loss = LossConfig(name="circle", scale=32.0, margin=0.25)
    classifier = ShardedClassifier(10, 32, 0, 1, loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(8, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    labels = torch.arange(8) % 10
    value = train_step(model, Criterion(classifier, loss), optimizer, images, labels, 1.0, settings)
    return value.item(), copy.deepcopy(model.projection.weight.detach()), classifier.weight.detach().clone()


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_settings_follow_the_device():
    cpu = StepSettings.for_device(torch.device("cpu"), "auto", channels_last=True)
    assert cpu == StepSettings(None, False)  # fp32, contiguous on CPU
    assert StepSettings.for_device(torch.device("cpu"), "bf16", True).autocast_dtype is torch.bfloat16


def test_channels_last_and_bf16_match_the_fp32_step():
    loss, projection, rows = one_step(StepSettings(None, False))
    nhwc_loss, nhwc_projection, nhwc_rows = one_step(StepSettings(None, True))
    assert nhwc_loss == pytest.approx(loss, rel=1e-5)
    # another convolution algorithm: equal up to float32 rounding, amplified a little by one update
    assert relative_difference(nhwc_projection, projection) < 1e-5
    assert relative_difference(nhwc_rows, rows) < 1e-4
    bf16_loss, bf16_projection, _ = one_step(StepSettings(torch.bfloat16, True))
    assert bf16_loss == pytest.approx(loss, rel=2e-2)
    assert torch.nn.functional.cosine_similarity(bf16_projection.flatten(), projection.flatten(), dim=0) > 0.999


def test_schedule_is_a_function_of_epochs_not_steps():
    # the same point of training with 5 or 3 steps per epoch (2 or 3 workers) gets the same rate
    assert lr_factor(4 + 2 / 5, 10, 2, 2) == lr_factor(4 + 1.2 / 3, 10, 2, 2)
    assert lr_factor(0, 10, 2, 2) == pytest.approx(0.01) and lr_factor(2, 10, 2, 2) == pytest.approx(1.0)
    assert lr_factor(10, 10, 2, 2) == pytest.approx(0.01)
    # held at 100% until the decay starts, then the same cosine over what is left; or never decaying
    assert lr_factor(3, 10, 2, decay_start=5) == lr_factor(5, 10, 2, decay_start=5) == 1.0
    assert lr_factor(7.5, 10, 2, decay_start=5) == pytest.approx(lr_factor(5, 10, 0, 0)) and lr_factor(10, 10, 2, 5) == pytest.approx(0.01)
    assert lr_factor(9.9, 10, 0, decay_start=10) == 1.0
