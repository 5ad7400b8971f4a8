"""The one location type: a local path or an ``s3://bucket/key`` URI, parsed in one place.

Every configured place (``data.shards``, ``run.storage_path``, ``reid data pack --out``, ...) is a
``Location``: ``parse`` turns text into a ``Path`` or an ``S3Uri``, and refuses any other scheme
naming the text. Both join with ``/`` and have a ``name``, so code that only builds locations does
not ask which kind it holds; ``files.py`` reads and writes either.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import BeforeValidator, GetCoreSchemaHandler, PlainSerializer
from pydantic_core import core_schema

from reid_platform.errors import ConfigError
from reid_platform.redaction import redact

S3_SCHEME = "s3://"
# S3's rules for new bucket names (3-63 lower-case letters, digits, dots and hyphens); a wrong name
# is a config error here rather than an InvalidBucketName from the server.
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_OTHER_STORES = {
    "gs": "use s3:// with AWS_ENDPOINT_URL=https://storage.googleapis.com (GCS's S3 interoperability endpoint and HMAC keys)",
}


class S3Uri:
    """An object (or a prefix of objects) in an S3-compatible store: ``s3://bucket/key``."""

    __slots__ = ("bucket", "key")

    def __init__(self, bucket: str, key: str = "") -> None:
        self.bucket, self.key = bucket, key.strip("/")

    def __truediv__(self, part: str | Path) -> S3Uri:
        return S3Uri(self.bucket, f"{self.key}/{part}" if self.key else str(part))

    @property
    def name(self) -> str:
        return self.key.rpartition("/")[2]

    @property
    def parent(self) -> S3Uri:
        return S3Uri(self.bucket, self.key.rpartition("/")[0])

    def __str__(self) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self.key}" if self.key else f"{S3_SCHEME}{self.bucket}"

    def __repr__(self) -> str:
        return f"S3Uri({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, S3Uri) and (self.bucket, self.key) == (other.bucket, other.key)

    def __hash__(self) -> int:
        return hash((self.bucket, self.key))

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.is_instance_schema(cls, serialization=core_schema.to_string_ser_schema())


def parse(value: str | Path | S3Uri) -> Path | S3Uri:
    """``value`` as a location: ``s3://bucket/key`` an ``S3Uri``, a plain or ``file://`` path a
    ``Path``; a ConfigError naming the text for any other scheme or a malformed bucket."""
    if isinstance(value, Path | S3Uri):
        return value
    text = str(value).strip()
    scheme = _SCHEME.match(text)
    if scheme is None:
        return Path(text)
    name = scheme.group(1).lower()
    rest = text[scheme.end() :]
    if name == "file":
        return Path(rest)
    if name != "s3":
        hint = _OTHER_STORES.get(name, "use a local path or s3://bucket/prefix")
        raise ConfigError(f"{redact(text)}: unknown storage scheme {name!r}; {hint}")
    bucket, _, key = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise ConfigError(
            f"{redact(text)}: credentials and endpoints do not go in an s3:// URI; they come from the AWS "
            "chain (environment, profile, instance role) and AWS_ENDPOINT_URL"
        )
    if not _BUCKET.match(bucket):
        raise ConfigError(f"{redact(text)}: {bucket!r} is not an S3 bucket name (3-63 lower-case letters, digits, '.' and '-')")
    return S3Uri(bucket, key)


def _parse_field(value: Any) -> Any:
    # pydantic reports a ValueError against the field's key; a ConfigError is one
    return parse(value) if isinstance(value, str | Path | S3Uri) else value


# A config field holding a location; it serialises back to the text it was parsed from.
Location = Annotated[Path | S3Uri, BeforeValidator(_parse_field), PlainSerializer(str, return_type=str)]
