"""`reid tune` against the default recipe on the recipe benchmark's synthetic set.

A search of 12 trials over the Circle scale and margin, the learning rate and where its decay starts,
with ASHA on mAP, each trial trained like the default recipe (resnet18 from scratch at 128x64, global
batch 64 on 2 workers, the same epochs); then the default recipe itself at the same per-trial budget.
Everything goes through Ray (Tune and Train) on this machine, tracked in a SQLite MLflow store.

    python benchmarks/tune.py --epochs 8 --trials 12            # the issue's search (hours on 2 cores)
    python benchmarks/tune.py --epochs 2 --trials 4 --identities 60 --seed 1   # a small one, another set

``--seed`` draws another synthetic set (identities, cameras, appearances), to check a setting found on
one set on another it was not tuned on. Prints one JSON line: the best trial's mAP and values, the
default's mAP, the search's wall time, the sum of its trials' training times (their MLflow runs,
from the run opened to its end) and their ratio, the search's overhead (target <= 1.15).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import yaml
from common import run_config, synthetic_shards
from mlflow.tracking import MlflowClient

from reid_platform.data.manifest import ShardDataset
from reid_platform.run.launcher import train
from reid_platform.tune.options import SearchOptions
from reid_platform.tune.search import search
from reid_platform.tune.space import load_space
from tests import DEMO_CONFIG


def space(epochs: int) -> dict:
    return {
        "loss.scale": {"loguniform": [16, 256]},
        "loss.margin": {"uniform": [0.15, 0.45]},
        "train.lr": {"loguniform": [1e-4, 2e-3]},
        "train.decay_start_epochs": {"randint": [0, epochs]},
    }


def trials_training_s(uri: str, parent_run_id: str) -> float:
    """The sum of the search's child runs' times: from a run's start to its end, or for a trial stopped
    early to its last evaluated epoch (its end time is when the search marked it, later; the part of
    the next epoch it trained before it was stopped is not counted: the overhead is overstated)."""
    client = MlflowClient(uri)
    experiment = client.get_run(parent_run_id).info.experiment_id
    children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    total_ms = 0
    for child in children:
        end = child.info.end_time
        if child.info.status == "KILLED":
            end = max(metric.timestamp for metric in client.get_metric_history(child.info.run_id, "mAP"))
        total_ms += end - child.info.start_time
    return total_ms / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=300, help="half train, half test")
    parser.add_argument("--camera-strength", type=float, default=1.6)
    parser.add_argument("--seed", type=int, default=0, help="the synthetic set's seed (another set: another seed)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--eval-every", type=int, default=2, help="the epochs ASHA compares trials at")
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, help="keep the shards, runs and MLflow store (mlflow.db) here (default: a temporary folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        work = args.work.resolve() if args.work else Path(scratch)
        shards = synthetic_shards(work / "data", args.identities, args.camera_strength, seed=args.seed)
        dataset = ShardDataset.open(shards)
        common = [
            f"train.epochs={args.epochs}", f"train.eval_every={args.eval_every}", f"run.storage_path={work / 'ray'}",
            f"run.output_dir={work / 'out'}", f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=tune-benchmark",
            "tracking.registered_model=null", "tracking.system_metrics=false",
        ]  # fmt: skip
        cfg = run_config(shards, 2, args.cores, [*common, "run.name=search"])
        (work / "space.yaml").write_text(yaml.safe_dump(space(args.epochs)))
        started = time.perf_counter()
        outcome = search(cfg, DEMO_CONFIG, load_space(work / "space.yaml", cfg), SearchOptions(trials=args.trials))
        search_wall_s = time.perf_counter() - started
        training_s = trials_training_s(cfg.tracking.uri, outcome.parent_run_id)
        default = train(run_config(shards, 2, args.cores, [*common, "run.name=default"]), DEMO_CONFIG)
        ray.shutdown()
        best = outcome.best
        line = {
            "best": {"trial": best.trial_id, "mAP": round(best.metrics["mAP"], 4), "rank1": round(best.metrics["rank1"], 4),
                     "values": best.values},
            "default": {"mAP": round(default.mAP, 4), "rank1": round(default.rank1, 4), "wall_s": round(default.wall_s, 1)},
            "search_wall_s": round(search_wall_s, 1), "trials_training_s": round(training_s, 1),
            "overhead": round(search_wall_s / training_s, 3),
            "trials": len(outcome.trials), "stopped_early": sum(row.status == "stopped early" for row in outcome.trials),
            "failed": sum(row.status == "failed" for row in outcome.trials),
            "epochs": args.epochs, "eval_every": args.eval_every, "seed": args.seed,
            "data": {"train_images": dataset.split("train").samples, "train_identities": dataset.num_classes,
                     "query": dataset.split("query").samples, "gallery": dataset.split("gallery").samples},
        }  # fmt: skip
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
