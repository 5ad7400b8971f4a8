"""`reid` command line: data, training, evaluation, jobs on a Ray cluster, MLflow and the model registry.

Expected failures (a bad config, a broken dataset, unusable evaluation input, an unreachable server)
print one line naming the file, key, sample or address and exit non-zero: each error type of
``reid_platform.errors`` carries its exit status (2 for a config or command line that cannot be used,
1 otherwise). REID_DEBUG=1 shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys

from reid_platform.cli import config, data, models, ops, plan, train
from reid_platform.errors import ConfigError, ReidError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, config, data, models, ops, plan):
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help stays instant

    from mlflow.exceptions import MlflowException
    from requests import RequestException

    try:
        return args.handler(args)
    # what libraries raise for bad input, and refusals of the tracking server (an unknown model version)
    except (ReidError, MlflowException, ValueError, RuntimeError, RequestException, OSError) as error:
        if os.environ.get("REID_DEBUG"):
            raise
        return _report(error)


def _report(error: Exception) -> int:
    """One line on stderr for an expected failure; its exit status."""
    from mlflow.exceptions import MlflowException

    from reid_platform.tracking.server import redact

    if isinstance(error, ReidError):
        kind, status = ("config error" if isinstance(error, ConfigError) else "error"), error.exit_code
    else:
        kind, status = ("MLflow" if isinstance(error, MlflowException) else "error"), 1
    message = error.message if isinstance(error, MlflowException) else str(error)
    if isinstance(error, OSError) and error.filename and str(error.filename) not in message:
        message += f": {error.filename}"
    print(f"reid: {kind}: {redact(message)}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
