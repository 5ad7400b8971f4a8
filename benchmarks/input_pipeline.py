"""Training input throughput: DALI CPU against the torch baseline, same shards, transforms and cores.

Writes a synthetic Market-1501 tree of 128x256 JPEGs (person figures rendered at 64x128 and scaled
up), packs it with 2 worker processes (timed: images per second of the whole pack, index and sha256
included), then reads training batches of 64 from the same shards through each backend with 2
threads (DALI) or 2 DataLoader workers (torch): resize to 256x128, pad 10 + random crop, flip,
normalise, random erasing. A few warm-up steps are run first; then images per second over ``--steps``.

    python benchmarks/input_pipeline.py --images 5000

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

from reid_platform.data.manifest import ShardDataset
from reid_platform.input.config import InputConfig
from reid_platform.data.pack import PackOptions, pack_dataset
from reid_platform.data.synth import write_synthetic_market1501
from reid_platform.input import train_loader
from reid_platform.input.partition import Partition

TRAIN_IMAGES_PER_IDENTITY = 12


def write_dataset(root: Path, train_images: int) -> int:
    identities = 2 * -(-train_images // TRAIN_IMAGES_PER_IDENTITY)  # half of them train
    write_synthetic_market1501(root, identities=identities, cameras=6, seed=0, progress=False)
    files = sorted(root.rglob("*.jpg"))
    for path in files:
        with Image.open(path) as image:
            image.resize((128, 256), Image.Resampling.BILINEAR).save(path, "JPEG", quality=90)
    return len(files)


def images_per_second(cfg: InputConfig, shards: Path, steps: int, warmup: int = 5) -> float:
    loader = train_loader(ShardDataset.open(shards), Partition(0, 1), cfg, seed=0)
    batches = iter(loader)
    for _ in range(warmup):
        next(batches)
    started, seen = time.perf_counter(), 0
    for _ in range(steps):
        images, _ = next(batches)
        seen += images.shape[0]
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="training images (the test splits come on top)")
    parser.add_argument("--steps", type=int, default=40, help="timed batches of 64 per backend")
    args = parser.parse_args()
    torch.set_num_threads(1)  # the loaders' own threads/workers do the work
    with tempfile.TemporaryDirectory() as scratch:
        root, shards = Path(scratch) / "raw", Path(scratch) / "shards"
        total_files = write_dataset(root, args.images)
        started = time.perf_counter()
        manifest = pack_dataset([("market1501", root)], shards, PackOptions(workers=2), progress=False)
        pack_seconds = time.perf_counter() - started
        packed = sum(split.samples for split in manifest.splits.values())
        base = InputConfig(height=256, width=128, batch_size=64, num_threads=2, pad=10, erasing_prob=0.5)
        steps = min(args.steps, manifest.splits["train"].samples // 64 - 6)
        dali = images_per_second(base, shards, steps)
        baseline = images_per_second(base.model_copy(update={"backend": "torch"}), shards, steps)
    print(
        json.dumps(
            {
                "images": manifest.splits["train"].samples,
                "files_packed": packed,
                "files_written": total_files,
                "image_size": "128x256",
                "threads": 2,
                "timed_batches": steps,
                "dali_images_per_s": round(dali, 1),
                "torch_images_per_s": round(baseline, 1),
                "ratio": round(dali / baseline, 2),
                "pack_seconds": round(pack_seconds, 2),
                "pack_images_per_s": round(packed / pack_seconds, 1),
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
