"""`reid models ...`, `reid embed`, `reid export onnx`: getting trained models back out."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from reid_platform.cli.common import (
    MODEL_HELP,
    add_bind_address,
    add_tracking_uri,
    format_columns,
    load_model,
    names_registered_model,
    positive_int,
)


def _cmd_list(args: argparse.Namespace) -> int:
    from reid_platform.tracking.registry import list_models

    rows = list_models(args.tracking_uri, args.name)
    if not rows:
        print("no registered models" + (f" named {args.name!r}" if args.name else ""))
        return 0
    table = [
        [
            row.name, row.version, ",".join(row.aliases) or "-",
            *(f"{row.metrics[key]:.2%}" if key in row.metrics else "-" for key in ("rank1", "mAP")),
            datetime.fromtimestamp(row.created_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M"),
            row.run_id,
        ]
        for row in rows
    ]  # fmt: skip
    print(format_columns(["NAME", "VERSION", "ALIASES", "RANK-1", "mAP", "CREATED (UTC)", "RUN"], table))
    return 0


def _cmd_pull(args: argparse.Namespace) -> int:
    from reid_platform.storage import files
    from reid_platform.storage.location import S3Uri, parse
    from reid_platform.tracking.registry import pull_model

    out = parse(args.out)
    if not isinstance(out, S3Uri):
        print(f"pulled {args.reference} into {pull_model(args.tracking_uri, args.reference, out)}")
        return 0
    # into a scratch folder first (MLflow downloads to local files), then the same tree into the bucket
    with tempfile.TemporaryDirectory() as scratch:
        directory = pull_model(args.tracking_uri, args.reference, Path(scratch))
        files.upload_folder(Path(scratch), out)
    print(f"pulled {args.reference} into {out / directory.relative_to(scratch).as_posix()}")
    return 0


def _cmd_promote(args: argparse.Namespace) -> int:
    from reid_platform.tracking.registry import promote

    promote(args.tracking_uri, args.name, args.version, args.alias)
    print(f"{args.name}@{args.alias} -> version {args.version}")
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    """``mlflow models serve`` of a registered model, once the tracking server and the model are there."""
    from reid_platform.redaction import redact
    from reid_platform.tracking.registry import check_servable, resolve_version

    uri = args.tracking_uri
    version = resolve_version(uri, args.reference)
    mlflow = Path(sys.executable).parent / "mlflow"
    model_uri = f"models:/{version.name}/{version.version}"
    check_servable(uri, version, args.reference)
    print(f"serving {args.reference} (version {version.version}) from {redact(uri)} on http://{args.host}:{args.port}/invocations", flush=True)
    environment = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,  # for the server that replaces this process
        # MLflow starts the scoring server as `uvicorn`, found on the PATH: this environment's first
        "PATH": str(mlflow.parent) + os.pathsep + os.environ.get("PATH", ""),
    }
    arguments = ["models", "serve", "-m", model_uri, "--env-manager", "local", "--host", args.host, "--port", str(args.port)]
    # the server replaces this process: Ctrl-C stops it
    os.execve(mlflow, [str(mlflow), *arguments], environment)


def _cmd_embed(args: argparse.Namespace) -> int:
    import torch

    from reid_platform.model.inference import embed_images, expand_image_paths, save_embeddings

    started = time.perf_counter()
    paths = expand_image_paths(args.images)
    with tempfile.TemporaryDirectory() as scratch:
        model, preprocessing = load_model(args.model, args.tracking_uri, Path(scratch))
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    embeddings = embed_images(model, preprocessing, paths, args.batch_size, device, args.flip)
    out = Path(args.out)
    save_embeddings(out, embeddings, paths)
    elapsed = time.perf_counter() - started
    print(f"wrote {out}: {embeddings.shape[0]} embeddings of dimension {embeddings.shape[1]} ({elapsed:.1f} s)")
    return 0


def _cmd_export_onnx(args: argparse.Namespace) -> int:
    from reid_platform.model.export import export_onnx

    with tempfile.TemporaryDirectory() as scratch:
        model, preprocessing = load_model(args.model, args.tracking_uri, Path(scratch))
    check = export_onnx(model, preprocessing, Path(args.out), args.tolerance, args.flip)
    print(
        f"wrote {args.out}: input images (N, 3, {preprocessing.height}, {preprocessing.width}) normalised with "
        f"mean {list(preprocessing.mean)} and std {list(preprocessing.std)}, output L2-normalised embeddings; onnxruntime "
        f"matches PyTorch to {check.max_abs_diff:.1e} (tolerance {check.tolerance:.0e}, batches {check.batch_sizes})"
    )
    return 0


def add_commands(commands) -> None:
    models = commands.add_parser("models", help="the MLflow model registry").add_subparsers(
        dest="models_command", required=True, metavar="COMMAND"
    )
    listing = models.add_parser("list", help="registered models: versions, aliases, metrics of their runs")
    listing.add_argument("name", nargs="?", help="only this model")
    add_tracking_uri(listing)
    listing.set_defaults(handler=_cmd_list)
    pull = models.add_parser("pull", help="download a registered model")
    pull.add_argument("reference", help="NAME@ALIAS, NAME/VERSION or models:/ URI")
    pull.add_argument("--out", required=True, help="a folder, or s3://bucket/prefix to upload the model to")
    add_tracking_uri(pull)
    pull.set_defaults(handler=_cmd_pull)
    promote = models.add_parser("promote", help="point an alias (e.g. champion) at a model version")
    promote.add_argument("name")
    promote.add_argument("version")
    promote.add_argument("--alias", required=True)
    add_tracking_uri(promote)
    promote.set_defaults(handler=_cmd_promote)

    serve = models.add_parser("serve", help="a REST endpoint (mlflow models serve) for a registered model")
    serve.add_argument("reference", help="NAME@ALIAS, NAME/VERSION or models:/ URI")
    add_bind_address(serve, port=5001)
    add_tracking_uri(serve)
    serve.set_defaults(handler=_cmd_serve)

    embed = commands.add_parser("embed", help="embeddings of image files (an .npz with embeddings and paths)")
    embed.add_argument("images", nargs="+", help="image files or folders of them")
    embed.add_argument("--model", required=True, help=MODEL_HELP)
    embed.add_argument("--out", required=True, help="output .npz")
    embed.add_argument("--batch-size", type=positive_int, default=64)
    embed.add_argument("--flip", action="store_true", help="average each image with its mirror (evaluation.flip)")
    add_tracking_uri(embed, needed=names_registered_model)
    embed.set_defaults(handler=_cmd_embed)

    export = commands.add_parser("export", help="export a model for serving").add_subparsers(
        dest="export_format", required=True, metavar="FORMAT"
    )
    onnx = export.add_parser("onnx", help="ONNX graph, checked against PyTorch with onnxruntime")
    onnx.add_argument("--model", required=True, help=MODEL_HELP)
    onnx.add_argument("--out", required=True, help="output .onnx file")
    onnx.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed difference from PyTorch")
    onnx.add_argument("--flip", action="store_true", help="average each image with its mirror inside the graph")
    add_tracking_uri(onnx, needed=names_registered_model)
    onnx.set_defaults(handler=_cmd_export_onnx)
