"""`reid data verify` at scale: seconds to check a pack, against hashing its files.

    python benchmarks/verify.py --identities 50000

Synthesises N identities of K tiny JPEGs (``scale.py``'s CSV tree; a gallery and queries on top)
and packs them, then times, in this order and with the files in the page cache:

- ``sha256_s``: the baseline, every file of the pack (tars, indexes, tables) hashed by the same
  thread pool, and nothing else;
- ``verify_s``: ``verify_shards`` on the pack as it was written (each shard's tar, index and table
  checked against their recorded sha256);
- ``rebuild_s``: ``verify_shards`` on the same pack with those index and table digests taken out of
  the manifest, as in a pack made before them: every tar's samples are counted and its index and
  table rebuilt from it.

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.scale import pack, synthesise
from reid_platform.data.manifest import MANIFEST, Manifest, files_sha256
from reid_platform.data.pack import verify_shards


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def without_sidecar_digests(manifest: str) -> str:
    tree = json.loads(manifest)
    for split in tree["splits"].values():
        for shard in split["shards"]:
            shard["index_sha256"] = shard["table_sha256"] = None
    return json.dumps(tree)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=50_000)
    parser.add_argument("--images-per-identity", type=int, default=2)
    parser.add_argument("--gallery", type=int, default=10_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root, shards = Path(scratch) / "raw", Path(scratch) / "shards"
        synthesise(root, args.identities, args.images_per_identity, args.gallery, args.gallery // 20, (64, 32))
        samples = pack(root, shards)
        listed = [shard for split in Manifest.read(shards).splits.values() for shard in split.shards]
        files = [shards / name for shard in listed for name in (shard.file, shard.index, shard.table)]
        sha256_s, _ = timed(files_sha256, files)
        verify_s, check = timed(verify_shards, shards)
        manifest = shards / MANIFEST
        manifest.write_text(without_sidecar_digests(manifest.read_text()))
        rebuild_s, rebuilt = timed(verify_shards, shards)
    print(json.dumps({
        "samples": sum(samples.values()), "shards": len(listed), "files": len(files),
        "tar_bytes": sum(shard.bytes for shard in listed),
        "sha256_s": round(sha256_s, 2), "verify_s": round(verify_s, 2), "rebuild_s": round(rebuild_s, 2),
        "verify_over_sha256": round(verify_s / sha256_s, 2), "rebuild_over_sha256": round(rebuild_s / sha256_s, 2),
        "problems": check.problems + rebuilt.problems,
    }))  # fmt: skip


if __name__ == "__main__":
    main()
