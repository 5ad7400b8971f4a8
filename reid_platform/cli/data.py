"""`reid data ...`: synthetic data, packing datasets into shards, checking shards."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from reid_platform.cli.common import image_size


def _cmd_synth(args: argparse.Namespace) -> int:
    from reid_platform.data.synth import write_synthetic_market1501

    counts = write_synthetic_market1501(
        Path(args.out), args.identities, args.cameras, args.seed, camera_strength=args.camera_strength
    )
    print(json.dumps(counts))
    return 0


def _parse_source(text: str) -> tuple[str, str]:
    name, separator, root = text.partition("=")
    if not separator or not name or not root:
        raise argparse.ArgumentTypeError(f"expected DATASET=ROOT (e.g. market1501=/data/Market-1501), got {text!r}")
    return name, root


def _cmd_pack(args: argparse.Namespace) -> int:
    from reid_platform.data.manifest import MANIFEST
    from reid_platform.data.pack import PackOptions, pack_dataset
    from reid_platform.storage.location import parse

    started = time.perf_counter()
    out = parse(args.out)  # a scheme other than s3:// is a config error, before anything is read
    options = PackOptions(  # refuses a flag out of range, naming it, before anything is read or written
        samples_per_shard=args.samples_per_shard,
        shard_mb=args.shard_mb,
        seed=args.seed,
        resize=image_size(args.resize, "--resize") if args.resize else None,
        jpeg_quality=args.jpeg_quality,
        workers=args.workers,
    )
    manifest = pack_dataset(args.sources, out, options)
    total = sum(split.samples for split in manifest.splits.values())
    elapsed = time.perf_counter() - started
    print(f"packed {total} images into {out} in {elapsed:.1f} s ({total / elapsed:.0f} images/s)")
    for name, split in manifest.splits.items():
        print(f"  {name:<8} {split.samples:>7} images  {split.identities:>6} ids  {len(split.shards)} shards")
    quarantined = manifest.quarantine
    if quarantined:
        print(f"quarantined {len(quarantined)} files (listed in {out / MANIFEST}):")
        for entry in quarantined[:10]:
            print(f"  {entry.source}: {entry.path}: {entry.reason}")
        if len(quarantined) > 10:
            print(f"  ... and {len(quarantined) - 10} more")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from reid_platform.data.manifest import ShardDataset
    from reid_platform.data.pack import verify_shards
    from reid_platform.errors import DatasetError

    check = verify_shards(args.shards, progress=True)
    for problem in check.problems:
        print(problem)
    if check.changed:
        from reid_platform.input.bad_samples import find_bad_samples

        try:  # the samples of the changed shards that no longer decode (when their sizes are unchanged)
            dataset = ShardDataset.open(args.shards)
        except DatasetError:
            dataset = None
        for split in dataset.splits if dataset else ():
            numbers = [number for name, number in check.changed if name == split]
            for bad in find_bad_samples(dataset, split, numbers) if numbers else []:
                print(bad)
    count = len(check.problems)
    summary = f"{count} problem{'s' * (count != 1)}" if count else "all match the manifest"
    print(f"{check.checked} shards checked: {summary}")
    return 1 if check.problems else 0


def add_commands(commands) -> None:
    data = commands.add_parser("data", help="make, pack and check datasets").add_subparsers(
        dest="data_command", required=True, metavar="COMMAND"
    )
    synth = data.add_parser("synth", help="write a synthetic dataset in the Market-1501 layout")
    synth.add_argument("--out", required=True)
    synth.add_argument("--identities", type=int, default=200)
    synth.add_argument("--cameras", type=int, default=6)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--camera-strength", type=float, default=1.0, help="how much cameras differ (above 1: harder)")
    synth.set_defaults(handler=_cmd_synth)
    pack = data.add_parser("pack", help="pack datasets into WebDataset shards with DALI indexes")
    pack.add_argument(
        "sources", nargs="+", type=_parse_source, metavar="DATASET=ROOT",
        help="market1501, dukemtmc, msmt17, cuhk03-np-detected, cuhk03-np-labeled or csv (ROOT is the CSV file); "
        "several are combined with disjoint ids",
    )
    pack.add_argument(
        "--out", required=True,
        help="new (or empty) folder, or s3://bucket/prefix (AWS credentials and AWS_ENDPOINT_URL from the "
        "environment), for the shards and manifest.json",
    )
    pack.add_argument("--samples-per-shard", type=int, default=1000)
    pack.add_argument("--shard-mb", type=float, default=256.0, help="largest shard size, in MiB")
    pack.add_argument("--resize", metavar="HxW", help="resize every image at pack time")
    pack.add_argument(
        "--jpeg-quality", type=int, default=95,
        help="quality of the images packing re-encodes (resized, PNG, not RGB); RGB JPEGs are kept as they are",
    )
    pack.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="image-checking processes")
    pack.add_argument("--seed", type=int, default=0, help="seed of the cross-shard shuffle")
    pack.set_defaults(handler=_cmd_pack)
    verify = data.add_parser("verify", help="check shards against their manifest (size, sha256, samples, index)")
    verify.add_argument("shards", help="shards folder (with manifest.json)")
    verify.set_defaults(handler=_cmd_verify)
