"""The location type and the file operations on a real S3 API server: reads by range and stream,
uploads checked against their digest, and the store's faults (throttling, a connection cut in an
upload, a wrong key, a missing bucket, an endpoint that is down) each as one line naming the URI."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest

from reid_platform.errors import ConfigError
from reid_platform.section import Section, validate
from reid_platform.storage import files, s3
from reid_platform.storage.location import Location, S3Uri, parse
from tests.object_store import FaultProxy


class _Where(Section):
    place: Location


def test_locations_parse_in_one_place():
    assert parse("runs/ray") == Path("runs/ray")
    assert parse("file:///data/shards") == Path("/data/shards")
    uri = parse("s3://reid-data/market/shards/")
    assert uri == S3Uri("reid-data", "market/shards") and str(uri) == "s3://reid-data/market/shards"
    assert str(uri / "manifest.json") == "s3://reid-data/market/shards/manifest.json"
    assert (uri / "a.tar").name == "a.tar" and (uri / "a.tar").parent == uri
    assert str(parse("s3://reid-data")) == "s3://reid-data"
    section = validate(_Where, {"place": "s3://reid-data/x"}, "test")
    assert section.place == S3Uri("reid-data", "x") and section.model_dump(mode="json") == {"place": "s3://reid-data/x"}
    assert validate(_Where, {"place": "here"}, "test").model_dump(mode="json") == {"place": "here"}


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("gs://bucket/x", "storage.googleapis.com"),
        ("hdfs://namenode/x", "unknown storage scheme 'hdfs'"),
        ("s3://Bad_Bucket/x", "is not an S3 bucket name"),
        ("s3://AKIAEXAMPLE:supersecretvalue@reid-data/x", "credentials and endpoints do not go"),
    ],
)
def test_a_location_that_cannot_be_used_is_a_config_error(text, named):
    with pytest.raises(ConfigError, match=named) as caught:
        validate(_Where, {"place": text}, "config.yaml")
    assert "place" in str(caught.value) and "supersecretvalue" not in str(caught.value)


def test_objects_read_write_by_range_and_stream(s3_bucket, tmp_path):
    root = S3Uri(s3_bucket, "some/prefix")
    data = os.urandom(300_000)
    files.write_bytes(root / "blob.bin", data)
    files.write_text(root / "deeper/note.txt", "hello")
    assert files.read_bytes(root / "blob.bin") == data
    assert files.size(root / "blob.bin") == len(data) and files.size(root / "nothing") is None
    assert files.is_file(root / "deeper/note.txt") and not files.is_file(root / "deeper")
    assert files.sizes(root) == {"blob.bin": len(data), "deeper/note.txt": 5}
    with files.open_ranged(root / "blob.bin") as handle:
        handle.seek(123_456)
        assert handle.read(1000) == data[123_456:124_456]
        handle.seek(-10, os.SEEK_END)
        assert handle.read() == data[-10:]
    with files.open_stream(root / "blob.bin") as handle:
        assert handle.read() == data
    assert files.sha256(root / "blob.bin") == hashlib.sha256(data).hexdigest()
    local = tmp_path / "back.bin"
    files.download(root / "blob.bin", local)
    assert local.read_bytes() == data


def test_multipart_upload_is_checked_against_the_files_digest(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setattr(s3, "PART_BYTES", 5 << 20)  # S3's smallest part: a 12 MiB file goes in 3
    local = tmp_path / "big.bin"
    local.write_bytes(os.urandom(12 << 20))
    uri = S3Uri(s3_bucket, "big.bin")
    files.upload(local, uri)
    etag = s3.client().head_object(Bucket=s3_bucket, Key="big.bin")["ETag"].strip('"')
    assert etag.endswith("-3") and etag == s3._etag(local, 5 << 20)
    assert files.sha256(uri) == files.sha256(local)


def test_throttling_and_a_cut_upload_are_retried_and_lose_nothing(s3_server, s3_bucket, tmp_path, monkeypatch):
    proxy = FaultProxy(s3_server.url)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        uri = S3Uri(s3_bucket, "through/proxy.bin")
        data = os.urandom(1 << 20)
        proxy.slow_down(2)
        files.write_bytes(uri, data)
        assert proxy.injected["slow_down"] == 2
        local = tmp_path / "cut.bin"
        local.write_bytes(os.urandom(2 << 20))
        proxy.reset_upload(1, min_bytes=1 << 20)
        files.upload(local, uri)
        assert proxy.injected["reset"] == 1
        assert files.read_bytes(uri) == local.read_bytes()
    finally:
        proxy.close()


def test_a_wrong_key_and_a_missing_bucket_are_one_line_without_retries(s3_bucket, monkeypatch):
    missing = S3Uri("reid-no-such-bucket", "shards/manifest.json")
    started = time.monotonic()
    with pytest.raises(s3.StoreError, match="bucket 'reid-no-such-bucket' does not exist"):
        files.read_bytes(missing)
    with pytest.raises(s3.StoreError, match="bucket 'reid-no-such-bucket' does not exist"):
        files.size(missing)
    secret = "wrong-secret-0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    with pytest.raises(s3.StoreError, match=r"refused the credentials \(SignatureDoesNotMatch\)") as caught:
        files.read_bytes(S3Uri(s3_bucket, "x"))
    assert secret not in str(caught.value) and "\n" not in str(caught.value)
    assert time.monotonic() - started < 5, "refusals are not retried"


def test_a_store_that_is_down_is_named_within_seconds(monkeypatch, s3_bucket):
    from reid_platform.cluster.local import free_port

    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "2")
    started = time.monotonic()
    with pytest.raises(s3.StoreUnavailable, match="cannot reach the object store at http://127.0.0.1"):
        files.read_bytes(S3Uri(s3_bucket, "x"))
    assert time.monotonic() - started < 10


def test_the_aws_chains_secrets_are_redacted(monkeypatch):
    from reid_platform.redaction import redact

    values = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AWS_SESSION_TOKEN": "FwoGZXIvYXdzEXAMPLETOKEN"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    text = redact(f"failed with {' and '.join(values.values())} in s3://reid-data/x?X-Amz-Signature=abcdef0123")
    assert not any(value in text for value in values.values()) and "abcdef0123" not in text


def test_staged_copies_are_whole_made_once_per_node_and_refreshed_when_the_object_changes(s3_bucket, tmp_path, monkeypatch):
    monkeypatch.setenv(files.STAGE_DIR, str(tmp_path / "staged"))
    uris = [S3Uri(s3_bucket, f"shards/{n}.tar") for n in range(3)]
    for number, uri in enumerate(uris):
        files.write_bytes(uri, bytes([number]) * (1000 + number))
    local = tmp_path / "local.tar"
    local.write_bytes(b"here")
    paths = files.staged([*uris, local])
    assert paths[-1] == local and [p.read_bytes() for p in paths[:-1]] == [files.read_bytes(uri) for uri in uris]
    assert paths[0] == tmp_path / "staged" / s3_bucket / "shards/0.tar"
    made = [p.stat().st_mtime_ns for p in paths[:-1]]
    assert [p.stat().st_mtime_ns for p in files.staged(uris)] == made  # kept, not fetched again
    files.write_bytes(uris[1], b"changed")
    assert files.staged(uris)[1].read_bytes() == b"changed"
    files.write_bytes(uris[2], bytes([9]) * 1002)  # repacked, the same size: its ETag tells
    assert files.staged(uris)[2].read_bytes() == bytes([9]) * 1002
    assert not list((tmp_path / "staged").rglob("*.partial"))


def test_a_write_the_store_refuses_is_one_line(s3_server, s3_bucket, tmp_path, monkeypatch):
    proxy = FaultProxy(s3_server.url)
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        proxy.deny_writes()
        local = tmp_path / "f.bin"
        local.write_bytes(b"x" * 1000)
        for write in (lambda: files.upload(local, S3Uri(s3_bucket, "f.bin")), lambda: files.write_bytes(S3Uri(s3_bucket, "g"), b"x")):
            with pytest.raises(s3.StoreError, match=r"refused the credentials \(AccessDenied\)") as caught:
                write()
            assert "\n" not in str(caught.value) and str(caught.value).startswith(f"s3://{s3_bucket}/")
        assert proxy.injected["deny"] >= 2
    finally:
        proxy.close()


def test_folder_markers_are_not_files(s3_bucket):
    s3.client().put_object(Bucket=s3_bucket, Key="made/in/a/console/", Body=b"")
    files.write_text(S3Uri(s3_bucket, "made/in/a/console/x.txt"), "x")
    assert files.sizes(S3Uri(s3_bucket, "made")) == {"in/a/console/x.txt": 1}
