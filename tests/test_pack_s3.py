"""`reid data pack --out s3://...` against a real S3 API server: the objects are the local pack's
bytes, the manifest comes last, the store's faults are retried without loss, a pack that fails
leaves no manifest, and a store that cannot be used is one line naming it, before anything is packed."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

import pytest

from reid_platform.cli import main
from reid_platform.data import pack
from reid_platform.data.manifest import MANIFEST, Manifest, ShardEntry
from reid_platform.data.pack import PackOptions, pack_dataset
from reid_platform.storage import files, s3
from reid_platform.storage.location import S3Uri
from tests.object_store import FaultProxy

REID = str(Path(sys.executable).parent / "reid")
OPTIONS = PackOptions(samples_per_shard=40, workers=1)  # tiny_shards' options: the local pack to compare with


def _objects(out: S3Uri) -> dict[str, str]:
    return {key: files.sha256(out / key) for key in files.sizes(out)}


def _local_files(folder: Path) -> dict[str, str]:
    return {path.name: hashlib.sha256(path.read_bytes()).hexdigest() for path in folder.iterdir()}


def _bytes_in(folder: Path) -> int:
    total = 0
    for entry in os.scandir(folder):
        with suppress(FileNotFoundError):  # deleted once uploaded, meanwhile
            total += entry.stat().st_size
    return total


def _shards(folder: Path) -> list[ShardEntry]:
    return [shard for split in Manifest.read(folder).splits.values() for shard in split.shards]


@pytest.fixture
def proxy(s3_server, s3_bucket, monkeypatch):
    """A fault-injecting proxy that this process's store requests go through."""
    proxy = FaultProxy(s3_server.url)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
    yield proxy
    proxy.close()


def test_a_pack_into_the_store_is_the_local_pack_with_the_manifest_last(s3_bucket, tiny_market, tiny_shards, monkeypatch):
    uploaded, scratch_bytes = [], []

    def watched(path: Path, uri: S3Uri) -> None:  # the order of the uploads, and the scratch folder's bytes
        scratch_bytes.append(_bytes_in(path.parent))
        upload_file(path, uri)
        uploaded.append((path.parent, uri.name))

    upload_file = s3.upload_file
    monkeypatch.setattr(s3, "upload_file", watched)
    out = S3Uri(s3_bucket, "market/shards")
    pack_dataset([("market1501", tiny_market)], str(out), OPTIONS, progress=False)
    assert _objects(out) == _local_files(tiny_shards)
    assert uploaded[-1][1] == MANIFEST and len(uploaded) == len(_local_files(tiny_shards))
    # 6 shards of up to 40 samples: never more than UPLOADS_IN_FLIGHT + 1 of the largest on disk at once
    largest = max(sum((tiny_shards / name).stat().st_size for name in (s.file, s.index, s.table)) for s in _shards(tiny_shards))
    assert len(_shards(tiny_shards)) > pack.UPLOADS_IN_FLIGHT + 1
    assert max(scratch_bytes) <= (pack.UPLOADS_IN_FLIGHT + 1) * largest
    assert not uploaded[0][0].exists(), "the scratch folder is removed"


def test_throttling_and_a_cut_upload_during_a_pack_lose_nothing(proxy, s3_bucket, tiny_market, tiny_shards):
    proxy.slow_down(3)  # the listing before the pack, then the first uploads
    proxy.reset_upload(2, min_bytes=10_000)  # the first two tars' uploads, half-way through
    out = S3Uri(s3_bucket, "throttled")
    pack_dataset([("market1501", tiny_market)], out, OPTIONS, progress=False)
    assert proxy.injected == {"slow_down": 3, "reset": 2, "deny": 0}
    assert _objects(out) == _local_files(tiny_shards)


def test_a_pack_that_fails_part_way_leaves_no_manifest_and_runs_again(
    proxy, s3_bucket, tiny_market, tiny_shards, monkeypatch, capsys
):
    """Every upload from the fourth on (a shard's worth sent) is cut, with one retry: the pack fails
    naming the object, and the bucket holds no manifest (nor what was uploaded: the same command
    then runs again)."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    upload_file, sent = s3.upload_file, []

    def failing_after_a_shard(path: Path, uri: S3Uri) -> None:
        sent.append(uri)
        if len(sent) > 3:  # a tar, its index and its table
            proxy.reset_upload(10**6)
        upload_file(path, uri)

    monkeypatch.setattr(s3, "upload_file", failing_after_a_shard)
    out = S3Uri(s3_bucket, "broken")
    arguments = ["data", "pack", f"market1501={tiny_market}", "--out", str(out), "--workers", "1", "--samples-per-shard", "40"]
    assert main(arguments) == 1
    *progress, error = capsys.readouterr().err.splitlines()
    assert not any(line.startswith("reid:") for line in progress)
    assert error.startswith(f"reid: error: {out}/") and "uploading" in error, error
    assert proxy.injected["reset"] >= 2 and len(sent) > 3
    assert files.sizes(out) == {}
    proxy.reset_upload(0)
    monkeypatch.setattr(s3, "upload_file", upload_file)
    assert main(arguments) == 0
    assert _objects(out) == _local_files(tiny_shards)


@pytest.mark.parametrize(
    ("case", "status", "said"),
    [
        ("missing bucket", 1, "reid: error: s3://reid-no-such-bucket/x: listing: bucket 'reid-no-such-bucket' does not exist"),
        ("wrong secret", 1, "the store refused the credentials (SignatureDoesNotMatch)"),
        ("another scheme", 2, "reid: config error: gs://x/y: unknown storage scheme 'gs'"),
    ],
    ids=["missing-bucket", "wrong-secret", "gs-scheme"],
)
def test_a_store_that_cannot_be_used_is_one_line_before_packing(s3_server, s3_bucket, tiny_market, case, status, said):
    secret = "wrong-secret-0123456789abcdef"
    environment = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    environment.update(s3_server.environment())
    out = {"missing bucket": "s3://reid-no-such-bucket/x", "wrong secret": f"s3://{s3_bucket}/x", "another scheme": "gs://x/y"}[case]
    if case == "wrong secret":
        environment["AWS_SECRET_ACCESS_KEY"] = secret
    started = time.monotonic()
    done = subprocess.run(
        [REID, "data", "pack", f"market1501={tiny_market}", "--out", out, "--workers", "1"],
        env=environment, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (done.returncode, done.stdout) == (status, "")
    assert len(done.stderr.splitlines()) == 1 and said in done.stderr, done.stderr
    assert secret not in done.stderr and s3_server.secret not in done.stderr
    # refusals are not retried, and come before the packing (the imports alone take seconds on a busy machine)
    assert time.monotonic() - started < 30
    assert files.sizes(S3Uri(s3_bucket)) == {}
