"""How a training run is described to MLflow: its params (the resolved config), a one-paragraph
description, the datasets it reads and its config files. The driver opens the run with them."""

from __future__ import annotations

from pathlib import Path

from reid_platform.config import RunConfig
from reid_platform.data.manifest import ShardDataset
from reid_platform.model.config import PRETRAINED_NAMES
from reid_platform.tracking.mlflow_run import dataset_inputs, open_run


def describe_run(cfg: RunConfig, dataset: ShardDataset) -> str:
    """The run's description (MLflow's note): what was trained on what, with which recipe."""
    train, loss = dataset.split("train"), cfg.loss
    pairwise = f" + pair-wise {loss.pairwise.name} (weight {loss.pairwise.weight:g})" if loss.pairwise else ""
    smoothing = f", label smoothing {loss.label_smoothing:g}" if loss.label_smoothing else ""
    weights = cfg.model.pretrained if cfg.model.pretrained in PRETRAINED_NAMES else "a file"
    low, high = cfg.scaling.min_workers, cfg.scaling.max_workers
    workers = f"{low} to {high}" if cfg.scaling.elastic else str(high)
    if cfg.scaling.elastic and cfg.scaling.elastic_batch == "per_worker":
        batch = f"{cfg.input.batch_size} per worker"
    else:
        batch = f"global batch {cfg.global_batch_size}"
    return (
        f"{cfg.model.arch} (pretrained: {weights}, {cfg.model.pooling} pooling) at {cfg.input.height}x{cfg.input.width}, "
        f"trained on {dataset.manifest.dataset} ({train.samples} images of {train.identities} identities, "
        f"{dataset.root}) with {loss.name} (scale {loss.scale:g}, margin {loss.margin:g}{smoothing}){pairwise}, "
        f"{cfg.train.optimizer} at {cfg.train.lr:g} for {cfg.train.epochs} epochs on {workers} workers "
        f"({batch}); evaluated on {dataset.split('query').samples} queries against "
        f"{dataset.split('gallery').samples} gallery images ({cfg.evaluation.protocol} protocol)."
    )


def open_training_run(
    cfg: RunConfig, config_path: Path, dataset: ShardDataset, run_id: str | None = None, tags: dict[str, str] | None = None
) -> str:
    """Create (or reopen) the MLflow run of a training job: params, the resolved config and the file
    as given, the description, the datasets it trains and evaluates on, and ``tags`` (when created)."""
    texts = {"config/resolved.yaml": cfg.to_yaml(), f"config/{config_path.name}": config_path.read_text()}
    return open_run(
        cfg.tracking.uri, cfg.tracking.experiment, cfg.run.name, cfg.flat(), describe_run(cfg, dataset),
        dataset_inputs(dataset), texts, run_id, tags,
    )  # fmt: skip
