"""The function Ray Train runs on every worker: a thin adapter around the engine.

Ray gives the process group, the device and the latest checkpoint; the engine does the training;
after every epoch its state goes into a checkpoint and its record into ``ray.train.report``, which
hands both to the controller (``epoch_log.py`` logs the record once the checkpoint is committed).
The first worker of each node also samples that node's CPU, memory and GPU into the MLflow run
(``tracking.system_metrics``), as the series ``system/<node>/...``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import torch

from reid_platform.config import RunConfig
from reid_platform.console import say
from reid_platform.data.manifest import ShardDataset
from reid_platform.evaluation.plots import write_pictures
from reid_platform.parallel.comm import world
from reid_platform.redaction import redact_log_records
from reid_platform.storage import files, s3
from reid_platform.storage.location import S3Uri
from reid_platform.train.checkpoint import open_checkpoint, save_checkpoint
from reid_platform.train.engine import Engine, EpochOutcome
from reid_platform.train.record import EVALUATION_DIR, EpochRecord


def progress_line(record: EpochRecord) -> str:
    line = (
        f"epoch {record.epoch}/{record.epochs}: loss {record.loss:.3f}, lr {record.lr:.4g}, "
        f"{record.images_per_s:.1f} images/s"
    )
    if record.evaluation:
        line += f", rank-1 {record.evaluation['rank1']:.2%}, mAP {record.evaluation['mAP']:.2%}"
    return line


def _quiet_report_lines() -> None:
    # Ray Train 2.60 logs every report at INFO, its whole metrics dict (our per-step losses included),
    # through a logger named after its file, which its LoggingConfig does not reach.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _save(engine: Engine, outcome: EpochOutcome, directory: Path) -> EpochRecord:
    """The engine's state (and after the last epoch, rank 0's pictures) into ``directory``."""
    save_checkpoint(engine.state_dict(), directory, engine.partition.rank)
    record = outcome.record
    if engine.partition.rank == 0 and record.last and outcome.evaluation is not None:
        pictures = write_pictures(outcome.evaluation, engine.dataset, directory / EVALUATION_DIR)
        record = dataclasses.replace(record, pictures=[picture.name for picture in pictures])
    return record


@contextlib.contextmanager
def _system_metrics(cfg: RunConfig, run_id: str, local_rank: int):
    """MLflow's system-metrics monitor for this node while training runs (on its first worker only)."""
    if not cfg.tracking.system_metrics or local_rank != 0:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    node = f"{socket.gethostname()}-{ray.get_runtime_context().get_node_id()[:6]}"
    monitor = SystemMetricsMonitor(
        run_id, sampling_interval=cfg.tracking.system_metrics_interval_s, resume_logging=True, node_id=node,
        tracking_uri=cfg.tracking.uri,
    )  # fmt: skip
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def _store_upload(cfg: RunConfig):
    """How this worker's checkpoint files reach ``run.storage_path`` when it is an object store: in
    parallel multipart uploads, each checked against its digest (Ray's own upload goes through
    pyarrow one part at a time, a third of the speed: benchmarks/object_store.py). Ray names the
    checkpoint folder, the same for every rank; None leaves a shared file system to Ray."""
    if not isinstance(cfg.run.storage_path, S3Uri):
        return None

    def upload(checkpoint: ray.train.Checkpoint, name: str) -> ray.train.Checkpoint:
        target = cfg.run.storage_path / cfg.run.name / name
        files.upload_folder(Path(checkpoint.path), target)
        return ray.train.Checkpoint(*files.for_arrow(target))

    return upload


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = RunConfig.model_validate(loop_config["config"])
    s3.use_endpoint(cfg.data.s3_endpoint)
    redact_log_records()  # the job log holds what libraries log here (MLflow's warnings quote URIs)
    _quiet_report_lines()
    context = ray.train.get_context()
    with _system_metrics(cfg, loop_config["run_id"], context.get_local_rank()):
        _train(cfg)


def _train(cfg: RunConfig) -> None:
    rank, world_size = world()  # of the process group Ray Train made: the engine's source too
    cfg = cfg.on_workers(world_size)  # an elastic group keeps the global batch whatever its size
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    engine = Engine(cfg, ShardDataset.open(cfg.data.shards), device)
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory, open_checkpoint(Path(directory)) as state:
            engine.load_state_dict(state)
        if rank == 0:
            where = files.from_arrow(checkpoint.path, cfg.run.storage_path)
            say(f"resumed after epoch {engine.progress.epoch} on {world_size} workers from {where}")
    else:
        started = time.perf_counter()
        if engine.evaluate_untrained() and rank == 0:
            say(f"before training: mAP {engine.progress.before_training['mAP']:.2%} ({time.perf_counter() - started:.1f} s)")
    for outcome in engine.run():
        if rank == 0:
            say(progress_line(outcome.record))
        with tempfile.TemporaryDirectory() as directory:
            record = _save(engine, outcome, Path(directory))
            ray.train.report(
                record.to_report(), checkpoint=ray.train.Checkpoint.from_directory(directory),
                checkpoint_upload_fn=_store_upload(cfg),
            )  # fmt: skip
