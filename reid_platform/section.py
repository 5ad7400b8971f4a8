"""The base of every config section, and its validation into one clear error.

Each component owns the typed config it reads (``InputConfig`` in ``input/``, ``LossConfig`` in
``parallel/``, ...); ``reid_platform.config.RunConfig`` only composes them into the YAML sections.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, ValidationError

from reid_platform.errors import ConfigError
from reid_platform.redaction import redact

S = TypeVar("S", bound=BaseModel)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def describe(error: ValidationError, prefix: str = "") -> str:
    """Every problem of ``error`` as ``dotted.key: message (got value)``, joined by '; '."""
    problems = []
    for item in error.errors():
        where = ".".join(str(part) for part in (prefix, *item["loc"]) if part != "")
        value = item.get("input")
        # a whole section as the input (a check across its fields) would print the entire config
        got = "" if item["type"] == "missing" or isinstance(value, dict) else f" (got {redact(repr(value))})"
        message = item["msg"].removeprefix("Value error, ")
        # a check across sections has no key of its own: its message names the keys it compares
        problems.append(f"{where}: {message}{got}" if where else f"{message}{got}")
    return "; ".join(problems)


def validate(section: type[S], data: Any, where: str, prefix: str = "") -> S:
    """``section`` validated from ``data``; a ConfigError naming ``where`` and each bad key otherwise."""
    try:
        return section.model_validate(data)
    except ValidationError as error:
        raise ConfigError(f"{where}: invalid config: {describe(error, prefix)}") from None
