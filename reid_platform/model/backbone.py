"""Re-ID embedding network: a trunk of any family, pooling, BNNeck.

    forward_features(images) -> trunk output (a feature map, or a transformer's tokens)
    forward_head(features)   -> embedding: pooled, projected (optionally), batch-normalised

The network ends at the embedding; the classifier lives in ``reid_platform.parallel`` because it is
sharded across workers and is thrown away after training. Trunks: ``resnet.py`` (torchvision ResNets
and IBN-a) and ``timm_family.py`` (any timm model).

BNNeck (Luo et al., "Bag of Tricks", 2019): the loss sees the batch-normalised feature, whose bias is
frozen so the embedding stays centred for cosine similarity. Evaluation uses the same feature,
L2-normalised. Pooling is average or GeM (generalised mean, learnable p, as fast-reid); a
transformer's tokens are pooled the way its timm model pools them (class token or mean).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reid_platform.errors import ConfigError
from reid_platform.model import pretrained
from reid_platform.model.config import ModelConfig, Preprocessing
from reid_platform.model.resnet import load_resnet_weights, resnet_trunk
from reid_platform.model.timm_family import timm_trunk


class GeM(nn.Module):
    """(mean(clamp(x, eps)^p))^(1/p) over the spatial positions, p learnable (initialised at 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = nn.Parameter(torch.tensor(p)), eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p)


class ReIDNet(nn.Module):
    """The network of ``cfg`` for inputs of ``preprocessing``'s size; its trunk from ``weights`` if given
    (``build_model`` finds them from ``cfg.pretrained``)."""

    def __init__(self, cfg: ModelConfig, preprocessing: Preprocessing = Preprocessing(), weights: Path | None = None):
        super().__init__()
        self.cfg = cfg
        if cfg.timm_name:
            self.trunk, width = timm_trunk(cfg.timm_name, cfg.last_stride, (preprocessing.height, preprocessing.width), weights)
        else:
            self.trunk, width = resnet_trunk(cfg.arch, cfg.last_stride)
            if weights is not None:
                load_resnet_weights(self.trunk, cfg.arch, weights)
        self.tokens = _gives_tokens(self.trunk, preprocessing)
        if self.tokens and cfg.pooling == "gem":
            raise ConfigError(f"model.pooling: gem pools feature maps, and {cfg.arch} gives tokens; use avg")
        self.pool = GeM() if cfg.pooling == "gem" else nn.AdaptiveAvgPool2d(1)
        self.feature_dim = cfg.embedding_dim or width
        self.projection = nn.Linear(width, cfg.embedding_dim, bias=False) if cfg.embedding_dim else nn.Identity()
        self.bnneck = nn.BatchNorm1d(self.feature_dim)
        self.bnneck.bias.requires_grad_(False)
        nn.init.ones_(self.bnneck.weight)
        nn.init.zeros_(self.bnneck.bias)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk.forward_features(images) if self.cfg.timm_name else self.trunk(images)

    def forward_head(self, features: torch.Tensor) -> torch.Tensor:
        pooled = self.trunk.forward_head(features, pre_logits=True) if self.tokens else self.pool(features).flatten(1)
        return self.bnneck(self.projection(pooled))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (before L2 normalisation) of a batch of normalised images."""
        return self.forward_head(self.forward_features(images))

    def head_parameters(self) -> list[nn.Parameter]:
        """What trains on top of the trunk (pooling, projection, BNNeck): all that a freeze warm-up trains."""
        return [*self.pool.parameters(), *self.projection.parameters(), *self.bnneck.parameters()]

    @torch.no_grad()
    def embed(self, images: torch.Tensor, flip: bool = False) -> torch.Tensor:
        """L2-normalised embeddings for retrieval; with ``flip``, of the mean of each image's embedding
        and its horizontal mirror's."""
        embeddings = self(images)
        if flip:
            embeddings = embeddings + self(images.flip(-1))
        return F.normalize(embeddings, dim=1)


def _gives_tokens(trunk: nn.Module, preprocessing: Preprocessing) -> bool:
    """Whether the trunk's features are tokens (B, N, D) rather than a feature map (B, C, H, W)."""
    if not hasattr(trunk, "forward_head"):
        return False
    was_training = trunk.training
    with torch.no_grad():
        shape = trunk.eval().forward_features(torch.zeros(1, 3, preprocessing.height, preprocessing.width)).shape
    trunk.train(was_training)
    return len(shape) == 3


def build_model(cfg: ModelConfig, preprocessing: Preprocessing = Preprocessing()) -> ReIDNet:
    """The network to train: ``cfg``'s, for inputs of ``preprocessing``'s size, its trunk from the
    weights ``cfg.pretrained`` names (read from a local file: see ``pretrained.py``)."""
    return ReIDNet(cfg, preprocessing, pretrained.weights_file(cfg, download=False))
