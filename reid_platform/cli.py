"""`reid` command line: data preparation, training, evaluation and the model registry.

Expected failures (a bad config, a broken dataset, unusable evaluation input) print one line naming
the file, key or sample and exit non-zero: 2 for usage and config errors, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from reid_platform.config import ConfigError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def _tracking_uri(args: argparse.Namespace) -> str:
    return args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", DEFAULT_TRACKING_URI)


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def _cmd_train(args: argparse.Namespace) -> int:
    from reid_platform.config import load_config
    from reid_platform.train.launcher import train

    cfg = load_config(args.config, args.set)  # validated before Ray or MLflow start
    outcome = train(cfg, Path(args.config))
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
    print(f"\nResults written to {cfg.with_absolute_paths(Path.cwd()).run.output_dir / 'results.json'}")
    print(f"Open the MLflow UI: mlflow ui --backend-store-uri {cfg.tracking.uri} --host 127.0.0.1 --port 5000")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    from reid_platform.data.synth import write_synthetic_market1501

    counts = write_synthetic_market1501(Path(args.out), args.identities, args.cameras, args.seed)
    print(json.dumps(counts))
    return 0


def _parse_source(text: str) -> tuple[str, str]:
    name, separator, root = text.partition("=")
    if not separator or not name or not root:
        raise argparse.ArgumentTypeError(f"expected DATASET=ROOT (e.g. market1501=/data/Market-1501), got {text!r}")
    return name, root


def _parse_size(text: str) -> tuple[int, int]:
    height, separator, width = text.lower().partition("x")
    if not (separator and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH (e.g. 256x128), got {text!r}")
    return int(height), int(width)


def _cmd_pack(args: argparse.Namespace) -> int:
    from reid_platform.data.pack import PackOptions, pack_dataset

    started = time.perf_counter()
    options = PackOptions(
        samples_per_shard=args.samples_per_shard,
        bytes_per_shard=int(args.shard_mb * 2**20),
        seed=args.seed,
        resize=args.resize,
        workers=args.workers,
    )
    manifest = pack_dataset(args.sources, args.out, options)
    total = sum(split["samples"] for split in manifest["splits"].values())
    elapsed = time.perf_counter() - started
    print(f"packed {total} images into {args.out} in {elapsed:.1f} s ({total / elapsed:.0f} images/s)")
    for name, split in manifest["splits"].items():
        print(f"  {name:<8} {split['samples']:>7} images  {split['identities']:>6} ids  {len(split['shards'])} shards")
    quarantined = manifest["quarantine"]
    if quarantined:
        print(f"quarantined {len(quarantined)} files (listed in {Path(args.out) / 'manifest.json'}):")
        for entry in quarantined[:10]:
            print(f"  {entry['source']}: {entry['path']}: {entry['reason']}")
        if len(quarantined) > 10:
            print(f"  ... and {len(quarantined) - 10} more")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from reid_platform.data.pack import verify_shards

    problems, checked = verify_shards(args.shards)
    for problem in problems:
        print(problem)
    print(f"{checked} shards checked: " + (f"{len(problems)} problems" if problems else "all match the manifest"))
    return 1 if problems else 0


def _load_model(reference: str, tracking_uri: str, scratch: Path):
    from reid_platform.model.artifact import load_model_dir
    from reid_platform.tracking.registry import pull_model

    directory = Path(reference)
    if not directory.is_dir():
        directory = pull_model(tracking_uri, reference, scratch)
    return load_model_dir(directory)


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
        model, input_cfg = _load_model(args.model, _tracking_uri(args), Path(scratch))
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


def _cmd_models_pull(args: argparse.Namespace) -> int:
    from reid_platform.tracking.registry import pull_model

    directory = pull_model(_tracking_uri(args), args.reference, Path(args.out))
    print(f"pulled {args.reference} into {directory}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    train = commands.add_parser("train", help="train a model from a YAML config on Ray")
    train.add_argument("config", help="YAML run config, e.g. configs/demo.yaml")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    train.set_defaults(handler=_cmd_train)

    data = commands.add_parser("data", help="make, pack and check datasets").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND"
    )
    synth = data.add_parser("synth", help="write a synthetic dataset in the Market-1501 layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--identities", type=int, default=200)
    synth.add_argument("--cameras", type=int, default=6)
    synth.add_argument("--seed", type=int, default=0)
    synth.set_defaults(handler=_cmd_synth)
    pack = data.add_parser("pack", help="pack datasets into WebDataset shards with DALI indexes")
    pack.add_argument(
        "sources", nargs="+", type=_parse_source, metavar="DATASET=ROOT",
        help="market1501, dukemtmc, msmt17, cuhk03-np-detected, cuhk03-np-labeled or csv (ROOT is the CSV file); "
        "several are combined with disjoint ids",
    )
    pack.add_argument("--out", required=True, help="new folder for shards and manifest.json")
    pack.add_argument("--samples-per-shard", type=int, default=1000)
    pack.add_argument("--shard-mb", type=float, default=256.0, help="largest shard size")
    pack.add_argument("--resize", type=_parse_size, metavar="HxW", help="resize every image at pack time")
    pack.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="image-checking processes")
    pack.add_argument("--seed", type=int, default=0, help="seed of the cross-shard shuffle")
    pack.set_defaults(handler=_cmd_pack)
    verify = data.add_parser("verify", help="check shards against their manifest (size, sha256, samples, index)")
    verify.add_argument("shards", help="shards folder (with manifest.json)")
    verify.set_defaults(handler=_cmd_verify)

    evaluate = commands.add_parser("eval", help="evaluate a model on packed query/gallery shards")
    evaluate.add_argument("--model", required=True, help="model directory, NAME@ALIAS or models:/ URI")
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
    evaluate.add_argument("--tracking-uri", help=f"MLflow URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    evaluate.set_defaults(handler=_cmd_eval)

    models = commands.add_parser("models", help="the MLflow model registry").add_subparsers(
        dest="models_command", required=True, metavar="COMMAND"
    )
    pull = models.add_parser("pull", help="download a registered model")
    pull.add_argument("reference", help="NAME@ALIAS, NAME/VERSION or models:/ URI")
    pull.add_argument("--out", required=True)
    pull.add_argument("--tracking-uri", help=f"MLflow URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    pull.set_defaults(handler=_cmd_models_pull)
    return parser


def main(argv: list[str] | None = None) -> int:
    from reid_platform.data.datasets import DatasetError
    from reid_platform.evaluation.metrics import EvaluationError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as error:
        print(f"reid: config error: {error}", file=sys.stderr)
        return 2
    except (DatasetError, EvaluationError, ValueError) as error:
        print(f"reid: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
