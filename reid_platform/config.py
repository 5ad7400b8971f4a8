"""The run config: YAML sections, each the typed config of the component that reads it.

    data        data.config.DataConfig              the packed dataset
    input       input.config.InputConfig            reading, augmentation, batching (and the preprocessing)
    model       model.config.ModelConfig            the embedding network
    loss        parallel.config.LossConfig          the margin loss over the sharded classifier
    train       train.config.TrainConfig            optimisation, schedule, precision
    evaluation  evaluation.config.EvaluationConfig  protocol, metric, re-ranking
    scaling     run.config.ScalingConfig            Ray Train workers
    run         run.config.RunSection               names, storage, checkpoints, restarts
    tracking    tracking.config.TrackingConfig      MLflow

A config is YAML plus ``--set dotted.key=value`` overrides. ``base: other.yaml`` (relative to the
file) makes a config start from another one, deep-merged: its sections and keys are kept unless this
file sets them. Everything is checked before any process or cluster starts: an unknown key, a wrong
type, an out-of-range value, a missing base or a cycle of bases raises ``ConfigError`` with the key
path and the file, which the CLI turns into exit status 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import model_validator

from reid_platform.data.config import DataConfig
from reid_platform.errors import ConfigError
from reid_platform.evaluation.config import EvaluationConfig
from reid_platform.input.config import InputConfig
from reid_platform.model.config import PRETRAINED_NAMES, ModelConfig
from reid_platform.parallel.config import LossConfig
from reid_platform.run.config import RunSection, ScalingConfig
from reid_platform.section import Section, validate
from reid_platform.storage.location import S3Uri
from reid_platform.tracking.config import TrackingConfig
from reid_platform.train.config import TrainConfig


class RunConfig(Section):
    data: DataConfig
    input: InputConfig = InputConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunSection = RunSection()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _sections_agree(self) -> RunConfig:
        for name in ("warmup_epochs", "freeze_backbone_epochs"):
            value = getattr(self.train, name)
            if value and value >= self.train.epochs:
                raise ValueError(f"train.{name} ({value}) must be below train.epochs ({self.train.epochs})")
        decay_start = self.train.decay_start_epochs
        if decay_start is not None and not self.train.warmup_epochs <= decay_start <= self.train.epochs:
            raise ValueError(
                f"train.decay_start_epochs ({decay_start}) must lie between train.warmup_epochs "
                f"({self.train.warmup_epochs}) and train.epochs ({self.train.epochs})"
            )
        scaling, per_worker = self.scaling, self.input.batch_size
        if scaling.elastic and scaling.elastic_batch == "global":
            # The global batch stays what the largest group runs, so the recipe's optimisation does not
            # change with the number of workers: every size of the range must split it.
            total = per_worker * scaling.max_workers
            for workers in range(scaling.min_workers, scaling.max_workers + 1):
                share = total // workers
                if total % workers or (self.input.sampler == "identity" and share % self.input.images_per_identity):
                    raise ValueError(
                        f"scaling.num_workers {list(scaling.num_workers)}: {workers} workers cannot split the global batch of "
                        f"{total} (input.batch_size {per_worker} x {scaling.max_workers} workers)"
                        + (f" into identity batches of {self.input.images_per_identity}" if self.input.sampler == "identity" else "")
                        + "; choose a range whose sizes all divide it, or scaling.elastic_batch: per_worker"
                    )
        if self.loss.pairwise is not None and self.input.sampler != "identity":
            raise ValueError(
                f"loss.pairwise ({self.loss.pairwise.name}) needs several images of each identity in a batch: "
                "set input.sampler: identity (and input.images_per_identity, e.g. 4)"
            )
        return self

    @property
    def global_batch_size(self) -> int:
        """Images per optimisation step: input.batch_size on each of the most workers the run has."""
        return self.input.batch_size * self.scaling.max_workers

    def on_workers(self, world_size: int) -> RunConfig:
        """The config as a worker group of ``world_size`` runs it: with an elastic range that keeps the
        global batch, each worker's share (input.batch_size) is what the group size leaves it."""
        keeps_global_batch = self.scaling.elastic and self.scaling.elastic_batch == "global"
        if not keeps_global_batch or world_size == self.scaling.max_workers:
            return self
        batch = self.global_batch_size // world_size
        return self.model_copy(update={"input": self.input.model_copy(update={"batch_size": batch})})

    def with_absolute_paths(self, base: Path) -> RunConfig:
        """Resolve relative paths against ``base`` so Ray workers on any node see the same files."""

        def absolute(path: Path | S3Uri | None) -> Path | S3Uri | None:
            if path is None or isinstance(path, S3Uri):
                return path
            return (path if path.is_absolute() else base / path).resolve()

        uri = self.tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # relative SQLite file: Ray workers run in another directory
            uri = "sqlite:///" + str(absolute(Path(uri.removeprefix("sqlite:///"))))
        return self.model_copy(
            update={
                "tracking": self.tracking.model_copy(update={"uri": uri}),
                "data": self.data.model_copy(update={"shards": absolute(self.data.shards)}),
                "model": self.model.model_copy(
                    update={"pretrained": self.model.pretrained if self.model.pretrained in PRETRAINED_NAMES
                            else str(absolute(Path(self.model.pretrained)))}
                ),  # fmt: skip
                "run": self.run.model_copy(
                    update={
                        "storage_path": absolute(self.run.storage_path),
                        "output_dir": absolute(self.run.output_dir),
                    }
                ),
            }
        )

    def relative_paths(self) -> list[str]:
        """Dotted keys of the paths (and SQLite URI) that are relative: those with_absolute_paths moves."""
        base = Path("/relative-to")
        moved = self.with_absolute_paths(base).flat()
        return [
            key for key, value in self.flat().items()
            if moved[key] != value and moved[key].removeprefix("sqlite:///").startswith(str(base))
        ]  # fmt: skip

    def to_yaml(self) -> str:
        """The whole config, defaults included, as YAML that loads back to the same config."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def flat(self) -> dict[str, str]:
        """Dotted key -> value, for MLflow params."""
        return flatten(self.model_dump(mode="json"))


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested mapping -> {dotted key: str(value)}."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        flat.update(flatten(value, dotted) if isinstance(value, dict) else {dotted: str(value)})
    return flat


def apply_override(tree: dict[str, Any], assignment: str) -> None:
    """Apply one ``dotted.key=value`` override in place; the value is parsed as YAML."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {assignment!r} is not of the form key.path=value")
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw else None


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``override`` on top: mappings merge key by key, anything else is replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_tree(path: Path, chain: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The YAML mapping of ``path`` merged onto its ``base`` chain (``chain``: the files that led here)."""
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        via = f" (the base of {chain[-1]})" if chain else ""
        raise ConfigError(f"{path}: cannot read config{via}: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must be the path of another config file (got {base!r})")
    base_path = (path.parent / base).resolve()
    if base_path in {*chain, path.resolve()}:
        cycle = " -> ".join(str(p) for p in (*chain, path.resolve(), base_path))
        raise ConfigError(f"{path}: base {base!r} makes a cycle of configs: {cycle}")
    return deep_merge(read_tree(base_path, (*chain, path.resolve())), tree)


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read (with its bases), override and validate a run config; raise ConfigError naming the file and key."""
    path = Path(path)
    return config_from_tree(read_tree(path), overrides, str(path))


def config_from_tree(tree: dict[str, Any], overrides: list[str] | tuple[str, ...], where: str) -> RunConfig:
    """The run config of a YAML mapping with ``overrides`` applied (in place); ConfigError names ``where``."""
    for assignment in overrides:
        apply_override(tree, assignment)
    return validate(RunConfig, tree, where)
