"""What each backbone holds in memory, measured: per architecture, the trunk's parameters, width and
BatchNorm layers, and the activations a training forward saves for backward (``backbone_memory.json``,
written by ``benchmarks/backbone_memory.py``). ``reid plan`` sizes a worker with them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

TABLE_PATH = Path(__file__).with_name("backbone_memory.json")
# Saved activations of a half-precision forward take half the bytes of the fp32 measurement: an
# assumption (BatchNorm statistics and the fp32 input stay full size), which the GPU benchmark bears
# out for ResNet-50 at 256x128 (0.51x from 128 to 256 images, benchmarks/README.md).
HALF_ACTIVATION_FACTOR = 0.5


@dataclass(frozen=True)
class BackboneProfile:
    """One architecture's entry of the measured table."""

    arch: str
    trunk_parameters: int
    width: int
    batchnorm_layers: int
    batchnorm_channels: int
    bytes_per_image_pixel: dict[int, float]  # by last stride: saved activations, fp32
    fixed_bytes: dict[int, int]

    def activation_bytes(self, images: int, height: int, width: int, last_stride: int, half: bool) -> int:
        """The activations saved for backward by a forward of ``images`` images, in half precision or fp32."""
        pixels = height * width
        fp32 = self.bytes_per_image_pixel[last_stride] * pixels * images + self.fixed_bytes[last_stride]
        return round(fp32 * (HALF_ACTIVATION_FACTOR if half else 1.0))


def load_profiles(path: Path = TABLE_PATH) -> dict[str, BackboneProfile]:
    """The measured backbones, by ``model.arch``."""
    archs = json.loads(path.read_text())["archs"]
    return {arch: _profile(arch, entry) for arch, entry in archs.items()}


def _profile(arch: str, entry: dict) -> BackboneProfile:
    by_stride = {int(key.removeprefix("last_stride_")): fit for key, fit in entry["activations"].items()}
    return BackboneProfile(
        arch=arch,
        trunk_parameters=entry["trunk_parameters"],
        width=entry["width"],
        batchnorm_layers=entry["batchnorm_layers"],
        batchnorm_channels=entry["batchnorm_channels"],
        bytes_per_image_pixel={stride: fit["bytes_per_image_pixel"] for stride, fit in by_stride.items()},
        fixed_bytes={stride: fit["fixed_bytes"] for stride, fit in by_stride.items()},
    )
