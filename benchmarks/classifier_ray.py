"""A short 2-worker Ray Train run with a million-class sharded classifier (synthetic embeddings).

Each worker holds half the class rows (Partial FC sampling, rho = 0.1 by default). The "backbone" is
a small DDP linear encoder over synthetic inputs: every class has a fixed random prototype (drawn
from a generator seeded by the class id, so no worker stores all of them), and a sample is its
class prototype plus noise. Labels come from a pool of classes spread over the whole range, so the
loss can fall within a few hundred steps while every step still ranks against all classes.

    python benchmarks/classifier_ray.py --classes 1000000 --steps 200

Prints one JSON object: first and last loss (means over 10 steps), steps/s, peak RSS per worker.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
from ray.train import ScalingConfig
from ray.train.torch import TorchTrainer

from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.parallel.config import LossConfig
from reid_platform.parallel.criterion import Criterion
from reid_platform.parallel.row_optim import RowSGD

INPUT_DIM = 64


def prototypes(labels: torch.Tensor) -> torch.Tensor:
    rows = [torch.randn(INPUT_DIM, generator=torch.Generator().manual_seed(int(label))) for label in labels]
    return torch.stack(rows)


def loop(config: dict) -> None:
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    torch.manual_seed(rank)
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    encoder = ray.train.torch.prepare_model(torch.nn.Linear(INPUT_DIM, config["dim"]))
    loss = LossConfig(name="circle", scale=64.0, margin=0.25, sample_rate=config["rho"])
    row_sgd = RowSGD(config["lr"], momentum=0.9, weight_decay=0.0)
    classifier = ShardedClassifier(config["classes"], config["dim"], rank, world_size, loss, row_sgd)
    criterion = Criterion(classifier, loss)
    optimizer = torch.optim.SGD(encoder.parameters(), lr=config["lr"], momentum=0.9)
    pool = torch.linspace(0, config["classes"] - 1, config["pool"]).long()
    losses, started = [], time.perf_counter()
    for step in range(config["steps"]):
        labels = pool[torch.randint(len(pool), (config["batch"],))]
        inputs = prototypes(labels) + 0.3 * torch.randn(config["batch"], INPUT_DIM)
        result = criterion(encoder(inputs), labels)
        optimizer.zero_grad()
        result.total.backward()
        optimizer.step()
        criterion.step()
        losses.append(result.value.item())
    elapsed = time.perf_counter() - started
    peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    metrics = {"losses": losses, "steps_per_s": len(losses) / elapsed, "peak_rss_mb": peak_mb}
    with tempfile.TemporaryDirectory() as directory:  # Ray Train V2 keeps metrics only with a checkpoint
        (Path(directory) / "metrics.json").write_text(json.dumps(metrics))
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--rho", type=float, default=0.1)
    parser.add_argument("--batch", type=int, default=128, help="per worker")
    parser.add_argument("--pool", type=int, default=2000, help="classes the labels are drawn from")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--storage", default="/tmp/reid-classifier-ray")
    args = parser.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    trainer = TorchTrainer(
        loop,
        train_loop_config=vars(args),
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False, resources_per_worker={"CPU": 1}),
        run_config=ray.train.RunConfig(name=f"classifier-{time.time_ns()}", storage_path=args.storage),
    )
    started = time.perf_counter()
    metrics = trainer.fit().metrics
    losses = metrics["losses"]
    print(json.dumps({
        "classes": args.classes, "dim": args.dim, "world_size": 2, "rho": args.rho, "steps": args.steps,
        "first_loss": sum(losses[:10]) / 10, "last_loss": sum(losses[-10:]) / 10,
        "steps_per_s": round(metrics["steps_per_s"], 2), "peak_rss_mb_rank0": round(metrics["peak_rss_mb"], 1),
        "wall_s": round(time.perf_counter() - started, 1),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
