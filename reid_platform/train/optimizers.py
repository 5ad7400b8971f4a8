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


def backbone_state_copies(cfg: TrainConfig) -> int:
    """Parameter-sized tensors of state ``backbone_optimizer`` keeps: SGD's momentum buffers (none at
    momentum 0), Adam's two moments (its step counts are scalars)."""
    if cfg.optimizer == "sgd":
        return 1 if cfg.momentum else 0
    return 2


def backbone_update_temporaries(cfg: TrainConfig) -> int:
    """Parameter-sized tensors alive at once in the step of torch's foreach SGD / Adam: SGD's decayed
    gradient; Adam's decayed gradient, then sqrt(exp_avg_sq), never both (it deletes the first before
    it allocates the second)."""
    if cfg.optimizer == "sgd":
        return 1 if cfg.weight_decay else 0
    return 1
