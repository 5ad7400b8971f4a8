"""`reid` command line: data, training, evaluation, jobs on a Ray cluster, MLflow and the model registry.

Expected failures (a bad config, a broken dataset, unusable evaluation input, an unreachable server)
print one line naming the file, key, sample or address and exit non-zero: each error type of
``reid_platform.errors`` carries its exit status (2 for a config or command line that cannot be used,
1 otherwise).
"""

from __future__ import annotations

import argparse
import sys

from reid_platform.cli import config, data, models, ops, train
from reid_platform.errors import ConfigError, ReidError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reid", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (train, config, data, models, ops):
        module.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before the heavy imports: --help stays instant

    from mlflow.exceptions import MlflowException
    from requests import RequestException

    from reid_platform.tracking.server import redact

    try:
        return args.handler(args)
    except ReidError as error:
        kind = "config error" if isinstance(error, ConfigError) else "error"
        print(f"reid: {kind}: {redact(str(error))}", file=sys.stderr)
        return error.exit_code
    except MlflowException as error:  # a refusal of the tracking server, e.g. an unknown model version
        print(f"reid: MLflow: {redact(error.message)}", file=sys.stderr)
        return 1
    except (ValueError, RuntimeError, RequestException, OSError) as error:  # what libraries raise for bad input
        print(f"reid: error: {redact(str(error))}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
