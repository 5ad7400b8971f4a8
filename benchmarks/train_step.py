"""Where a training step's time goes: the engine's epoch loop on 1 and 2 workers against a plain loop.

All variants train the demo's recipe (resnet18 at 128x64, BNNeck, Circle loss, a global batch of
64) on the same packed images with the same cores:

- ``plain``: what a user would write instead (``common.PlainLoop``): one process, torchvision's
  ResNet, a dense Circle classifier, Adam, webdataset + torchvision transforms + a DataLoader worker;
- ``engine_w1``: ``reid_platform.train.engine.Engine`` in one process (torch threads = cores);
- ``engine_w2``: the engine on 2 gloo processes (one core each), the demo's layout, without Ray.

The engine variants evaluate the untrained model first, as every training run does. Each prints one
JSON line: images/s, its ratio to ``plain``, and the seconds per step split into input wait,
forward, classifier, backward (DDP's all-reduce and the classifier's backward included) and
optimizer, measured by ``PhaseTimer`` (rank 0 for W = 2).

    python benchmarks/train_step.py --steps 20
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from common import GLOBAL_BATCH, PlainLoop, on_engines, run_config, synthetic_shards

from reid_platform.data.manifest import ShardDataset
from reid_platform.input.backend import train_loader
from reid_platform.train.engine import Engine
from reid_platform.train.step import PHASES, PhaseTimer


def timed(step, warmup: int, steps: int, timer: PhaseTimer) -> float:
    """images/s over ``steps`` calls of ``step`` after ``warmup``; ``timer`` counts only the timed ones."""
    for _ in range(warmup):
        step()
    timer.seconds.clear()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * GLOBAL_BATCH / (time.perf_counter() - started)


def engine_steps(rank: int, world_size: int, shards: str, cores: int, args) -> dict:
    cfg = run_config(Path(shards), world_size, cores, args.set)
    torch.set_num_threads(max(1, cores // world_size))
    device = torch.device("cpu")
    engine = Engine(cfg, ShardDataset.open(shards), device)
    engine.evaluate_untrained()  # as every run does first: it must leave nothing behind that slows the steps
    engine.timer = PhaseTimer(device)
    engine.model.train()
    loader = train_loader(engine.dataset, engine.partition, cfg.input, engine.input_seed())
    batches = engine.timer.batches(batch for _ in iter(int, 1) for batch in loader)
    rate = timed(lambda: engine.step(*next(batches), 1.0), args.warmup, args.steps, engine.timer)
    return {"images_per_s": rate, "seconds": dict(engine.timer.seconds)}


def plain_steps(shards: Path, cores: int, args) -> dict:
    loop = PlainLoop(run_config(shards, 1, cores, args.set), cores)
    rate = timed(loop.step, args.warmup, args.steps, loop.timer)
    return {"images_per_s": rate, "seconds": dict(loop.timer.seconds)}


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
        shards = synthetic_shards(Path(scratch), args.identities)
        results = {}
        for variant in args.variants:
            if variant == "plain":
                measured = plain_steps(shards, args.cores, args)
            else:
                measured = on_engines(int(variant.removeprefix("engine_w")), engine_steps, str(shards), args.cores, args)[0]
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
