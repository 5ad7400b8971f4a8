"""Typed run configuration, validated when it is loaded.

A config is YAML plus ``--set dotted.key=value`` overrides. Everything is checked before any process
or cluster starts: an unknown key, a wrong type or an out-of-range value raises ``ConfigError`` with
the key path and the file, which the CLI turns into exit status 2.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key path."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(_Section):
    shards: Path = Field(description="Directory written by `reid data pack` (holds manifest.json).")


class InputConfig(_Section):
    height: int = Field(256, ge=32, le=1024)
    width: int = Field(128, ge=16, le=1024)
    batch_size: int = Field(64, ge=2, description="Images per worker per step.")
    num_threads: int = Field(2, ge=1, description="DALI CPU threads per worker.")
    flip_prob: float = Field(0.5, ge=0.0, le=1.0)
    pad: int = Field(10, ge=0, description="Pixels of zero padding before the random crop.")
    shuffle_buffer: int = Field(1024, ge=1, description="DALI reader shuffle buffer (initial_fill).")
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    erasing_prob: float = Field(
        0.5, ge=0.0, le=1.0,
        description="Random erasing as torchvision's: 2-33% of the area, aspect 0.3-3.3, zeros after normalisation.",
    )
    brightness: float = Field(0.0, ge=0.0, description="Colour jitter: factor drawn from [1-b, 1+b]; 0 is off.")
    contrast: float = Field(0.0, ge=0.0)
    saturation: float = Field(0.0, ge=0.0)
    hue: float = Field(0.0, ge=0.0, le=0.5, description="Shift drawn from [-h, h] of the hue circle.")
    backend: Literal["dali", "torch"] = Field(
        "dali", description="torch: webdataset + torchvision + DataLoader, the same transforms (baseline, no DALI)."
    )
    sampler: Literal["shuffle", "identity"] = Field(
        "shuffle", description="identity: batches of batch_size / images_per_identity identities x images_per_identity."
    )
    images_per_identity: int = Field(4, ge=1, description="K of P x K identity-balanced batches.")

    @model_validator(mode="after")
    def _identity_batches_fit(self) -> InputConfig:
        if self.sampler == "identity":
            if self.backend != "dali":
                raise ValueError("input.sampler identity needs input.backend dali")
            if self.batch_size % self.images_per_identity:
                raise ValueError(
                    f"input.batch_size ({self.batch_size}) must be a multiple of input.images_per_identity "
                    f"({self.images_per_identity})"
                )
        return self


class ModelConfig(_Section):
    arch: Literal["resnet18", "resnet34", "resnet50", "resnet101"] = "resnet50"
    embedding_dim: int | None = Field(
        None, ge=8, description="Linear projection after pooling; None keeps the backbone width."
    )
    last_stride: Literal[1, 2] = 1
    pretrained_weights: Path | None = Field(
        None, description="Local torchvision state dict; nothing is ever downloaded."
    )


class LossConfig(_Section):
    name: Literal["circle", "cosface", "arcface", "softmax"] = "circle"
    scale: float = Field(128.0, gt=0.0, description="Circle's gamma (128 for re-ID in the paper); s otherwise.")
    margin: float = Field(
        0.25, ge=0.0, lt=1.0, description="Circle relaxation m (< 0.5), CosFace cosine or ArcFace angle margin."
    )
    sample_rate: float = Field(
        1.0, gt=0.0, le=1.0, description="Fraction of classes per step (Partial FC); 1 = exact full loss."
    )

    @model_validator(mode="after")
    def _circle_margin(self) -> LossConfig:
        if self.name == "circle" and self.margin >= 0.5:
            raise ValueError(
                f"loss.margin must be below 0.5 for circle (got {self.margin}): the decision "
                "boundaries D_p = 1 - m and D_n = m would cross"
            )
        return self


class TrainConfig(_Section):
    epochs: int = Field(60, ge=1)
    lr: float = Field(0.01, gt=0.0)
    classifier_lr: float | None = Field(None, gt=0.0, description="Defaults to lr.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(5e-4, ge=0.0)
    warmup_epochs: int = Field(5, ge=0)
    seed: int = 0
    eval_every: int = Field(0, ge=0, description="Evaluate every N epochs; 0 only at the end.")
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 autocast on GPUs that support it, fp32 on CPU."
    )
    channels_last: bool = Field(True, description="NHWC backbone on GPU (ignored on CPU).")


class EvaluationConfig(_Section):
    metric: Literal["cosine", "euclidean"] = "cosine"
    protocol: Literal["market", "cuhk03", "no_camera"] = Field(
        "market", description="market: also DukeMTMC-reID and MSMT17; no_camera: data without camera ids."
    )
    memory_mb: float = Field(512.0, gt=0.0, description="Budget for one block of query x gallery ranking work.")
    rerank: bool = Field(False, description="k-reciprocal re-ranking (k1=20, k2=6, lambda=0.3).")


class ScalingSection(_Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)


class RunSection(_Section):
    name: str = Field("reid", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: Path = Path("runs/ray")
    output_dir: Path = Path("runs/reid")
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts from the latest checkpoint before the job fails; -1 = no limit."
    )


DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


class TrackingConfig(_Section):
    uri: str = Field(
        default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI,
        description="Defaults to $MLFLOW_TRACKING_URI, then a local SQLite file. Credentials never go here: "
        "MLflow reads MLFLOW_TRACKING_USERNAME/PASSWORD/TOKEN from the environment.",
    )
    experiment: str = Field("reid", min_length=1)
    registered_model: str | None = None
    alias: str = Field("champion", min_length=1)
    outage_timeout_s: float = Field(
        900.0, gt=0.0,
        description="How long the end of training waits for an unreachable tracking server before failing.",
    )


class RunConfig(_Section):
    data: DataConfig
    input: InputConfig = InputConfig()
    model: ModelConfig = ModelConfig()
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    scaling: ScalingSection = ScalingSection()
    run: RunSection = RunSection()
    tracking: TrackingConfig = TrackingConfig()

    @model_validator(mode="after")
    def _warmup_within_training(self) -> RunConfig:
        if self.train.warmup_epochs >= self.train.epochs and self.train.warmup_epochs > 0:
            raise ValueError(
                f"train.warmup_epochs ({self.train.warmup_epochs}) must be below "
                f"train.epochs ({self.train.epochs})"
            )
        return self

    def with_absolute_paths(self, base: Path) -> RunConfig:
        """Resolve relative paths against ``base`` so Ray workers on any node see the same files."""

        def absolute(path: Path | None) -> Path | None:
            return None if path is None else (path if path.is_absolute() else base / path).resolve()

        uri = self.tracking.uri
        if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
            # relative SQLite file: Ray workers run in another directory
            uri = "sqlite:///" + str(absolute(Path(uri.removeprefix("sqlite:///"))))
        return self.model_copy(
            update={
                "tracking": self.tracking.model_copy(update={"uri": uri}),
                "data": self.data.model_copy(update={"shards": absolute(self.data.shards)}),
                "model": self.model.model_copy(
                    update={"pretrained_weights": absolute(self.model.pretrained_weights)}
                ),
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

    def flat(self) -> dict[str, str]:
        """Dotted key -> value, for MLflow params."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict):
                for key, item in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, item)
            else:
                flat[prefix] = str(value)

        walk("", self.model_dump(mode="json"))
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


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read, override and validate a run config; raise ConfigError naming the file and key."""
    path = Path(path)
    try:
        tree = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config: {error.strerror}") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return RunConfig.model_validate(tree)
    except ValidationError as error:
        problems = []
        for item in error.errors():
            where = ".".join(str(part) for part in item["loc"]) or "(top level)"
            got = "" if item["type"] == "missing" else f" (got {item.get('input')!r})"
            problems.append(f"{where}: {item['msg']}{got}")
        raise ConfigError(f"{path}: invalid config: " + "; ".join(problems)) from None
