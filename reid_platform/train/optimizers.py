"""``train.optimizer`` for both halves of the model: torch's optimizer for the data-parallel backbone,
the matching row-wise one (``parallel/row_optim.py``) for the sharded classifier."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from reid_platform.parallel.row_optim import RowAdam, RowOptimizer, RowSGD
from reid_platform.train.config import TrainConfig

ADAM_EPS = 1e-8  # torch.optim.Adam's default, used by both halves


def backbone_optimizer(groups: Iterable[dict], cfg: TrainConfig) -> torch.optim.Optimizer:
    """``cfg.optimizer`` over parameter ``groups`` (each a dict with ``params`` and a ``name``)."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    adam = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return adam(groups, lr=cfg.lr, betas=cfg.betas, eps=ADAM_EPS, weight_decay=cfg.weight_decay)


def classifier_optimizer(cfg: TrainConfig) -> RowOptimizer:
    """``cfg.optimizer`` for the classifier's rows, at ``cfg.classifier_lr`` (by default ``cfg.lr``)."""
    lr = cfg.classifier_lr or cfg.lr
    if cfg.optimizer == "sgd":
        return RowSGD(lr, cfg.momentum, cfg.weight_decay)
    return RowAdam(lr, cfg.betas, ADAM_EPS, cfg.weight_decay, decoupled=cfg.optimizer == "adamw")
