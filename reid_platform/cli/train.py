"""`reid train` and `reid eval`: one training run on this machine's Ray, one evaluation of a model."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from reid_platform.cli.common import (
    MODEL_HELP,
    add_run_config,
    add_section_flags,
    add_tracking_uri,
    format_table,
    load_model,
    names_registered_model,
    reachable,
    section_from_flags,
)
from reid_platform.evaluation.config import EvaluationConfig


def _cmd_train(args: argparse.Namespace) -> int:
    from reid_platform.config import load_config
    from reid_platform.redaction import redact

    cfg = load_config(args.config, args.set)  # validated before Ray or MLflow start
    base_dir = (args.base_dir or Path.cwd()).resolve()
    resolved = cfg.with_absolute_paths(base_dir)
    reachable(resolved.tracking.uri)  # before the launcher's imports (Ray, torch: seconds)
    from reid_platform.run.launcher import train

    outcome = train(cfg, Path(args.config), base_dir)
    print("\nResults (query vs gallery)")
    print(
        format_table(
            [
                ("rank-1", f"{outcome.rank1:.2%}"),
                ("rank-5", f"{outcome.rank5:.2%}"),
                ("mAP", f"{outcome.mAP:.2%}  (before training {outcome.mAP_before_training:.2%})"),
                ("mINP", f"{outcome.mINP:.2%}"),
                ("images/s", f"{outcome.images_per_s:.1f}  (training, last epoch, all workers)"),
                ("wall time", f"{outcome.wall_s:.1f} s"),
                ("MLflow run", outcome.mlflow_run_id),
                ("model", outcome.registered_model or "(not registered)"),
            ]
        )
    )
    print(f"\nResults written to {resolved.run.output_dir / 'results.json'}")
    print(f"MLflow: {redact(resolved.tracking.uri)} (browse a local store with: reid mlflow serve)")
    return 0


def _format_metric(key: str, value: float | int) -> str:
    if key.startswith("rank") or key in ("mAP", "mINP"):
        return f"{value:.2%}"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def _cmd_eval(args: argparse.Namespace) -> int:
    import tempfile

    import torch

    from reid_platform.data.manifest import ShardDataset
    from reid_platform.evaluation.distributed import evaluate_model
    from reid_platform.evaluation.plots import write_pictures
    from reid_platform.input.config import InputConfig
    from reid_platform.input.partition import Partition

    started = time.perf_counter()
    settings = section_from_flags(args, EvaluationConfig, "evaluation")
    dataset = ShardDataset.open(args.data)
    with tempfile.TemporaryDirectory() as scratch:
        model, preprocessing = load_model(args.model, args.tracking_uri, Path(scratch))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    partition = Partition.of_process_group(device)
    # the model's preprocessing, read with every core of this machine
    reader = InputConfig.model_validate({**preprocessing.model_dump(), "num_threads": os.cpu_count() or 1})
    evaluation = evaluate_model(model.to(device), dataset, reader, partition, device, settings, progress=True)
    summary = {**evaluation.metrics.summary(), "seconds": time.perf_counter() - started}
    print(format_table([(key, _format_metric(key, value)) for key, value in summary.items()]))
    out = Path(args.out)
    pictures = write_pictures(evaluation, dataset, out)
    report = {
        **summary,
        "cmc": evaluation.metrics.cmc.tolist(),
        "model": args.model,
        "data": str(args.data),
        "evaluation": settings.model_dump(mode="json"),
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'metrics.json'}, " + ", ".join(str(p) for p in pictures))
    return 0


def add_commands(commands) -> None:
    train = commands.add_parser("train", help="train a model from a YAML config on Ray")
    add_run_config(train, "YAML run config, e.g. configs/demo.yaml")
    train.add_argument(
        "--base-dir", type=Path, default=None,
        help="resolve the config's relative paths against this folder (default: the current one)",
    )
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a model on packed query/gallery shards")
    evaluate.add_argument("--model", required=True, help=MODEL_HELP)
    evaluate.add_argument("--data", required=True, help="shards folder (with manifest.json)")
    add_section_flags(evaluate, EvaluationConfig)  # the evaluation section of a run config, as flags
    evaluate.add_argument("--out", default="eval", help="folder for metrics.json, cmc.png and ranked_lists.png")
    add_tracking_uri(evaluate, needed=names_registered_model)
    evaluate.set_defaults(handler=_cmd_eval)
