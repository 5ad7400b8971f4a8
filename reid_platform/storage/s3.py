"""Objects in an S3-compatible store (AWS, MinIO, Ceph RGW, R2, GCS's interoperability endpoint)
through boto3, with every failure turned into one line naming the object.

Credentials come from the AWS chain only (environment, shared profile, instance or pod role): none
is ever passed in, stored or printed here. ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) points
at an S3-compatible store; DALI's and pyarrow's clients read the same variables. Throttling (503
SlowDown) and dropped connections are retried with backoff by botocore's standard retry mode
(``AWS_MAX_ATTEMPTS``, default 5: about 15 s at most); a refused credential, a missing bucket or
object is not retried at all.
"""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from reid_platform.errors import ReidError
from reid_platform.redaction import first_line
from reid_platform.storage.location import S3Uri

# parts of a multipart upload: large enough for few requests, small enough to send in parallel
PART_BYTES = 16 << 20
PARALLEL_PARTS = 8
READ_BLOCK = 1 << 20
_DEFAULT_ATTEMPTS = 5
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken", "403"}


class StoreError(ReidError, RuntimeError):
    """The object store refused or failed a request: names the URI, never a credential."""


class StoreUnavailable(StoreError):
    """The object store could not be reached, or kept failing through the retries."""

    transient = True


_clients: dict[tuple, object] = {}
# a client is made again when one of these changes (a test, a rotated key in the environment)
_CLIENT_ENVIRONMENT = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_MAX_ATTEMPTS")
_clients_lock = threading.Lock()


def use_endpoint(url: str | None) -> None:
    """Point this process (and the processes it starts: DALI's and pyarrow's clients, Ray workers on
    this node) at ``url`` (``data.s3_endpoint``); None leaves AWS_ENDPOINT_URL as it is."""
    if url:  # both names: an S3-only endpoint in the environment would otherwise win over the config
        os.environ["AWS_ENDPOINT_URL"] = os.environ["AWS_ENDPOINT_URL_S3"] = url


def endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def client():
    """This process's S3 client (one per process: a forked DataLoader worker makes its own)."""
    import boto3
    from botocore.config import Config

    key = (os.getpid(), endpoint(), hash(tuple(os.environ.get(name) for name in _CLIENT_ENVIRONMENT)))
    with _clients_lock:
        if key not in _clients:
            attempts = int(os.environ.get("AWS_MAX_ATTEMPTS", _DEFAULT_ATTEMPTS))
            config = Config(
                retries={"mode": "standard", "max_attempts": attempts},
                connect_timeout=5,
                read_timeout=60,
                # the most requests this process makes at once: parallel uploads of parallel parts
                max_pool_connections=PARALLEL_PARTS * PARALLEL_PARTS,
                # boto3's default CRC32 headers on every upload are refused by GCS's S3 endpoint and
                # some MinIO and Ceph versions; the ETag check (``upload_file``) proves the bytes instead
                request_checksum_calculation="when_required",
                response_checksum_validation="when_required",
            )
            _clients[key] = boto3.session.Session().client("s3", endpoint_url=endpoint(), config=config)
        return _clients[key]


def arrow_filesystem():
    """A ``pyarrow.fs.S3FileSystem`` configured as ``client()`` is, for what takes pyarrow's file
    systems (Ray Train's checkpoints): the same endpoint, region and retries. Credentials stay with
    the default chain: pyarrow pickles none it was not given, so each Ray process finds its own."""
    import pyarrow.fs

    return pyarrow.fs.S3FileSystem(
        endpoint_override=endpoint(),
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
        retry_strategy=pyarrow.fs.AwsStandardS3RetryStrategy(max_attempts=int(os.environ.get("AWS_MAX_ATTEMPTS", _DEFAULT_ATTEMPTS))),
    )


def check_bucket(uri: S3Uri) -> None:
    """That ``uri``'s bucket exists and these credentials reach it (one HEAD), as one line if not."""
    _call(uri, "checking its bucket", "head_bucket", Bucket=uri.bucket)


def _failure(uri: S3Uri, action: str, error: Exception) -> StoreError:
    """One line for what went wrong with ``action`` on ``uri``."""
    from botocore.exceptions import ClientError, NoCredentialsError

    where = f"{uri}: {action}"
    if isinstance(error, NoCredentialsError):
        return StoreError(
            f"{where}: no AWS credentials found (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
        )
    if isinstance(error, ClientError):
        details = error.response.get("Error", {})
        code = str(details.get("Code", ""))
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code == "NoSuchBucket" or (code in ("404", "NotFound") and not _bucket_exists(uri.bucket)):
            return StoreError(f"{where}: bucket {uri.bucket!r} does not exist{_at()}")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StoreError(f"{where}: no such object{_at()}")
        if code in _CREDENTIAL_CODES:
            return StoreError(f"{where}: the store refused the credentials ({code}){_at()}; check the AWS credentials in use")
        if status and status >= 500:
            return StoreUnavailable(f"{where}: the store kept failing ({code or status}) through the retries{_at()}")
        return StoreError(f"{where}: {code or status}: {first_line(str(details.get('Message', error)), 200)}")
    return StoreUnavailable(f"{where}: cannot reach the object store{_at()}: {first_line(str(error), 200)}")


def _at() -> str:
    return f" at {endpoint()}" if endpoint() else ""


def _bucket_exists(bucket: str) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        client().head_bucket(Bucket=bucket)
    except ClientError as error:
        return error.response.get("Error", {}).get("Code") not in ("404", "NoSuchBucket", "NotFound")
    except BotoCoreError:  # unreachable now: the first request's error is the one to report
        return True
    return True


def _call(uri: S3Uri, action: str, method: str, **arguments):
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return getattr(client(), method)(**arguments)
    except (ClientError, BotoCoreError) as error:
        raise _failure(uri, action, error) from None


def head(uri: S3Uri) -> tuple[int, str] | None:
    """The object's size and ETag, or None when there is no such object (a missing bucket, refused
    credentials or a store out of reach are errors)."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        answer = client().head_object(Bucket=uri.bucket, Key=uri.key)
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound") and _bucket_exists(uri.bucket):
            return None
        raise _failure(uri, "reading its size", error) from None
    except BotoCoreError as error:
        raise _failure(uri, "reading its size", error) from None
    return answer["ContentLength"], answer["ETag"].strip('"')


def size(uri: S3Uri) -> int | None:
    """The object's size, or None when there is no such object."""
    found = head(uri)
    return None if found is None else found[0]


def sizes(prefix: S3Uri) -> dict[str, int]:
    """Every object under ``prefix`` (a folder), by its key relative to it, with its size; the empty
    objects that consoles and pyarrow make to show a folder (keys ending in '/') are no files."""
    from botocore.exceptions import BotoCoreError, ClientError

    base = f"{prefix.key}/" if prefix.key else ""
    found = {}
    try:  # the requests are made while the pages are read
        for page in client().get_paginator("list_objects_v2").paginate(Bucket=prefix.bucket, Prefix=base):
            for item in page.get("Contents", []):
                if not item["Key"].endswith("/"):
                    found[item["Key"][len(base) :]] = item["Size"]
    except (ClientError, BotoCoreError) as error:
        raise _failure(prefix, "listing", error) from None
    return found


# A connection that drops while a body is read: botocore retries requests, not the reading of their
# answers, so these are retried here, from the first byte not yet received.
_BODY_ATTEMPTS = 5


def _body_errors() -> tuple[type[Exception], ...]:
    from botocore.exceptions import IncompleteReadError, ReadTimeoutError, ResponseStreamingError
    from urllib3.exceptions import ProtocolError

    return IncompleteReadError, ReadTimeoutError, ResponseStreamingError, ProtocolError


def stream(uri: S3Uri, block: int = READ_BLOCK, start: int = 0, length: int | None = None) -> Iterator[bytes]:
    """The object's bytes (or ``length`` of them from ``start``) in blocks, from one GET; a
    connection that drops in the middle is resumed with a GET of the rest."""
    from botocore.exceptions import BotoCoreError, ClientError

    end = None if length is None else start + length
    received, failures = start, 0
    while end is None or received < end:
        arguments = {"Bucket": uri.bucket, "Key": uri.key}
        if received or end is not None:
            arguments["Range"] = f"bytes={received}-{'' if end is None else end - 1}"
        try:
            for chunk in client().get_object(**arguments)["Body"].iter_chunks(block):
                received += len(chunk)
                yield chunk
            return
        except _body_errors() as error:
            failures += 1
            if failures >= _BODY_ATTEMPTS:
                raise StoreUnavailable(f"{uri}: reading: the connection kept dropping{_at()}: {first_line(str(error), 200)}") from None
        except (ClientError, BotoCoreError) as error:
            raise _failure(uri, "reading", error) from None


def read_bytes(uri: S3Uri, start: int = 0, length: int | None = None) -> bytes:
    """The object's bytes, or ``length`` of them from ``start`` (one ranged GET)."""
    if length == 0:
        return b""
    return b"".join(stream(uri, READ_BLOCK, start, length))


def write_bytes(uri: S3Uri, data: bytes) -> None:
    _call(uri, "writing", "put_object", Bucket=uri.bucket, Key=uri.key, Body=data)


def delete(uri: S3Uri) -> None:
    _call(uri, "deleting", "delete_object", Bucket=uri.bucket, Key=uri.key)


class RangedReader(io.RawIOBase):
    """A seekable, read-only file over an object: each read is one ranged GET of what it asks for
    (wrap it in ``io.BufferedReader`` for many small reads)."""

    def __init__(self, uri: S3Uri) -> None:
        self.uri, self.position = uri, 0
        known = size(uri)
        if known is None:
            raise StoreError(f"{uri}: no such object{_at()}")
        self.length = known

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.length}[whence]
        self.position = max(0, base + offset)
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        wanted = min(len(buffer), self.length - self.position)
        if wanted <= 0:
            return 0
        data = read_bytes(self.uri, self.position, wanted)
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def upload_file(path: Path, uri: S3Uri) -> None:
    """``path`` uploaded to ``uri``, in parallel parts above ``PART_BYTES``, then checked: the
    store's ETag must be the MD5 of what was sent (per part for a multipart upload), or the upload
    is done again once; an object never stands for a partial upload (S3 shows it only once complete)."""
    from boto3.exceptions import S3UploadFailedError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=PARALLEL_PARTS)
    expected = _etag(path, PART_BYTES)
    for attempt in range(2):
        try:
            client().upload_file(str(path), uri.bucket, uri.key, Config=transfer)
            etag = client().head_object(Bucket=uri.bucket, Key=uri.key)["ETag"].strip('"')
        except S3UploadFailedError as error:
            cause = error.__cause__ or error.__context__
            if isinstance(cause, ClientError | BotoCoreError):
                raise _failure(uri, f"uploading {path}", cause) from None
            raise StoreUnavailable(f"{uri}: uploading {path} failed{_at()}: {first_line(str(error), 200)}") from None
        except (ClientError, BotoCoreError) as error:
            raise _failure(uri, f"uploading {path}", error) from None
        # a store that encrypts with KMS returns an ETag that is no MD5: it cannot be compared
        if etag == expected or not _md5_shaped(etag):
            return
        if attempt:
            raise StoreError(f"{uri}: uploaded twice from {path}, and the store's digest ({etag}) is not the file's ({expected})")


def download_file(uri: S3Uri, path: Path) -> None:
    from boto3.exceptions import RetriesExceededError
    from boto3.s3.transfer import TransferConfig
    from botocore.exceptions import BotoCoreError, ClientError

    transfer = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=PARALLEL_PARTS)
    try:
        client().download_file(uri.bucket, uri.key, str(path), Config=transfer)
    except (ClientError, BotoCoreError) as error:
        raise _failure(uri, "downloading", error) from None
    except RetriesExceededError as error:
        raise StoreUnavailable(f"{uri}: downloading failed through the retries{_at()}: {first_line(str(error), 200)}") from None


def _etag(path: Path, part_bytes: int) -> str:
    """The ETag S3 gives ``path`` uploaded in parts of ``part_bytes``: its MD5 in one part, else the
    MD5 of the parts' MD5s and the part count."""
    with open(path, "rb") as handle:
        digests = [hashlib.md5(part, usedforsecurity=False).digest() for part in iter(lambda: handle.read(part_bytes), b"")]
    if os.path.getsize(path) < part_bytes:  # boto3 sends it in one request: at most one part read
        return (digests[0] if digests else hashlib.md5(b"", usedforsecurity=False).digest()).hex()
    return f"{hashlib.md5(b''.join(digests), usedforsecurity=False).hexdigest()}-{len(digests)}"


def _md5_shaped(etag: str) -> bool:
    digest, _, parts = etag.partition("-")
    return len(digest) == 32 and all(c in "0123456789abcdef" for c in digest) and (not parts or parts.isdigit())


def upload_many(pairs: list[tuple[Path, S3Uri]]) -> None:
    """Several files uploaded at once (each checked as ``upload_file`` does)."""
    with ThreadPoolExecutor(PARALLEL_PARTS) as pool:
        list(pool.map(lambda pair: upload_file(*pair), pairs))
