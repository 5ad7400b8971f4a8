"""`reid index build` and `reid index info`: a gallery embedded with Ray Data into a searchable index."""

from __future__ import annotations

import argparse
import json
import sys
import typing
from pathlib import Path

from reid_platform.cli.common import MODEL_HELP, add_tracking_uri, names_registered_model, positive_int
from reid_platform.data.config import DataConfig

_BAD_SAMPLE = DataConfig.model_fields["on_bad_sample"]


def _cmd_build(args: argparse.Namespace) -> int:
    from reid_platform.errors import ConfigError
    from reid_platform.search.gallery import build_gallery
    from reid_platform.search.model import resolve_model
    from reid_platform.storage.location import S3Uri, parse

    out = parse(args.out)
    if isinstance(out, S3Uri):
        raise ConfigError(f"--out {args.out}: the index is written to a local folder")
    model = resolve_model(args.model, args.tracking_uri, args.flip)
    result = build_gallery(
        model, args.data, out, split=args.split, kind=args.kind, shards=args.shards, batch_size=args.batch_size,
        actors=args.actors, on_bad_sample=args.on_bad_sample,
    )  # fmt: skip
    if result.skipped:
        named = "; ".join(f"{path}: {why}" for path, why in result.skipped)
        print(f"reid: warning: {len(result.skipped)} of {result.entries} gallery images skipped, not in the index "
              f"(they do not decode): {named}", file=sys.stderr)  # fmt: skip
    stamp = result.index.model
    version = f"{stamp.name} version {stamp.version}" if stamp.version else stamp.reference
    print(
        f"wrote {out}: {result.index.size} of {result.entries} gallery images ({result.embedded} embedded now, "
        f"the rest already), {result.index.kind} index, model {version}{', flip' if stamp.flip else ''} "
        f"({result.seconds:.1f} s)"
    )
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from reid_platform.search.index import GalleryIndex

    print(json.dumps(GalleryIndex.open(Path(args.index)).info(), indent=2, default=str))
    return 0


def add_commands(commands) -> None:
    index = commands.add_parser("index", help="gallery indexes: build one with Ray Data, describe one").add_subparsers(
        dest="index_command", required=True, metavar="COMMAND"
    )
    build = index.add_parser("build", help="embed a gallery on a Ray cluster (resumable) and index it")
    build.add_argument("--model", required=True, help=MODEL_HELP)
    build.add_argument("--data", required=True, help="packed shards (folder or s3:// prefix), a folder of images, or a "
                       "CSV of path[,camera_id[,timestamp]] rows")  # fmt: skip
    build.add_argument("--out", required=True, help="the index folder (its embeddings/ keeps the parts of a resumable build)")
    build.add_argument("--split", default="gallery", help="packed shards: the split to index, or 'all' (default gallery)")
    build.add_argument("--kind", choices=("auto", "flat", "ivfpq"), default="auto", help="index type (auto: by gallery size)")
    build.add_argument("--shards", type=positive_int, default=1, help="index shards searched in parallel")
    build.add_argument("--batch-size", type=positive_int, default=64, help="images per forward pass")
    build.add_argument("--actors", type=positive_int, help="embedding actors (default: one per GPU, else one per node)")
    build.add_argument(
        "--on-bad-sample", choices=typing.get_args(_BAD_SAMPLE.annotation), default=_BAD_SAMPLE.default,
        help="an image that does not decode: leave it out, named in a warning, or stop naming it "
        f"(default {_BAD_SAMPLE.default}, as data.on_bad_sample)",
    )  # fmt: skip
    build.add_argument("--flip", action=argparse.BooleanOptionalAction, default=None,
                       help="average each image with its mirror (default: as the registered model's training run "
                       "evaluated, evaluation.flip; no flip for a model directory)")  # fmt: skip
    add_tracking_uri(build, needed=names_registered_model)
    build.set_defaults(handler=_cmd_build)
    info = index.add_parser("info", help="an index's size, type, recall estimate and model version (JSON)")
    info.add_argument("index", help="the index folder")
    info.set_defaults(handler=_cmd_info)
