"""Re-ID embedding network: torchvision ResNet trunk, last stride 1, pooled, BNNeck.

The network ends at the embedding; the classifier lives in ``reid_platform.parallel`` because it is
sharded across workers and is thrown away after training.

BNNeck (Luo et al., "Bag of Tricks", 2019): the loss sees the batch-normalised feature, whose bias is
frozen so the embedding stays centred for cosine similarity. Evaluation uses the same feature,
L2-normalised.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from reid_platform.errors import ModelFormatError
from reid_platform.model.config import ModelConfig

ARCH_WIDTHS = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048}


class ReIDNet(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        resnet = getattr(torchvision.models, cfg.arch)(weights=None)
        if cfg.last_stride == 1:
            _remove_last_stride(resnet.layer4)
        self.trunk = nn.Sequential(
            resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool,
            resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4,
        )  # fmt: skip
        width = ARCH_WIDTHS[cfg.arch]
        self.feature_dim = cfg.embedding_dim or width
        self.projection = nn.Linear(width, cfg.embedding_dim, bias=False) if cfg.embedding_dim else nn.Identity()
        self.bnneck = nn.BatchNorm1d(self.feature_dim)
        self.bnneck.bias.requires_grad_(False)
        nn.init.ones_(self.bnneck.weight)
        nn.init.zeros_(self.bnneck.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (before L2 normalisation) of a batch of normalised images."""
        pooled = F.adaptive_avg_pool2d(self.trunk(images), 1).flatten(1)
        return self.bnneck(self.projection(pooled))

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """L2-normalised embeddings for retrieval."""
        return F.normalize(self(images), dim=1)


def _remove_last_stride(layer4: nn.Sequential) -> None:
    block = layer4[0]
    strided = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck vs BasicBlock
    strided.stride = (1, 1)
    if block.downsample is not None:
        block.downsample[0].stride = (1, 1)


def build_model(cfg: ModelConfig) -> ReIDNet:
    """The network of ``cfg``, with its pretrained trunk weights when it names a file."""
    model = ReIDNet(cfg)
    if cfg.pretrained_weights is not None:
        load_pretrained_trunk(model, cfg.pretrained_weights)
    return model


def load_pretrained_trunk(model: ReIDNet, path: Path) -> None:
    """Load a local torchvision ImageNet state dict into the trunk (fc weights are ignored)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError) as error:
        raise ModelFormatError(f"{path}: cannot load pretrained weights: {error}") from None
    names = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
    renamed = {}
    for key, value in state.items():
        head, _, rest = key.partition(".")
        if head in names:
            renamed[f"{names.index(head)}.{rest}"] = value
    try:
        missing, _ = model.trunk.load_state_dict(renamed, strict=False)
    except RuntimeError as error:  # shape mismatches: another architecture
        raise ModelFormatError(f"{path}: not a {model.cfg.arch} state dict: {str(error).splitlines()[1].strip()}") from None
    if missing:
        raise ModelFormatError(f"{path}: not a {model.cfg.arch} state dict; missing {missing[:3]}...")
