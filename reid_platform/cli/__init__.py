"""`reid` command line: data, training, evaluation, jobs on a Ray cluster, MLflow and the model registry.

Expected failures (a bad config, a broken dataset, unusable evaluation input, an unreachable server)
print one line naming the file, key, sample or address and exit non-zero: each error type of
``reid_platform.errors`` carries its exit status (2 for a config or command line that cannot be used,
1 otherwise). That line, and whatever else a command prints that may quote a URI or a config, is
redacted (``reid_platform.redaction``). REID_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from reid_platform.cli import config, data, index, models, ops, plan, search, serve, train, tune
from reid_platform.cli.common import check_tracking_uri
from reid_platform.errors import ConfigError, ReidError
from reid_platform.redaction import redact, redact_log_records
from reid_platform.tracking.config import artifacts_through_the_server


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, tune, config, data, models, ops, plan, index, search, serve):
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help stays instant
    redact_log_records()
    artifacts_through_the_server()
    try:
        check_tracking_uri(args)  # before the command's slow imports
        return args.handler(args)
    except Exception as error:
        if os.environ.get("REID_DEBUG") or not _expected(error):
            raise
        return _report(error)


def _expected(error: Exception) -> bool:
    """What libraries raise for bad input (OSError includes requests' errors), and refusals of the
    tracking server (an unknown model version). MLflow is imported only to tell: it takes seconds."""
    if isinstance(error, (ReidError, ValueError, RuntimeError, OSError)):
        return True
    from mlflow.exceptions import MlflowException

    return isinstance(error, MlflowException)


def _report(error: Exception) -> int:
    """One line on stderr for an expected failure, redacted; its exit status."""
    kind, status, message = "error", 1, str(error)
    if isinstance(error, ReidError):
        kind, status = ("config error" if isinstance(error, ConfigError) else "error"), error.exit_code
    else:
        from mlflow.exceptions import MlflowException

        if isinstance(error, MlflowException):
            kind, message = "MLflow", error.message
    if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
        message += f": {error.filename}"
    print(f"reid: {kind}: {redact(message)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
