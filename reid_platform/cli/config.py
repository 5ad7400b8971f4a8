"""`reid config show`: the config a command would run with, bases merged and defaults filled in."""

from __future__ import annotations

import argparse

from reid_platform.cli.common import add_run_config


def _cmd_show(args: argparse.Namespace) -> int:
    from reid_platform.config import load_config
    from reid_platform.redaction import redact

    print(redact(load_config(args.config, args.set).to_yaml()), end="")
    return 0


def add_commands(commands) -> None:
    config = commands.add_parser("config", help="run configs").add_subparsers(
        dest="config_command", required=True, metavar="COMMAND"
    )
    show = config.add_parser("show", help="print the resolved config (bases merged, overrides applied, defaults filled)")
    add_run_config(show, "YAML run config")
    show.set_defaults(handler=_cmd_show)
