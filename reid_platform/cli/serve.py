"""`reid serve INDEX_DIR`: the gallery-search service and its page, on Ray Serve."""

from __future__ import annotations

import argparse
import signal
import time
from dataclasses import replace
from pathlib import Path

from reid_platform.cli.common import MODEL_HELP, add_bind_address, add_tracking_uri, positive_int, reachable


def replica_range(text: str) -> tuple[int, int]:
    """(MIN, MAX) replicas from --autoscale MIN:MAX."""
    low, colon, high = text.partition(":")
    if not (colon and low.isdigit() and high.isdigit() and 1 <= int(low) <= int(high)):
        raise argparse.ArgumentTypeError(f"expected MIN:MAX replicas with 1 <= MIN <= MAX, got {text!r}")
    return int(low), int(high)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _cmd_serve(args: argparse.Namespace) -> int:
    from reid_platform.search.index import GalleryIndex
    from reid_platform.search.model import index_model_reference, load_index_model
    from reid_platform.tracking.config import TrackingConfig
    from reid_platform.tracking.registry import resolve_version

    index = GalleryIndex.open(args.index)
    built = index.model
    # by default the very version the index was built with, not whatever its alias points at today
    reference = args.model or index_model_reference(built)
    uri = None if Path(reference).is_dir() else reachable(args.tracking_uri or TrackingConfig().uri)
    if uri is not None:  # another registered version is refused before its weights are downloaded
        version = resolve_version(uri, reference)
        named = replace(built, reference=reference, name=version.name, version=str(version.version))
        built.check_matches(named, args.index)
    model = load_index_model(index, uri, reference)  # another version or embedding size: refused, exit 2
    del index  # each replica opens its own

    import ray
    from ray import serve

    from reid_platform.search.service import Scaling, search_app, start_service

    ray.init(logging_level="WARNING")  # the cluster at $RAY_ADDRESS, else one on this machine
    signal.signal(signal.SIGTERM, _interrupt)  # as Ctrl-C: `kill`, docker stop and systemd stop it cleanly
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        scaling = Scaling(*(args.autoscale or (args.replicas or 1,) * 2))
        app = search_app(Path(args.index).resolve(), model, scaling, args.max_batch_size, gpus)
        url = start_service(app, args.host, args.port)
        print(f"serving {args.index} ({built.describe()}) on {url} (the page; POST {url}search, "
              f"GET {url}healthz); Ctrl-C stops it", flush=True)  # fmt: skip
        while True:  # `app` holds the model's files in the object store while the service runs
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


def add_commands(commands) -> None:
    serve = commands.add_parser("serve", help="the gallery-search service and its page (Ray Serve)")
    serve.add_argument("index", metavar="INDEX_DIR", help="a gallery index (reid index build)")
    serve.add_argument("--model", help=f"{MODEL_HELP} (default: the version the index was built with)")
    add_bind_address(serve, port=8000)
    replicas = serve.add_mutually_exclusive_group()
    replicas.add_argument("--replicas", type=positive_int, help="a fixed number of replicas (default 1)")
    replicas.add_argument("--autoscale", type=replica_range, metavar="MIN:MAX", help="between MIN and MAX replicas, by load")
    serve.add_argument("--max-batch-size", type=positive_int, default=16,
                       help="queries embedded together in one forward pass (default 16)")  # fmt: skip
    # the tracking server is checked in the command, once the index says whether its model is registered
    add_tracking_uri(serve, needed=lambda args: False)
    serve.set_defaults(handler=_cmd_serve)
