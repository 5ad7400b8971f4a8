"""The errors every stage raises for problems a user can fix, in one place.

Each names the file, key, sample or address at fault in its message. The CLI prints that message as
one line and exits with the error's ``exit_code``: 2 for a config or command line that cannot be
used (nothing was started), 1 for everything else. They derive from ``ValueError`` or
``RuntimeError`` as well, so that library callers can keep catching those.
"""

from __future__ import annotations


class ReidError(Exception):
    exit_code = 1


class ConfigError(ReidError, ValueError):
    """A config, an override or a command-line value that cannot be used."""

    exit_code = 2


class DatasetError(ReidError, ValueError):
    """A dataset tree, shard or manifest that cannot be read as it should."""


class EvaluationError(ReidError, ValueError):
    """Query and gallery features that cannot be evaluated."""


class ModelFormatError(ReidError, ValueError):
    """A model directory, pretrained weights or a checkpoint that does not fit what loads it."""


class TrackingUnavailable(ReidError, RuntimeError):
    """The tracking server cannot be reached (before a run), or stayed away too long (during one)."""


class RunAlreadyFinished(ReidError):
    """A run was started again after it had trained all its epochs."""

    exit_code = 2
