"""Measure what each backbone keeps for its backward pass: the table `reid plan` sizes activations with.

For every architecture and both last strides, the re-ID network (``model.backbone.build_model``:
trunk, pooling, BNNeck) runs one training-mode forward in fp32 on CPU at the reference size, under
``torch.autograd.graph.saved_tensors_hooks``: the bytes saved for backward are the sum of the unique
storages of the saved tensors, less the parameters and buffers (counted as the model's own). Two
batch sizes separate the part that grows with the batch (per image) from a fixed part. The memory a
saved tensor takes does not depend on the device, so a CPU measurement sizes a GPU.

    python benchmarks/backbone_memory.py                  # every ResNet and IBN-a ResNet, into the package
    python benchmarks/backbone_memory.py --arch resnet18 --out /tmp/table.json

Writes (merges into) ``reid_platform/model/backbone_memory.json`` and prints one JSON line per entry.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid_platform.model.backbone import build_model
from reid_platform.model.backbone_memory import TABLE_PATH
from reid_platform.model.config import IBN_RESNETS, RESNETS, ModelConfig, Preprocessing

REFERENCE = (256, 128)  # the re-ID recipes' input: a table entry needs no pixel scaling there
BATCHES = (2, 4)


def network(arch: str, last_stride: int, size: tuple[int, int]) -> nn.Module:
    height, width = size
    return build_model(
        ModelConfig(arch=arch, last_stride=last_stride), Preprocessing(height=height, width=width)
    ).train()


def saved_bytes(model: nn.Module, batch: int, size: tuple[int, int]) -> int:
    """Bytes of the distinct storages one forward of ``batch`` images saves for backward, the model's
    own parameters and buffers left out."""
    own = {tensor.untyped_storage().data_ptr() for tensor in (*model.parameters(), *model.buffers())}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in own:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    torch.manual_seed(0)
    images = torch.randn(batch, 3, *size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        output = model(images)  # kept alive until measured: its graph holds the saved storages
    total = sum(storages.values())
    del output
    return total


def activation_fit(model: nn.Module, size: tuple[int, int], batches: tuple[int, int] = BATCHES) -> dict:
    """Per-image bytes (per pixel of the image) and the fixed bytes, from two batch sizes."""
    small, large = batches
    at_small, at_large = saved_bytes(model, small, size), saved_bytes(model, large, size)
    per_image = (at_large - at_small) / (large - small)
    return {
        "bytes_per_image_pixel": per_image / (size[0] * size[1]),
        "fixed_bytes": round(at_small - small * per_image),
    }


def trunk_record(arch: str) -> dict:
    """What the planner needs of the trunk besides activations: its size, width and BatchNorm layers."""
    model = network(arch, 1, REFERENCE)
    norms = [
        module for module in model.trunk.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)
    ]
    return {
        "trunk_parameters": sum(parameter.numel() for parameter in model.trunk.parameters()),
        "width": model.feature_dim,
        "batchnorm_layers": len(norms),
        "batchnorm_channels": sum(norm.num_features for norm in norms),
    }


def measure(arch: str, size: tuple[int, int]) -> dict:
    activations = {
        f"last_stride_{stride}": activation_fit(network(arch, stride, size), size) for stride in (1, 2)
    }
    return {**trunk_record(arch), "activations": activations}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--arch", nargs="+", default=[*RESNETS, *IBN_RESNETS], help="model.arch names (timm/NAME too)"
    )
    parser.add_argument("--out", type=Path, default=TABLE_PATH, help="table to write, its other entries kept")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = json.loads(args.out.read_text()) if args.out.exists() else {}
    table["reference"] = {
        "height": REFERENCE[0], "width": REFERENCE[1], "batches": list(BATCHES), "dtype": "float32",
        "torch": torch.__version__.split("+")[0], "script": "benchmarks/backbone_memory.py",
    }  # fmt: skip
    archs = table.setdefault("archs", {})
    for arch in args.arch:
        archs[arch] = measure(arch, REFERENCE)
        print(json.dumps({"arch": arch, **archs[arch]}), flush=True)
    args.out.write_text(json.dumps(table, indent=2, sort_keys=True) + "\n")


if __name__ == "__main__":
    main()
