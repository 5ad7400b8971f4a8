"""`reid train` and `reid eval`: one training run on this machine's Ray, one evaluation of a model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from reid_platform.cli.common import MODEL_HELP, add_tracking_uri, format_table, load_model, tracking_uri


def _cmd_train(args: argparse.Namespace) -> int:
    from reid_platform.config import load_config
    from reid_platform.tracking.server import redact
    from reid_platform.train.launcher import train

    cfg = load_config(args.config, args.set)  # validated before Ray or MLflow start
    base_dir = (args.base_dir or Path.cwd()).resolve()
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
    resolved = cfg.with_absolute_paths(base_dir)
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

    from reid_platform.config import EvaluationConfig
    from reid_platform.evaluation.features import evaluate_model
    from reid_platform.evaluation.plots import write_pictures
    from reid_platform.evaluation.rerank import RerankOptions
    from reid_platform.input.partition import Partition

    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as scratch:
        model, input_cfg = load_model(args.model, tracking_uri(args), Path(scratch))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    partition = Partition(0, 1, 0 if cuda else None)
    settings = EvaluationConfig(metric=args.metric, protocol=args.protocol, memory_mb=args.memory_mb)
    rerank = RerankOptions(args.k1, args.k2, args.lambda_value) if args.rerank else None
    evaluation = evaluate_model(
        model.to(device), args.data, input_cfg, partition, device, settings, rerank, progress=True
    )
    summary = {**evaluation.metrics.summary(), "seconds": time.perf_counter() - started}
    print(format_table([(key, _format_metric(key, value)) for key, value in summary.items()]))
    out = Path(args.out)
    pictures = write_pictures(evaluation, args.data, out)
    report = {
        **summary,
        "cmc": evaluation.metrics.cmc.tolist(),
        "model": args.model,
        "data": str(args.data),
        "metric": args.metric,
        "protocol": args.protocol,
        "rerank": None if rerank is None else {"k1": rerank.k1, "k2": rerank.k2, "lambda": rerank.lambda_value},
    }
    (out / "metrics.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {out / 'metrics.json'}, " + ", ".join(str(p) for p in pictures))
    return 0


def add_commands(commands) -> None:
    train = commands.add_parser("train", help="train a model from a YAML config on Ray")
    train.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.add_argument(
        "--base-dir", type=Path, default=None,
        help="resolve the config's relative paths against this folder (default: the current one)",
    )
    train.set_defaults(handler=_cmd_train)

    evaluate = commands.add_parser("eval", help="evaluate a model on packed query/gallery shards")
    evaluate.add_argument("--model", required=True, help=MODEL_HELP)
    evaluate.add_argument("--data", required=True, help="shards folder (with manifest.json)")
    evaluate.add_argument("--metric", choices=["cosine", "euclidean"], default="cosine")
    evaluate.add_argument(
        "--protocol", choices=["market", "cuhk03", "no_camera"], default="market",
        help="market: also DukeMTMC-reID and MSMT17; cuhk03: old single-shot protocol; no_camera: no camera ids",
    )
    evaluate.add_argument("--memory-mb", type=float, default=512.0, help="budget for one block of ranking work")
    evaluate.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking (Zhong et al. 2017)")
    evaluate.add_argument("--k1", type=int, default=20, help="re-ranking: k-reciprocal neighbours")
    evaluate.add_argument("--k2", type=int, default=6, help="re-ranking: local query expansion")
    evaluate.add_argument("--lambda", dest="lambda_value", type=float, default=0.3, help="re-ranking: weight of the original distance")
    evaluate.add_argument("--out", default="eval", help="folder for metrics.json, cmc.png and ranked_lists.png")
    add_tracking_uri(evaluate)
    evaluate.set_defaults(handler=_cmd_eval)
