"""`reid tune`: a hyperparameter search on Ray Tune whose trials are training runs."""

from __future__ import annotations

import argparse
from pathlib import Path

from reid_platform.cli.common import add_run_config, format_columns, positive_int, reachable


def add_search_flags(parser: argparse.ArgumentParser, space_flag: str = "--space") -> None:
    """The search's flags, for `reid tune` and `reid submit --tune`."""
    parser.add_argument(space_flag, dest="space", metavar="SPACE.yaml", required=space_flag == "--space",
                        help="config keys with their distributions, e.g. 'loss.scale: {loguniform: [16, 256]}'")  # fmt: skip
    parser.add_argument("--trials", type=positive_int, default=8, help="samples of the space (default 8; a grid is run this many times)")
    parser.add_argument("--scheduler", choices=("asha", "none"), default="asha",
                        help="asha stops weak trials at evaluated epochs (default); none runs every trial to the end")  # fmt: skip
    parser.add_argument("--metric", default="mAP", help="what the search maximises: mAP (default), rank1, rank5 or mINP")
    parser.add_argument("--max-concurrent", type=positive_int, default=None,
                        help="trials at once (default: as many as the cluster holds workers for)")  # fmt: skip
    parser.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                        help="stop every trial after this wall time (trials stopped so are marked in MLflow)")  # fmt: skip


def search_options(args: argparse.Namespace):
    from reid_platform.tune.options import SearchOptions, check_options

    options = SearchOptions(args.trials, args.scheduler, args.metric, args.max_concurrent, args.time_budget)
    check_options(options)
    return options


def search_arguments(args: argparse.Namespace) -> list[str]:
    """The search's flags as given (bar the space), for a job that runs `reid tune`."""
    arguments = ["--trials", str(args.trials), "--scheduler", args.scheduler, "--metric", args.metric]
    if args.max_concurrent:
        arguments += ["--max-concurrent", str(args.max_concurrent)]
    if args.time_budget:
        arguments += ["--time-budget", f"{args.time_budget:g}"]
    return arguments


def _format(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _cmd_tune(args: argparse.Namespace) -> int:
    from reid_platform.config import load_config
    from reid_platform.redaction import redact
    from reid_platform.tune.space import load_space

    cfg = load_config(args.config, args.set)
    space = load_space(args.space, cfg)  # validated before Ray, MLflow or any trial starts
    options = search_options(args)
    base_dir = (args.base_dir or Path.cwd()).resolve()
    resolved = cfg.with_absolute_paths(base_dir)
    reachable(resolved.tracking.uri)
    from reid_platform.tune.search import search

    outcome = search(cfg, Path(args.config), space, options, base_dir)
    keys = [dimension.key for dimension in space.dimensions]
    rows = [[row.trial_id, row.status, str(row.epoch), *(f"{row.metrics[m]:.2%}" if m in row.metrics else "-"
                                                         for m in ("mAP", "rank1")),
             *(_format(row.values.get(key, "-")) for key in keys)] for row in outcome.trials]  # fmt: skip
    print("\n" + format_columns(["TRIAL", "STATUS", "EPOCHS", "mAP", "RANK-1", *keys], rows))
    best = outcome.best
    print(f"\nbest trial {best.trial_id}: {options.metric} {best.metrics[options.metric]:.2%}; "
          f"search {outcome.wall_s:.0f} s; MLflow run {outcome.parent_run_id}; "
          f"model {outcome.registered_model or '(not registered)'}")  # fmt: skip
    print(f"MLflow: {redact(resolved.tracking.uri)}; the best config is also in {resolved.run.output_dir / 'best.yaml'}")
    print(f"\n# the best trial's config: reid train FILE\n{outcome.best_config.to_yaml()}", end="")
    return 0


def add_commands(commands) -> None:
    tune = commands.add_parser("tune", help="search hyperparameters with Ray Tune: every trial a training run")
    add_run_config(tune, "YAML run config the trials start from")
    add_search_flags(tune)
    tune.add_argument("--base-dir", type=Path, default=None,
                      help="resolve the config's relative paths against this folder (default: the current one)")  # fmt: skip
    tune.set_defaults(handler=_cmd_tune)
