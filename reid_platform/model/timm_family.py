"""Any timm backbone (``model.arch: timm/NAME``) as a re-ID trunk.

timm builds the network without its classifier (``num_classes=0``); its ``forward_features`` gives
a feature map (CNNs) or tokens (transformers). Vision transformers are built for the training
resolution (``img_size``), which timm also applies to pretrained position embeddings. Where the
family has a strided last stage of the ResNet kind (``layer4``), last stride 1 removes that stride.
Pretrained weights come from a local file (see ``pretrained.py``: the driver resolves ``imagenet``
to the file timm's own Hugging Face cache holds), so workers never download.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from torch import nn

from reid_platform.errors import ConfigError, ModelFormatError


def check_timm_name(name: str) -> None:
    """ConfigError, with the closest names, when timm has no model ``name``."""
    import timm

    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f" (close: {', '.join(close)})" if close else ""
        raise ConfigError(
            f"model.arch: timm has no model {name!r}{hint}; timm.list_models() lists its {len(timm.list_models())}"
        )


def timm_trunk(name: str, last_stride: int, image_size: tuple[int, int], weights: Path | None) -> tuple[nn.Module, int]:
    """(timm's ``name`` without its classifier, its feature width), from ``weights`` when given."""
    import timm

    check_timm_name(name)
    options: dict = {"num_classes": 0}
    if weights is not None:
        options.update(pretrained=True, pretrained_cfg_overlay={"file": str(weights)})
    try:
        model = _create(timm, name, image_size, options)
    except (RuntimeError, OSError, ValueError) as error:
        if weights is None:
            raise
        raise ModelFormatError(f"{weights}: not weights of timm/{name}: {str(error).splitlines()[0][:300]}") from None
    if last_stride == 1 and hasattr(model, "layer4"):
        _remove_last_stride(model.layer4[0])
    return model, model.num_features


def _create(timm, name: str, image_size: tuple[int, int], options: dict) -> nn.Module:
    # Transformers take the input size (their position embeddings depend on it); CNNs refuse the
    # argument, and timm offers no flag that tells the two apart before building.
    try:
        return timm.create_model(name, img_size=image_size, **options)
    except TypeError:
        return timm.create_model(name, **options)


def _remove_last_stride(block: nn.Module) -> None:
    strided = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck vs BasicBlock
    strided.stride = (1, 1)
    downsample = getattr(block, "downsample", None)
    for index, layer in enumerate(downsample or []):
        if isinstance(layer, nn.Conv2d):
            layer.stride = (1, 1)
        elif isinstance(layer, nn.AvgPool2d):  # the "d" variants pool before a 1x1 convolution
            downsample[index] = nn.Identity()
