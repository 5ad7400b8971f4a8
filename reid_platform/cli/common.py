"""Small pieces several command groups share."""

from __future__ import annotations

import argparse
import typing
from pathlib import Path

from reid_platform.errors import ConfigError
from reid_platform.section import S, validate
from reid_platform.tracking.config import DEFAULT_TRACKING_URI, TrackingConfig

MODEL_HELP = "model directory, NAME@ALIAS, NAME/VERSION or models:/ URI"


def positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return int(text)


def image_size(text: str, flag: str) -> tuple[int, int]:
    """(height, width) from ``HxW``; a ConfigError naming ``flag`` otherwise."""
    height, separator, width = text.lower().partition("x")
    if not (separator and height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise ConfigError(f"{flag}: expected HEIGHTxWIDTH with positive sizes, e.g. 256x128 (got {text!r})")
    return int(height), int(width)


def add_run_config(parser: argparse.ArgumentParser, help_text: str, optional: bool = False) -> None:
    """CONFIG and its overrides, --set KEY=VALUE (repeatable), for every command that reads a run config."""
    parser.add_argument("config", nargs="?" if optional else None, help=help_text)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")


def add_bind_address(parser: argparse.ArgumentParser, port: int) -> None:
    """--host and --port of a server a command starts."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (0.0.0.0 exposes it)")
    parser.add_argument("--port", type=positive_int, default=port)


def add_section_flags(parser: argparse.ArgumentParser, section: type[S]) -> None:
    """One flag per field of a config section (``memory_mb`` -> ``--memory-mb``), typed, documented and
    defaulted as the field, so that a command line and a config file say the same things."""
    for name, field in section.model_fields.items():
        flag, annotation = "--" + name.replace("_", "-"), field.annotation
        options: dict = {"dest": name, "default": argparse.SUPPRESS}
        if annotation is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(annotation) is typing.Literal:
            options["choices"] = typing.get_args(annotation)
        else:
            options["type"] = annotation
        options["help"] = f"{field.description or ''} (default {field.default})".strip()
        parser.add_argument(flag, **options)


def section_from_flags(args: argparse.Namespace, section: type[S], name: str) -> S:
    """The section from the flags ``add_section_flags`` added (defaults for those not given)."""
    given = {key: getattr(args, key) for key in section.model_fields if hasattr(args, key)}
    return validate(section, given, "command line", prefix=name)


def add_tracking_uri(parser: argparse.ArgumentParser, needed: typing.Callable[[argparse.Namespace], bool] | None = None) -> None:
    """--tracking-uri for a command that talks to MLflow (when ``needed(args)``, by default always):
    ``main`` then checks the server before the command runs (``check_tracking_uri``)."""
    parser.add_argument("--tracking-uri", help=f"MLflow URI (default $MLFLOW_TRACKING_URI or {DEFAULT_TRACKING_URI})")
    parser.set_defaults(tracking_needed=needed or (lambda args: True))


def names_registered_model(args: argparse.Namespace) -> bool:
    """Whether --model names a registered model (NAME@ALIAS, NAME/VERSION, models:/) rather than a directory."""
    return not Path(args.model).is_dir()


def reachable(uri: str) -> str:
    """``uri``, once its tracking server answers: every command that talks to MLflow gets its URI
    through here, before its slow imports. A server that is down or silent is one line (exit 1)
    within seconds, where MLflow's own retries would hold the command silent for minutes."""
    from reid_platform.tracking.server import check_reachable

    check_reachable(uri)
    return uri


def check_tracking_uri(args: argparse.Namespace) -> None:
    """For a command with --tracking-uri that needs MLflow: ``args.tracking_uri`` set to the URI it
    talks to (the flag, else $MLFLOW_TRACKING_URI, then SQLite), once that answers."""
    if getattr(args, "tracking_needed", None) and args.tracking_needed(args):
        args.tracking_uri = reachable(args.tracking_uri or TrackingConfig().uri)


def format_table(rows: list[tuple[str, str]]) -> str:
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"  {name:<{width}}  {value}" for name, value in rows)


def format_columns(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    return "\n".join("  ".join(f"{cell!s:<{width}}" for cell, width in zip(row, widths)).rstrip() for row in [header, *rows])


def load_model(reference: str, uri: str | None, scratch: Path):
    """(model, preprocessing) from a model directory, or pulled from the registry at ``uri`` (None: not
    needed for a directory) into ``scratch``."""
    from reid_platform.model.artifact import load_model_dir
    from reid_platform.tracking.registry import pull_model

    directory = Path(reference)
    if not directory.is_dir():
        directory = pull_model(uri, reference, scratch)
    return load_model_dir(directory)
