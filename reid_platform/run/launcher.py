"""Driver side of a training job: check inputs, open the MLflow run, run Ray Train, publish the model.

Starting the same job again (same ``run.name`` and ``run.storage_path``) resumes it: Ray Train hands
the workers the latest checkpoint and the job keeps logging into the same MLflow run. A run that
already trained all its epochs is recognised before anything starts and left as it is.

The driver only opens, publishes and closes the MLflow run; every epoch's metrics and pictures are
logged by the Ray Train controller (``epoch_log.py``).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import torch
from mlflow.tracking import MlflowClient
from ray._private.authentication import authentication_token_setup
from ray.train import (
    CheckpointConfig,
    ControllerError,
    FailureConfig,
    LoggingConfig,
    Result,
    ScalingConfig,
    TrainingFailedError,
    UserCallback,
    WorkerGroupError,
)  # fmt: skip
from ray.train import RunConfig as RayRunConfig
from ray.train.torch import TorchTrainer

from reid_platform.config import RunConfig
from reid_platform.console import say
from reid_platform.data.manifest import ShardDataset
from reid_platform.errors import ConfigError, DatasetError, ReidError, RunAlreadyFinished, TrainingFailed
from reid_platform.model import pretrained
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import Preprocessing
from reid_platform.model.timm_family import check_timm_name
from reid_platform.parallel.sync_batchnorm import convert_sync_batchnorm
from reid_platform.redaction import first_line
from reid_platform.run.description import open_training_run
from reid_platform.run.epoch_log import EpochMetricsToMlflow, worker_errors_line
from reid_platform.run.publish import publish_model
from reid_platform.run.worker import train_loop_per_worker
from reid_platform.storage import files, s3
from reid_platform.storage.location import Location
from reid_platform.tracking.mlflow_run import call_with_retries, finish_run
from reid_platform.train.record import EpochRecord

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


def check_inputs(cfg: RunConfig) -> ShardDataset:
    """The dataset, opened: fails before any process starts if the shards are missing or changed, the
    backbone is not one timm has, or has a norm that model.sync_bn cannot convert."""
    if cfg.model.timm_name:
        check_timm_name(cfg.model.timm_name)
    if cfg.model.sync_bn:  # a norm it cannot convert is a ConfigError naming the layer
        with torch.device("meta"):  # the layers' types only: no memory, no weights
            convert_sync_batchnorm(ReIDNet(cfg.model, Preprocessing.of(cfg.input)))
    dataset = ShardDataset.open(cfg.data.shards)
    if cfg.data.verify_at_start == "sha256":
        _verify_digests(dataset, cfg)
    if dataset.num_classes < cfg.scaling.max_workers:
        raise ConfigError(
            f"scaling.num_workers: {dataset.num_classes} classes of {cfg.data.shards} cannot be sharded over "
            f"{cfg.scaling.max_workers} workers"
        )
    return dataset


def _verify_digests(dataset: ShardDataset, cfg: RunConfig) -> None:
    """Every shard's sha256 against the manifest. A changed training shard is a warning when its bad
    samples can be skipped as they are met (``data.on_bad_sample: skip``); otherwise, and for query
    and gallery shards (evaluation never skips), it stops the run before it starts."""
    changed = dataset.changed_shards(progress=True)
    for split, number in changed:
        tar = dataset.split(split).tars[number]
        if split != "train" or cfg.data.on_bad_sample == "fail":
            raise DatasetError(
                f"{tar}: sha256 differs from the manifest's (data.verify_at_start sha256); restore the shard "
                "or find its bad samples with `reid data verify`"
            )
        print(f"warning: {tar}: sha256 differs from the manifest's; samples that no longer decode will be skipped")


def _committed(run_dir: Location) -> Result | None:
    """Ray Train's latest committed checkpoint and report of an earlier attempt of this run, if any."""
    path, filesystem = files.for_arrow(run_dir)
    try:
        return Result.from_path(path, storage_filesystem=filesystem)
    except RuntimeError:  # no such run folder, or no checkpoint was ever committed
        return None


def connect_ray() -> bool:
    """Join the job's cluster (inside a Ray job, RAY_ADDRESS is set) or start one on this machine.

    A cluster of our own starts quietly, without changing what Ray does: its token authentication
    (Ray's default for local clusters) is announced by a warning that we do not print, and it has no
    preemption watcher (nothing drains the nodes of a cluster that lives inside this process; the
    watcher's start logs an error line about its restart policy). On a shared cluster both stay as
    its operator set them. Whether it started a cluster of its own.

    Its processes are told its dashboard's address: Ray Train's placement-group cleaner (which frees
    the workers of a run whose driver died, such as a search's stopped trial) asks the state API,
    which otherwise looks for "the" Ray instance of the machine and fails when there are several.
    """
    if ray.is_initialized():
        return False
    if os.environ.get("RAY_ADDRESS"):
        ray.init(logging_level="WARNING", log_to_driver=True)
        return False
    logging.getLogger(authentication_token_setup.__name__).setLevel(logging.ERROR)
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    port = _free_port()
    ray.init(logging_level="WARNING", log_to_driver=True, dashboard_port=port,
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}})  # fmt: skip
    return True


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _trainer(cfg: RunConfig, run_id: str, callbacks: Sequence[UserCallback]) -> TorchTrainer:
    storage_path, storage_filesystem = files.for_arrow(cfg.run.storage_path)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "run_id": run_id},
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            elastic_resize_monitor_interval_s=cfg.scaling.resize_interval_s,
            use_gpu=cfg.scaling.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if cfg.scaling.use_gpu else {})},
        ),
        run_config=RayRunConfig(
            name=cfg.run.name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.checkpoints_to_keep),
            # a lost worker or node restarts the whole group from the latest checkpoint
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            # the callbacks after it see an epoch once its metrics are in MLflow: a search may stop the run on them
            callbacks=[EpochMetricsToMlflow(cfg, run_id, flush_evaluated=bool(callbacks)), *callbacks],
            # Ray Train's own INFO lines (one per checkpoint and report, per worker) drown the progress lines
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _why(error: TrainingFailedError, cfg: RunConfig) -> ReidError:
    """The error a failed run ends with, in one line: the input error that stopped it, or the last
    workers' errors once ``run.max_failures`` restarts were spent."""
    if isinstance(error, ControllerError) and isinstance(error.controller_failure, ReidError):
        return error.controller_failure
    if isinstance(error, WorkerGroupError):
        return TrainingFailed(
            f"run {cfg.run.name!r} failed after {cfg.run.max_failures} restarts (run.max_failures): "
            f"{worker_errors_line(error.worker_failures)}"
        )
    cause = "\n".join(line for line in str(error).splitlines() if not line.startswith("Training failed"))
    return TrainingFailed(f"run {cfg.run.name!r} failed: {first_line(cause, 300)}")  # e.g. Ray's out-of-memory kill


def committed_record(cfg: RunConfig) -> EpochRecord | None:
    """The record of the latest committed epoch of run ``cfg.run.name`` (absolute paths), if any."""
    previous = _committed(cfg.run.storage_path / cfg.run.name)
    return EpochRecord.from_report(previous.metrics or {}) if previous is not None else None


def train(
    cfg: RunConfig, config_path: Path, base_dir: Path | None = None,
    callbacks: Sequence[UserCallback] = (), run_tags: dict[str, str] | None = None,
) -> TrainingOutcome:
    """Run (or resume) one training job; relative paths in ``cfg`` are taken from ``base_dir`` (default: cwd).

    ``callbacks``: more Ray Train callbacks, each called with an epoch once its metrics are in MLflow
    (a search's report to Ray Tune); ``run_tags``: set on the MLflow run when it is created (a
    search's parent run).

    That the tracking server answers is checked by the caller: `reid train` does, before it imports
    this module (Ray and torch take seconds to import; a wrong URI is one line at once).
    """
    started = time.perf_counter()
    cfg = cfg.with_absolute_paths(base_dir or Path.cwd())
    s3.use_endpoint(cfg.data.s3_endpoint)
    run_dir = cfg.run.storage_path / cfg.run.name
    id_file = run_dir / MLFLOW_RUN_ID_FILE
    # the first request to run.storage_path: a missing bucket or a refused key is one line here, at
    # once, before the dataset is opened and before any Ray process starts
    known_run = files.read_text(id_file).strip() if files.is_file(id_file) else None
    dataset = check_inputs(cfg)
    # the weights model.pretrained names, as a local file: fetched once here, never by the workers
    cfg = cfg.model_copy(update={"model": pretrained.resolve(cfg.model)})
    uri, patience = cfg.tracking.uri, cfg.tracking.outage_timeout_s
    previous = _committed(run_dir) if known_run else None
    if previous is not None:
        record = EpochRecord.from_report(previous.metrics or {})
        finished = MlflowClient(uri).get_run(known_run).info.status == "FINISHED"
        if record is not None and record.epoch >= cfg.train.epochs and finished:
            raise RunAlreadyFinished(
                f"run {cfg.run.name!r} in {cfg.run.storage_path} finished its {record.epoch} epochs already "
                f"(MLflow run {known_run}); raise train.epochs to continue it, or choose a new run.name"
            )
    run_id = open_training_run(cfg, config_path, dataset, known_run, run_tags)
    files.write_text(id_file, run_id)

    own_cluster = connect_ray()
    # read by Ray Train's controller, which inherits it from this process when fit() starts it
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.scaling.start_timeout_s)
    try:
        result = _trainer(cfg, run_id, callbacks).fit()
    except BaseException as error:
        try:  # best effort, briefly: the training error is the one to report
            call_with_retries(lambda: finish_run(uri, run_id, "FAILED"), "marking the run failed", uri, 30.0)
        except Exception as marking:  # noqa: BLE001
            say(f"warning: could not mark MLflow run {run_id} failed: {marking}")
        if isinstance(error, TrainingFailedError):
            if own_cluster:  # stops the forwarding of its processes' logs: the one-line reason comes last
                ray.shutdown()
            raise _why(error, cfg) from None
        raise
    record = EpochRecord.from_report(result.metrics or {})
    with result.checkpoint.as_directory() as checkpoint_dir:
        registered = call_with_retries(
            lambda: publish_model(cfg, Path(checkpoint_dir), run_id, record.epoch), "publishing the model", uri, patience
        )
    evaluation = record.evaluation or {}
    outcome = TrainingOutcome(
        rank1=evaluation["rank1"],
        rank5=evaluation["rank5"],
        mAP=evaluation["mAP"],
        mINP=evaluation["mINP"],
        mAP_before_training=record.before_training["mAP"],
        images_per_s=record.images_per_s,
        wall_s=time.perf_counter() - started,
        mlflow_run_id=run_id,
        registered_model=registered,
        checkpoint=files.from_arrow(result.checkpoint.path, cfg.run.storage_path),
    )
    call_with_retries(lambda: finish_run(uri, run_id), "finishing the run", uri, patience)
    cfg.run.output_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run.output_dir / "results.json").write_text(json.dumps(asdict(outcome), indent=2))
    return outcome
