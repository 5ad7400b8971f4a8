"""Driver side of a training job: check inputs, open the MLflow run, run Ray Train, publish the model.

Starting the same job again (same ``run.name`` and ``run.storage_path``) resumes it: Ray Train hands
the workers the latest checkpoint and the job keeps logging into the same MLflow run.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch
from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, ScalingConfig
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from reid_platform.config import RunConfig
from reid_platform.data.pack import read_manifest, shard_paths
from reid_platform.model.artifact import save_model_dir
from reid_platform.tracking.mlflow_run import call_with_retries, finish_run, open_run
from reid_platform.tracking.registry import log_model_dir, register_model
from reid_platform.tracking.server import check_reachable
from reid_platform.train.checkpoint import TRAINER_STATE
from reid_platform.train.epoch_log import EpochMetricsToMlflow
from reid_platform.train.loop import build_model, train_loop_per_worker

MLFLOW_RUN_ID_FILE = "mlflow_run_id"


@dataclass(frozen=True)
class TrainingOutcome:
    rank1: float
    rank5: float
    mAP: float
    mINP: float
    mAP_before_training: float
    images_per_s: float
    wall_s: float
    mlflow_run_id: str
    registered_model: str | None
    checkpoint: str


def check_inputs(cfg: RunConfig) -> None:
    """Fail before any process starts if the shards are missing or changed."""
    manifest = read_manifest(cfg.data.shards)
    for split in ("train", "query", "gallery"):
        shard_paths(cfg.data.shards, manifest, split)
    if manifest["num_classes"] < cfg.scaling.num_workers:
        raise ValueError(
            f"{cfg.data.shards}: {manifest['num_classes']} classes cannot be sharded over "
            f"{cfg.scaling.num_workers} workers"
        )


def publish_model(cfg: RunConfig, checkpoint_dir: Path, run_id: str) -> str | None:
    """Turn the final checkpoint into a pickle-free model directory, log it and register it."""
    model = build_model(cfg)
    state = torch.load(checkpoint_dir / TRAINER_STATE, map_location="cpu", weights_only=True)
    model.load_state_dict(state["backbone"])
    with tempfile.TemporaryDirectory() as tmp:
        source = log_model_dir(cfg.tracking.uri, run_id, save_model_dir(model, cfg.input, Path(tmp) / "model"))
    if cfg.tracking.registered_model is None:
        return None
    register_model(cfg.tracking.uri, run_id, source, cfg.tracking.registered_model, cfg.tracking.alias)
    return f"{cfg.tracking.registered_model}@{cfg.tracking.alias}"


def train(cfg: RunConfig, config_path: Path, base_dir: Path | None = None) -> TrainingOutcome:
    """Run (or resume) one training job; relative paths in ``cfg`` are taken from ``base_dir`` (default: cwd)."""
    started = time.perf_counter()
    cfg = cfg.with_absolute_paths(base_dir or Path.cwd())
    check_inputs(cfg)
    check_reachable(cfg.tracking.uri)
    run_dir = cfg.run.storage_path / cfg.run.name
    id_file = run_dir / MLFLOW_RUN_ID_FILE
    run_id = open_run(cfg, config_path, id_file.read_text().strip() if id_file.is_file() else None)
    uri, patience = cfg.tracking.uri, cfg.tracking.outage_timeout_s
    run_dir.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)

    if not ray.is_initialized():
        ray.init(logging_level="WARNING", log_to_driver=True)
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "tracking_uri": cfg.tracking.uri,
            "run_id": run_id,
        },
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=cfg.run.name,
            storage_path=str(cfg.run.storage_path),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            # a lost worker or node restarts the whole group from the latest checkpoint
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            callbacks=[EpochMetricsToMlflow(uri, run_id, cfg.train.epochs, patience)],
            # Ray Train's own INFO lines (one per checkpoint and report, per worker) drown the progress lines
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        result = trainer.fit()
    except BaseException:
        try:  # best effort, briefly: the training error is the one to report
            call_with_retries(lambda: finish_run(uri, run_id, "FAILED"), "marking the run failed", uri, 30.0)
        except Exception as error:  # noqa: BLE001
            print(f"warning: could not mark MLflow run {run_id} failed: {error}", flush=True)
        raise
    with result.checkpoint.as_directory() as checkpoint_dir:
        registered = call_with_retries(
            lambda: publish_model(cfg, Path(checkpoint_dir), run_id), "publishing the model", uri, patience
        )
    metrics = result.metrics or {}
    if "rank1" not in metrics:
        call_with_retries(lambda: finish_run(uri, run_id), "finishing the run", uri, patience)
        raise ValueError(
            f"run {cfg.run.name!r} in {cfg.run.storage_path} had already finished its {cfg.train.epochs} "
            "epochs; raise train.epochs to continue it, or choose a new run.name"
        )
    outcome = TrainingOutcome(
        rank1=metrics["rank1"],
        rank5=metrics["rank5"],
        mAP=metrics["mAP"],
        mINP=metrics["mINP"],
        mAP_before_training=metrics["initial_mAP"],
        images_per_s=metrics["images_per_s"],
        wall_s=time.perf_counter() - started,
        mlflow_run_id=run_id,
        registered_model=registered,
        checkpoint=result.checkpoint.path,
    )
    call_with_retries(lambda: finish_run(uri, run_id), "finishing the run", uri, patience)
    cfg.run.output_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run.output_dir / "results.json").write_text(json.dumps(asdict(outcome), indent=2))
    return outcome
