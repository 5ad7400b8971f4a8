"""The errors every stage raises for problems a user can fix, in one place.

Each names the file, key, sample or address at fault in its message. The CLI prints that message as
one line and exits with the error's ``exit_code``: 2 for a config or command line that cannot be
used (nothing was started), 1 for everything else. They derive from ``ValueError`` or
``RuntimeError`` as well, so that library callers can keep catching those.
"""

from __future__ import annotations


class ReidError(Exception):
    exit_code = 1
    # Whether starting a worker group again can get past it. Problems of the input (a sample that does
    # not decode, a config, a model file) come back in every attempt: they end a run at once, where a
    # lost worker or node restarts it.
    transient = False

    def __str__(self) -> str:
        # the message alone: libraries that pass an error on append their context to its args
        # (webdataset adds the stream and URL), which would print as a tuple
        return str(self.args[0]) if self.args else ""


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

    transient = True


class TrainingFailed(ReidError, RuntimeError):
    """A training run that ended in failure: its workers' last errors, summarised."""


class RunAlreadyFinished(ReidError):
    """A run was started again after it had trained all its epochs."""

    exit_code = 2
