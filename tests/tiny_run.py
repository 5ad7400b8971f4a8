"""The small training run the tests start, in one place: the demo config on the tests' shards at
64x32, a few short epochs, its files under the test's folder."""

from __future__ import annotations

from pathlib import Path

BATCH = 8  # images per worker


def tiny_run(shards: Path, work: Path, name: str, epochs: int, *extra: str) -> list[str]:
    """Overrides of the demo config (``--set`` values; ``extra`` after them wins) for run ``name``."""
    return [
        f"data.shards={shards}", "input.height=64", "input.width=32", f"input.batch_size={BATCH}",
        "input.shuffle_buffer=64", "train.warmup_epochs=0", f"train.epochs={epochs}", "train.seed=1",
        f"run.name={name}", f"run.storage_path={work / 'ray'}", f"run.output_dir={work / 'out'}", *extra,
    ]  # fmt: skip


def set_arguments(overrides: list[str]) -> list[str]:
    """``--set`` before each override: the command line of `reid train` or `reid submit`."""
    return [argument for override in overrides for argument in ("--set", override)]
