"""Where a training step's time goes: the engine's epoch loop on 1 and 2 workers against a plain loop.

All variants train the demo's recipe (resnet18 at 128x64, BNNeck, Circle loss, a global batch of
64) on the same packed images with the same cores:

- ``plain``: what a user would write instead: one process, torchvision's ResNet, a dense Circle
  classifier (``torch.nn.functional.cross_entropy`` on the Circle logits), SGD, webdataset +
  torchvision transforms + a DataLoader worker;
- ``engine_w1``: ``reid_platform.train.engine.Engine`` in one process (torch threads = cores);
- ``engine_w2``: the engine on 2 gloo processes (one core each), the demo's layout, without Ray.

The engine variants evaluate the untrained model first, as every training run does.

Each prints one JSON line: images/s, its ratio to ``plain``, and the seconds per step split into
input wait, forward, classifier, backward (DDP's all-reduce and the classifier's backward included)
and optimizer, measured by the engine's ``PhaseTimer`` (rank 0 for W = 2).

    python benchmarks/train_step.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reid_platform.config import load_config  # noqa: E402
from reid_platform.data.manifest import ShardDataset  # noqa: E402
from reid_platform.data.pack import PackOptions, pack_dataset  # noqa: E402
from reid_platform.data.synth import write_synthetic_market1501  # noqa: E402
from reid_platform.input import train_loader  # noqa: E402
from reid_platform.input.partition import Partition  # noqa: E402
from reid_platform.parallel.losses import margin_logits  # noqa: E402
from reid_platform.train.engine import Engine  # noqa: E402
from reid_platform.train.step import PHASES, PhaseTimer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 64


def run_config(shards: Path, world_size: int, cores: int, overrides: list[str]):
    settings = [
        f"data.shards={shards}", f"scaling.num_workers={world_size}", f"scaling.cpus_per_worker={cores / world_size}",
        f"input.batch_size={GLOBAL_BATCH // world_size}", *overrides,
    ]  # fmt: skip
    return load_config(REPO / "configs/demo.yaml", settings)


def timed_steps(step, batches, warmup: int, steps: int, timer: PhaseTimer) -> float:
    """images/s over ``steps`` batches after ``warmup``; ``timer`` counts only the timed ones."""
    iterator = iter(batches)
    for _ in range(warmup):
        step(*next(iterator))
    timer.seconds.clear()
    started = time.perf_counter()
    for images, labels in timer.batches(_take(iterator, steps)):
        step(images, labels)
    return steps * GLOBAL_BATCH / (time.perf_counter() - started)


def _take(iterator, count: int):
    for _ in range(count):
        yield next(iterator)


def engine_worker(rank: int, world_size: int, init_file: str, out: str, shards: str, cores: int, args) -> None:
    if world_size > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=300))  # fmt: skip
    cfg = run_config(Path(shards), world_size, cores, args.set)
    torch.set_num_threads(max(1, cores // world_size))
    device = torch.device("cpu")
    engine = Engine(cfg, ShardDataset.open(shards), Partition(rank, world_size), device)
    engine.evaluate_untrained()  # as every run does first: it must leave nothing behind that slows the steps
    engine.timer = PhaseTimer(device)
    engine.model.train()
    loader = train_loader(engine.dataset, engine.partition, cfg.input, engine.input_seed())
    endless = (batch for _ in iter(int, 1) for batch in loader)
    rate = timed_steps(lambda images, labels: engine.step(images, labels, 1.0), endless, args.warmup, args.steps, engine.timer)
    torch.save({"images_per_s": rate, "seconds": dict(engine.timer.seconds)}, Path(out) / f"{rank}.pt")
    if world_size > 1:
        dist.destroy_process_group()


def run_engine(shards: Path, world_size: int, cores: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(
            engine_worker, args=(world_size, os.path.join(tmp, "init"), tmp, str(shards), cores, args),
            nprocs=world_size, start_method="spawn",
        )  # fmt: skip
        return torch.load(Path(tmp) / "0.pt")


def run_plain(shards: Path, cores: int, args) -> dict:
    """The loop a user would write, with the same model, loss, optimiser settings and transforms."""
    import torchvision
    import webdataset as wds
    from torch import nn

    from reid_platform.input.torch_loader import _Decode, train_transform

    cfg = run_config(shards, 1, cores, args.set)
    torch.set_num_threads(cores)
    torch.manual_seed(0)
    resnet = getattr(torchvision.models, cfg.model.arch)()
    resnet.layer4[0].conv1.stride = resnet.layer4[0].downsample[0].stride = (1, 1)
    trunk = nn.Sequential(*list(resnet.children())[:-2])
    neck = nn.BatchNorm1d(resnet.fc.in_features)
    neck.bias.requires_grad_(False)
    model = nn.Sequential(trunk, nn.AdaptiveAvgPool2d(1), nn.Flatten(), neck).train()
    dataset = ShardDataset.open(shards)
    classes = nn.Parameter(torch.randn(dataset.num_classes, resnet.fc.in_features) * 0.01)
    optimizer = torch.optim.SGD([*model.parameters(), classes], lr=cfg.train.lr, momentum=0.9, weight_decay=5e-4)
    images = (
        wds.WebDataset(list(dataset.split("train").tars), resampled=True, shardshuffle=False, nodesplitter=None)
        .shuffle(cfg.input.shuffle_buffer)
        .map(_Decode(train_transform(cfg.input)))
    )
    batches = torch.utils.data.DataLoader(images, batch_size=GLOBAL_BATCH, num_workers=1, drop_last=True)
    timer = PhaseTimer(torch.device("cpu"))

    def step(images: torch.Tensor, meta: torch.Tensor) -> None:
        labels = meta[:, 0]
        with timer.phase("forward"):
            embeddings = model(images)
        with timer.phase("classifier"):
            cosine = F.normalize(embeddings) @ F.normalize(classes).t()
            loss = F.cross_entropy(margin_logits(cosine, labels, cfg.loss), labels)
        with timer.phase("backward"):
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        with timer.phase("optimizer"):
            optimizer.step()

    rate = timed_steps(step, batches, args.warmup, args.steps, timer)
    return {"images_per_s": rate, "seconds": dict(timer.seconds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=200)
    parser.add_argument("--steps", type=int, default=20, help="timed steps of 64 images per variant")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--variants", nargs="+", default=["plain", "engine_w1", "engine_w2"])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override the demo config")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        raw, shards = Path(scratch) / "raw", Path(scratch) / "shards"
        write_synthetic_market1501(raw, args.identities, 6, seed=0, progress=False)
        pack_dataset([("market1501", raw)], shards, PackOptions(samples_per_shard=300), progress=False)
        results = {}
        for variant in args.variants:
            if variant == "plain":
                measured = run_plain(shards, args.cores, args)
            else:
                measured = run_engine(shards, int(variant.removeprefix("engine_w")), args.cores, args)
            results[variant] = measured
            per_step = {phase: round(measured["seconds"].get(phase, 0.0) / args.steps, 4) for phase in PHASES}
            line = {
                "variant": variant, "cores": args.cores, "global_batch": GLOBAL_BATCH, "steps": args.steps,
                "images_per_s": round(measured["images_per_s"], 1), "seconds_per_step": per_step,
            }  # fmt: skip
            if "plain" in results:
                line["vs_plain"] = round(measured["images_per_s"] / results["plain"]["images_per_s"], 2)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
