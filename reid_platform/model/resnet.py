"""The ResNet family: torchvision's ResNets and their IBN-a variants, as re-ID trunks.

Re-ID changes two things (Luo et al., "Bag of Tricks", 2019): the last stage keeps its resolution
(last stride 1), and the classifier is dropped. IBN-a (Pan et al., ECCV 2018) puts InstanceNorm on
the first half of the channels of the first normalisation of every block in layer1-layer3 (appearance
invariance, e.g. to a camera's colours) and keeps BatchNorm on the other half; layer4 is unchanged.

ImageNet ResNet weights load into either: an IBN layer takes the first half of the plain layer's
affine parameters for its InstanceNorm and the second half (with the running statistics) for its
BatchNorm, so every tensor of the plain network finds its place.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

from reid_platform.errors import ModelFormatError

# torchvision's ResNet attribute names, in the order of our trunk's nn.Sequential
TRUNK_PARTS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
IBN_LAYERS = ("layer1", "layer2", "layer3")


class IBN(nn.Module):
    """InstanceNorm (affine) on the first half of the channels, BatchNorm on the rest."""

    def __init__(self, channels: int):
        super().__init__()
        self.half = channels // 2
        self.IN = nn.InstanceNorm2d(self.half, affine=True)
        self.BN = nn.BatchNorm2d(channels - self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.IN(first.contiguous()), self.BN(second.contiguous())], dim=1)


def resnet_trunk(arch: str, last_stride: int) -> tuple[nn.Sequential, int]:
    """(the convolutional trunk of ``arch``, its output width)."""
    base = arch.removesuffix("_ibn_a")
    resnet = getattr(torchvision.models, base)(weights=None)
    if arch.endswith("_ibn_a"):
        for layer in IBN_LAYERS:
            for block in getattr(resnet, layer):
                block.bn1 = IBN(block.bn1.num_features)
    if last_stride == 1:
        block = resnet.layer4[0]
        strided = block.conv2 if hasattr(block, "conv3") else block.conv1  # Bottleneck vs BasicBlock
        strided.stride = (1, 1)
        if block.downsample is not None:
            block.downsample[0].stride = (1, 1)
    return nn.Sequential(*(getattr(resnet, part) for part in TRUNK_PARTS)), resnet.fc.in_features


def _trunk_key(key: str) -> str | None:
    """A torchvision ResNet state-dict key as a key of our trunk (None for the classifier)."""
    head, _, rest = key.partition(".")
    return f"{TRUNK_PARTS.index(head)}.{rest}" if head in TRUNK_PARTS else None


def _torchvision_key(key: str) -> str:
    """The other way: our trunk's key as torchvision names it (for messages)."""
    index, _, rest = key.partition(".")
    return f"{TRUNK_PARTS[int(index)]}.{rest}".replace(".IN.", ".").replace(".BN.", ".")


def _split_into_ibn(state: dict[str, torch.Tensor], trunk: nn.Sequential) -> dict[str, torch.Tensor]:
    """Plain ``...bn1.*`` tensors of the IBN blocks re-addressed to their IN and BN halves."""
    ibn_prefixes = {name.removesuffix(".IN") for name, module in trunk.named_modules() if isinstance(module, nn.InstanceNorm2d)}
    moved = {}
    for key, value in state.items():
        prefix, _, field = key.rpartition(".")
        if prefix not in ibn_prefixes:
            moved[key] = value
            continue
        half = value.shape[0] // 2 if value.dim() else 0
        if field in ("weight", "bias"):
            moved[f"{prefix}.IN.{field}"], moved[f"{prefix}.BN.{field}"] = value[:half], value[half:]
        elif field in ("running_mean", "running_var"):
            moved[f"{prefix}.BN.{field}"] = value[half:]
        else:  # num_batches_tracked
            moved[f"{prefix}.BN.{field}"] = value
    return moved


def load_resnet_weights(trunk: nn.Sequential, arch: str, path: Path) -> None:
    """A torchvision ResNet state dict (the architecture's ImageNet weights, say) into the trunk; a file
    of another architecture is refused, naming the first tensor that does not fit."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError) as error:
        raise ModelFormatError(f"{path}: cannot load pretrained weights: {error}") from None
    if not isinstance(state, dict):
        raise ModelFormatError(f"{path}: not a state dict ({type(state).__name__})")
    renamed = {key: value for key, value in ((_trunk_key(k), v) for k, v in state.items()) if key is not None}
    renamed = _split_into_ibn(renamed, trunk)
    for key, value in trunk.state_dict().items():
        if key not in renamed:
            raise ModelFormatError(f"{path}: not {arch} weights: it has no {_torchvision_key(key)}")
        if renamed[key].shape != value.shape:
            raise ModelFormatError(
                f"{path}: not {arch} weights: {_torchvision_key(key)} has shape {tuple(renamed[key].shape)}, "
                f"{arch} needs {tuple(value.shape)}"
            )
    trunk.load_state_dict({key: renamed[key] for key in trunk.state_dict()})
