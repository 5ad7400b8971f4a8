"""Check one image file and turn it into the JPEG bytes a shard stores (runs in packing workers).

Kept free of torch and webdataset imports, so that worker processes start in a fraction of a second.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

from PIL import Image, UnidentifiedImageError

ACCEPTED_FORMATS = ("JPEG", "PNG")
IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG")  # how JPEG and PNG files begin


def prepare_image(path: Path, resize: tuple[int, int] | None = None, quality: int = 95) -> tuple[bytes | None, str]:
    """(JPEG bytes, "") for a good image, or (None, reason) for one to quarantine.

    Every image is fully decoded once, which is what catches truncated files. JPEGs in RGB are kept
    byte for byte; PNGs, other colour modes and resized images are re-encoded as JPEG, so every shard
    holds the one format the decoders are fastest at.
    """
    try:
        data = path.read_bytes()
    except OSError as error:
        return None, f"unreadable: {error.strerror or error}"
    if not data:
        return None, "empty file (0 bytes)"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in ACCEPTED_FORMATS:
                return None, f"unsupported format {image.format} (JPEG or PNG expected)"
            image.load()
            if resize is None and image.format == "JPEG" and image.mode == "RGB":
                return data, ""
            rgb = image.convert("RGB")
            if resize is not None:
                height, width = resize
                rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
            encoded = io.BytesIO()
            rgb.save(encoded, "JPEG", quality=quality)
            return encoded.getvalue(), ""
    except UnidentifiedImageError:
        return None, "not an image file"
    except Image.DecompressionBombError as error:
        return None, f"too large to decode safely: {error}"
    except (OSError, SyntaxError, ValueError) as error:
        return None, f"corrupt or truncated: {error}"


def prepare_job(job: tuple[Path, tuple[int, int] | None, int]) -> tuple[bytes | None, str]:
    return prepare_image(*job)


def encoded_bytes(value: bytes | str) -> bytes:
    """The file bytes of an image given as bytes or as base64 text (as a JSON request carries it)."""
    raw = value.encode() if isinstance(value, str) else bytes(value)
    if raw.startswith(IMAGE_MAGIC):
        return raw
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        return raw  # neither: the decoder says what it is


def decode_rgb(source: bytes | Path) -> tuple[Image.Image | None, str]:
    """(the decoded RGB image, "") or (None, why ``source``, bytes or a file, does not decode)."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as image:
            return image.convert("RGB"), ""
    except UnidentifiedImageError:
        return None, "not an image"
    except Image.DecompressionBombError:
        return None, "too large to decode safely"
    except (OSError, SyntaxError, ValueError) as error:
        return None, f"corrupt or truncated: {error}"


def decode_problem(data: bytes) -> str:
    """Why ``data`` does not decode as an image ("" when it does)."""
    return decode_rgb(data)[1]
