"""Training-step speed of the re-ID recipe on one device: fp32 vs bf16 autocast vs bf16 + channels-last.

Runs the production step (``reid_platform.train.step.train_step``: ResNet backbone with BNNeck, the
sharded Circle-loss classifier with world size 1, SGD on both) on synthetic tensors, so it needs only
torch and torchvision: no DALI, Ray or MLflow (the GPU machine has none of them). The fp32 contiguous
step is the baseline measured in the same run.

    python benchmarks/gpu_step.py                       # resnet50, 256x128, batch 64, Market's 751 classes
    python benchmarks/gpu_step.py --device cpu --arch resnet18 --steps 3 --warmup 1   # a smoke run

Prints one JSON object per variant, then a summary with the speed-ups.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid_platform.model.backbone import ReIDNet  # noqa: E402
from reid_platform.model.config import ModelConfig  # noqa: E402
from reid_platform.parallel.classifier import ShardedClassifier  # noqa: E402
from reid_platform.parallel.config import LossConfig  # noqa: E402
from reid_platform.parallel.criterion import Criterion  # noqa: E402
from reid_platform.parallel.row_optim import RowSGD  # noqa: E402
from reid_platform.train.step import StepSettings, train_step  # noqa: E402

VARIANTS = {
    "fp32": ("fp32", False),
    "bf16": ("bf16", False),
    "bf16_channels_last": ("bf16", True),
    "auto": ("auto", True),  # what training uses by default: train.precision auto, train.channels_last true
}


def run_variant(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    precision, channels_last = VARIANTS[name]
    settings = StepSettings.for_device(device, precision, channels_last)
    torch.manual_seed(0)
    model = settings.prepare_model(ReIDNet(ModelConfig(arch=args.arch, last_stride=1)).to(device)).train()
    loss = LossConfig(name="circle", scale=128.0, margin=0.25)
    row_sgd = RowSGD(lr=0.1, momentum=0.9, weight_decay=0.0)
    classifier = ShardedClassifier(args.classes, model.feature_dim, 0, 1, loss, row_sgd, device=device)
    criterion = Criterion(classifier, loss)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(args.batch_size, 3, args.height, args.width, generator=generator).to(device)
    labels = torch.randint(0, args.classes, (args.batch_size,), generator=generator).to(device)

    first_loss = train_step(model, criterion, optimizer, images, labels, 1.0, settings).item()
    for _ in range(args.warmup - 1):
        train_step(model, criterion, optimizer, images, labels, 1.0, settings)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(args.steps):
        loss = train_step(model, criterion, optimizer, images, labels, 1.0, settings)
    last_loss = loss.item()  # waits for the queued steps
    elapsed = time.perf_counter() - started
    return {
        "variant": name,
        "autocast": str(settings.autocast_dtype),
        "channels_last": settings.channels_last,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": args.arch,
        "batch_size": args.batch_size,
        "input": f"{args.height}x{args.width}",
        "classes": args.classes,
        "steps": args.steps,
        "images_per_s": round(args.batch_size * args.steps / elapsed, 1),
        "ms_per_step": round(1000 * elapsed / args.steps, 2),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "first_loss": round(first_loss, 4),
        "last_loss": round(last_loss, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--classes", type=int, default=751)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["fp32", "bf16", "bf16_channels_last"])
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    results = []
    for name in args.variants:
        results.append(run_variant(name, args, device))
        print(json.dumps(results[-1]), flush=True)
    baseline = results[0]["images_per_s"]
    print(json.dumps({
        "summary": f"speed-up over {results[0]['variant']}",
        **{result["variant"]: round(result["images_per_s"] / baseline, 2) for result in results},
    }))


if __name__ == "__main__":
    main()
