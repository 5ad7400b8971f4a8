"""A model's preprocessing (``config.Preprocessing``) as torchvision transforms: what evaluation,
inference and the served model apply to an image, and what training's augmentation ends with."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from reid_platform.model.config import Preprocessing


def to_normalized_tensor(cfg: Preprocessing) -> list:
    """The last steps of every transform: a float image in [0, 1], normalised per channel."""
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(cfg.mean, cfg.std)]


def eval_transform(cfg: Preprocessing) -> v2.Compose:
    return v2.Compose([v2.Resize((cfg.height, cfg.width)), *to_normalized_tensor(cfg)])
