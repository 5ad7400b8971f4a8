"""`reid search INDEX_DIR query.jpg ...`: the gallery entries nearest to crops of a person."""

from __future__ import annotations

import argparse
import json
import math
import time
from datetime import UTC, datetime
from pathlib import Path

from reid_platform.cli.common import MODEL_HELP, add_tracking_uri, format_columns, positive_int
from reid_platform.errors import ConfigError


def instant(text: str, flag: str) -> float:
    """--after / --before: seconds since the epoch from a number or an ISO 8601 time (UTC unless zoned)."""
    from reid_platform.search.sources import seconds_since_epoch

    try:
        return seconds_since_epoch(text)
    except ValueError:
        raise ConfigError(f"{flag}: expected seconds since the epoch or an ISO 8601 time such as 2026-12-03T14:00 (got {text!r})") from None


def query_cameras(text: str | None, count: int) -> list[int] | None:
    """--exclude-camera: one camera for every query, or one per query separated by commas."""
    if text is None:
        return None
    parts = text.split(",")
    if not all(part.strip().lstrip("-").isdigit() for part in parts) or len(parts) not in (1, count):
        raise ConfigError(f"--exclude-camera: expected one camera id, or {count} (one per query) separated by commas (got {text!r})")
    return [int(part) for part in parts] * (count if len(parts) == 1 else 1)


def _model_reference(args: argparse.Namespace) -> str:
    """The model the queries are embedded with: --model, else the index's."""
    from reid_platform.search.index import ModelStamp, read_description
    from reid_platform.search.model import index_model_reference

    return args.model or index_model_reference(ModelStamp(**read_description(Path(args.index))["model"]))


def _needs_registry(args: argparse.Namespace) -> bool:
    return not Path(_model_reference(args)).is_dir()


def non_negative_int(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return int(text)


def _format_time(timestamp: float) -> str:
    return "-" if math.isnan(timestamp) else datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M:%S")


def _cmd_search(args: argparse.Namespace) -> int:
    import torch

    from reid_platform.evaluation.config import EvaluationConfig
    from reid_platform.model.inference import embed_images, expand_image_paths
    from reid_platform.search.index import GalleryIndex
    from reid_platform.search.model import load_files, load_index_model
    from reid_platform.search.ranked import search_ranked

    started = time.perf_counter()
    index = GalleryIndex.open(args.index)
    index.check_top_k(args.top_k)
    after = None if args.after is None else instant(args.after, "--after")
    before = None if args.before is None else instant(args.before, "--before")
    paths = expand_image_paths(args.queries)
    cameras = query_cameras(args.exclude_camera, len(paths))
    model, preprocessing = load_files(load_index_model(index, args.tracking_uri, args.model).files)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    queries = embed_images(model, preprocessing, paths, device=device, flip=index.model.flip)
    cfg = EvaluationConfig(rerank=args.rerank, aqe_k=args.query_expansion)
    results = search_ranked(index, queries, args.top_k, cfg, cameras, after, before, args.candidates)
    if args.json:
        print(json.dumps([
            {"query": str(path), "hits": [
                {**vars(hit), "timestamp": None if math.isnan(hit.timestamp) else hit.timestamp} for hit in hits
            ]} for path, hits in zip(paths, results)
        ], indent=2))  # fmt: skip
        return 0
    for path, hits in zip(paths, results):
        print(f"{path}: {len(hits)} of {index.size} gallery entries ({index.model.describe()}, {index.kind} index)")
        rows = [[str(rank), f"{hit.score:.4f}", str(hit.camera), _format_time(hit.timestamp), hit.path] for rank, hit in enumerate(hits, 1)]
        print(format_columns(["RANK", "SCORE", "CAMERA", "TIME (UTC)", "PATH"], rows))
    print(f"{len(paths)} queries in {time.perf_counter() - started:.1f} s")
    return 0


def add_commands(commands) -> None:
    search = commands.add_parser("search", help="the gallery entries of an index nearest to query crops")
    search.add_argument("index", help="an index folder (`reid index build`)")
    search.add_argument("queries", nargs="+", help="query images, or folders of them")
    search.add_argument("--top-k", type=positive_int, default=20, help="hits per query (default 20)")
    search.add_argument(
        "--exclude-camera", metavar="CAM[,CAM...]",
        help="leave out gallery entries of this camera: one id for all queries, or one per query",
    )  # fmt: skip
    search.add_argument("--after", metavar="T", help="only entries at or after T (epoch seconds or ISO 8601, UTC)")
    search.add_argument("--before", metavar="T", help="only entries at or before T")
    search.add_argument("--rerank", action="store_true", help="k-reciprocal re-ranking of each query's candidates")
    search.add_argument(
        "--query-expansion", type=non_negative_int, default=0, metavar="K",
        help="average query expansion with the K nearest entries, then search again (0: off)",
    )  # fmt: skip
    search.add_argument(
        "--candidates", type=positive_int, default=100,
        help="entries per query that re-ranking and query expansion work on (default 100)",
    )  # fmt: skip
    search.add_argument("--model", help=f"embed the queries with this model ({MODEL_HELP}); it must be the index's model")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    add_tracking_uri(search, needed=_needs_registry)
    search.set_defaults(handler=_cmd_search)
