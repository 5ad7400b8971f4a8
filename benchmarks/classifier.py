"""One optimisation step of the model-parallel classifier: time and memory per worker.

For each configuration, W separate processes (gloo) each hold C/W class rows and run forward,
backward and the row-wise SGD step on random embeddings (128 per worker, d = 512). Peak RSS is the
largest worker's high-water mark above its own baseline (taken after torch and the process group are
up); ``planned_mb`` is ``reid plan``'s prediction of it (the classifier's part of the plan) and
``rss_over_plan`` the one over the other. A dense single-process baseline (full weight matrix, the
same loss, torch.optim.SGD) runs in the same invocation wherever it fits in memory.

    python benchmarks/classifier.py                       # the whole matrix
    python benchmarks/classifier.py --classes 1000000 --world-size 2 --rho 0.1

Prints one JSON object per configuration, one per line.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.parallel.config import LossConfig
from reid_platform.parallel.criterion import Criterion
from reid_platform.parallel.losses import default_chunk_size, margin_logits
from reid_platform.parallel.row_optim import RowSGD
from reid_platform.planning.capacity import classifier_memory
from reid_platform.planning.workload import Workload
from reid_platform.train.config import TrainConfig

SPEC = LossConfig(name="circle", scale=128.0, margin=0.25)
SGD_SETTINGS = (0.9, 5e-4)  # momentum, weight decay: the row optimizer's and the dense baseline's
MB = 1024**2
DENSE_LIMIT_BYTES = 18 * 1024**3  # leave room for the OS on a 24 GiB machine


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _timed_steps(step, steps: int) -> list[float]:
    step()  # warm-up: allocates the buffers that later steps reuse
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def _sharded_worker(rank, world_size, init_file, out_dir, classes, dim, batch, rho, steps, threads):
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    torch.manual_seed(rank)
    loss = SPEC.model_copy(update={"sample_rate": rho})

    def build(classes: int) -> Criterion:
        classifier = ShardedClassifier(classes, dim, rank, world_size, loss, RowSGD(0.1, *SGD_SETTINGS))
        return Criterion(classifier, loss)

    losses = []

    def step():
        x = torch.randn(batch, dim, requires_grad=True)
        result = criterion(x, torch.randint(0, criterion.classifier.num_classes, (batch,)))
        result.total.backward()
        criterion.step()
        losses.append(result.value.item())
        dist.barrier()

    criterion = build(1000)
    step()  # pages in the kernels' code and the collectives' buffers: part of the baseline
    del criterion
    baseline = peak_rss_bytes()
    criterion = build(classes)
    times = _timed_steps(step, steps)
    result = {"step_s": statistics.median(times), "peak_rss_mb": (peak_rss_bytes() - baseline) / MB, "loss": losses[-1]}
    (Path(out_dir) / f"{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


def run_sharded(classes: int, dim: int, batch: int, world_size: int, rho: float, steps: int) -> list[dict]:
    threads = max(1, (os.cpu_count() or 1) // world_size)
    with tempfile.TemporaryDirectory() as tmp:
        args = (world_size, os.path.join(tmp, "init"), tmp, classes, dim, batch, rho, steps, threads)
        mp.start_processes(_sharded_worker, args=args, nprocs=world_size, start_method="spawn")
        return [json.loads((Path(tmp) / f"{rank}.json").read_text()) for rank in range(world_size)]


def _dense_worker(_, out_dir, classes, dim, batch, steps):
    torch.set_num_threads(os.cpu_count() or 1)

    def step():
        x = torch.randn(batch, dim, requires_grad=True)
        labels = torch.randint(0, weight.shape[0], (batch,))
        cosine = F.normalize(x, dim=1) @ F.normalize(weight, dim=1).t()
        loss = F.cross_entropy(margin_logits(cosine, labels, SPEC), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    weight = torch.nn.Parameter(torch.randn(1000, dim) * 0.01)
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=SGD_SETTINGS[0], weight_decay=SGD_SETTINGS[1])
    step()  # the same warm-up as the sharded workers
    baseline = peak_rss_bytes()
    weight = torch.nn.Parameter(torch.randn(classes, dim) * 0.01)
    optimizer = torch.optim.SGD([weight], lr=0.1, momentum=SGD_SETTINGS[0], weight_decay=SGD_SETTINGS[1])
    times = _timed_steps(step, steps)
    result = {"step_s": statistics.median(times), "peak_rss_mb": (peak_rss_bytes() - baseline) / MB}
    (Path(out_dir) / "dense.json").write_text(json.dumps(result))


def dense_estimate_bytes(classes: int, dim: int, batch: int) -> int:
    """Weight, gradient, momentum, normalised copy; cosine, logits, softmax and their gradients."""
    return 4 * (4 * classes * dim + 5 * batch * classes)


@functools.cache  # the same baseline serves every rho
def run_dense(classes: int, dim: int, batch: int, steps: int) -> dict | None:
    if dense_estimate_bytes(classes, dim, batch) > DENSE_LIMIT_BYTES:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_dense_worker, args=(tmp, classes, dim, batch, steps), nprocs=1, start_method="spawn")
        return json.loads((Path(tmp) / "dense.json").read_text())


def planned_mb(classes: int, dim: int, batch: int, world_size: int, rho: float) -> float:
    """``reid plan``'s classifier peak for this configuration (``planning/capacity.py``; no backbone)."""
    train = TrainConfig(optimizer="sgd", momentum=SGD_SETTINGS[0], weight_decay=SGD_SETTINGS[1])
    workload = Workload(classes, world_size, batch, rho, precision="fp32", train=train)
    return classifier_memory(workload, dim).peak / MB


def benchmark(classes: int, world_size: int, rho: float, dim: int, batch: int, steps: int, dense: bool) -> dict:
    workers = run_sharded(classes, dim, batch, world_size, rho, steps)
    planned = planned_mb(classes, dim, batch, world_size, rho)
    baseline = run_dense(classes, dim, batch * world_size, steps) if dense else None
    return {
        "classes": classes,
        "dim": dim,
        "batch_per_worker": batch,
        "world_size": world_size,
        "rho": rho,
        "step_s": max(w["step_s"] for w in workers),
        "peak_rss_mb": round(max(w["peak_rss_mb"] for w in workers), 1),
        "planned_mb": round(planned, 1),
        "rss_over_plan": round(max(w["peak_rss_mb"] for w in workers) / planned, 3),
        "class_chunk": default_chunk_size(batch * world_size, dim),
        "dense_step_s": baseline["step_s"] if baseline else None,
        "dense_peak_rss_mb": round(baseline["peak_rss_mb"], 1) if baseline else None,
        "dense_note": None if baseline or not dense else (
            f"skipped: needs about {dense_estimate_bytes(classes, dim, batch * world_size) / 1024**3:.0f} GiB"
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="*", default=[100_000, 1_000_000, 2_000_000])
    parser.add_argument("--world-size", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--rho", type=float, nargs="*", default=[1.0, 0.1])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128, help="samples per worker")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-dense", action="store_true", help="skip the dense baseline")
    args = parser.parse_args()
    for classes in args.classes:
        for world_size in args.world_size:
            for rho in args.rho:
                result = benchmark(classes, world_size, rho, args.dim, args.batch, args.steps, not args.no_dense)
                print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
