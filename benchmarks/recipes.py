"""Recipes at equal budget: the baseline, each standard re-ID addition, and a plain PyTorch loop.

A synthetic set harder than the demo's (more identities, cameras that differ more) is packed once.
Every variant trains resnet18 from scratch at 128x64 for the same number of epochs at a global
batch of 64, on the same cores (the platform on 2 gloo workers, the demo's layout, without Ray),
and is evaluated on the same query and gallery. Test-time additions (flip, AQE) re-evaluate the
models of the default and the combined variants instead of training again.

    python benchmarks/recipes.py --epochs 8                     # every variant (about 80 minutes here)
    python benchmarks/recipes.py --variants plain default       # some of them

Prints one JSON line per variant: mAP, rank-1 and mINP before and after training, training
images/s and wall time, and the settings (config overrides) that make the variant.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import PlainLoop, on_engines, run_config, synthetic_shards

from reid_platform.data.manifest import ShardDataset
from reid_platform.evaluation.distributed import evaluate_model
from reid_platform.input.partition import Partition
from reid_platform.train.engine import Engine

# The demo's recipe as it was: SGD 0.05, one warm-up epoch, then a cosine decay straight away.
BASELINE = ["train.optimizer=sgd", "train.lr=0.05", "train.warmup_epochs=1", "train.decay_start_epochs=1"]
IDENTITY = ["input.sampler=identity", "input.images_per_identity=4"]
VARIANTS: dict[str, list[str]] = {
    "baseline": BASELINE,
    "default": [],  # the platform's defaults as configs/demo.yaml ships them (Adam, hold then cosine)
    "identity_sampler": IDENTITY,
    "pairwise_circle": [*IDENTITY, "loss.pairwise={name: circle}"],
    "triplet": [*IDENTITY, "loss.pairwise={name: triplet}"],
    "label_smoothing": ["loss.label_smoothing=0.1"],
    "gem": ["model.pooling=gem"],
    "ibn": ["model.arch=resnet18_ibn_a"],
    "sync_bn": ["model.sync_bn=true"],
    "freeze": ["train.freeze_backbone_epochs=1"],
    "erasing": ["input.erasing_prob=0.5"],
    # the additions that help at this budget, together
    "combined": [*IDENTITY, "loss.pairwise={name: circle}", "loss.label_smoothing=0.1", "model.arch=resnet18_ibn_a"],
    # the combination without the backbone change: the recipe knobs alone, a candidate for the defaults
    "recipe": [*IDENTITY, "loss.pairwise={name: circle}", "loss.label_smoothing=0.1"],
}
TEST_TIME = {"flip": {"flip": True}, "aqe": {"aqe_k": 2}, "flip_aqe": {"flip": True, "aqe_k": 2}}  # evaluation settings


def summary(metrics: dict) -> dict:
    return {key: round(metrics[key], 4) for key in ("mAP", "rank1", "mINP")}


def train_and_evaluate(rank: int, world_size: int, shards: str, cores: int, overrides: list[str], extra: dict) -> dict:
    torch.set_num_threads(max(1, cores // world_size))
    cfg = run_config(Path(shards), world_size, cores, overrides)
    device = torch.device("cpu")
    engine = Engine(cfg, ShardDataset.open(shards), device)
    started = time.perf_counter()
    records = [outcome.record for outcome in engine.run()]
    result = {
        "before": summary(records[-1].before_training), "after": summary(records[-1].evaluation),
        "images_per_s": round(sum(r.images_per_s for r in records) / len(records), 1),
        "wall_s": round(time.perf_counter() - started, 1), "test_time": {},
    }  # fmt: skip
    for name, changes in extra.items():
        evaluation = cfg.evaluation.model_copy(update=changes)
        metrics = evaluate_model(engine.network, engine.dataset, cfg.input, engine.partition, device, evaluation)
        result["test_time"][name] = summary(metrics.metrics.summary())
    return result


def plain_loop(shards: Path, cores: int, epochs: int, overrides: list[str]) -> dict:
    loop = PlainLoop(run_config(shards, 1, cores, overrides), cores)
    device = torch.device("cpu")

    def evaluate() -> dict:
        return summary(evaluate_model(loop.embedder(), loop.dataset, loop.cfg.input, Partition(), device).metrics.summary())

    before, started = evaluate(), time.perf_counter()
    for _ in range(epochs * loop.steps_per_epoch):
        loop.step()
    images_per_s = epochs * loop.steps_per_epoch * 64 / (time.perf_counter() - started)
    return {"before": before, "after": evaluate(), "images_per_s": round(images_per_s, 1),
            "wall_s": round(time.perf_counter() - started, 1), "test_time": {}}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=300, help="half train, half test")
    parser.add_argument("--camera-strength", type=float, default=1.6)
    parser.add_argument("--seed", type=int, default=0, help="of the synthetic set: another seed is another set")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", nargs="+", default=["plain", *VARIANTS], choices=["plain", *VARIANTS])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="on every variant, last")
    args = parser.parse_args()
    common = [f"train.epochs={args.epochs}", "train.eval_every=0"]
    with tempfile.TemporaryDirectory() as scratch:
        shards = synthetic_shards(Path(scratch), args.identities, args.camera_strength, args.seed)
        dataset = ShardDataset.open(shards)
        described = {"train_images": dataset.split("train").samples, "train_identities": dataset.num_classes,
                     "query": dataset.split("query").samples, "gallery": dataset.split("gallery").samples,
                "seed": args.seed, "camera_strength": args.camera_strength}  # fmt: skip
        for variant in args.variants:
            if variant == "plain":
                settings = [*common, *args.set]
                result = plain_loop(shards, args.cores, args.epochs, settings)
                settings = ["plain PyTorch loop: Adam 3.5e-4 at a constant rate, no weight decay", *settings]
            else:
                settings = [*common, *VARIANTS[variant], *args.set]
                extra = TEST_TIME if variant in ("default", "combined", "recipe") else {}
                result = on_engines(2, train_and_evaluate, str(shards), args.cores, settings, extra)[0]
            line = {"variant": variant, **result, "epochs": args.epochs, "settings": settings, "data": described}
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
