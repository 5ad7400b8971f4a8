"""Epoch records go to MLflow when Ray Train commits the checkpoint they belong to.

This callback runs in the Ray Train controller, which calls it once every worker has reported an
epoch and the checkpoint is persisted. A worker group that restarts from checkpoint K repeats the
epochs after K, but their lost first attempts were never committed and so never logged: the history
holds every committed epoch once, however often the workers failed. The final evaluation's pictures
travel in the checkpoint and are logged from there; with ``tracking.log_checkpoints_as_models`` so
does every evaluated epoch's model. (What is still queued during a tracking outage is lost if the
controller itself dies, that is if the whole job does.)
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ray.train import UserCallback
from ray.train.v2._internal.execution.controller import controller

from reid_platform.config import RunConfig
from reid_platform.console import say
from reid_platform.errors import ReidError
from reid_platform.redaction import first_line, redact_log_records
from reid_platform.run.publish import log_checkpoint_model
from reid_platform.tracking.mlflow_run import ONE_ATTEMPT, RunLogger, mlflow_settings
from reid_platform.train.record import EVALUATION_DIR, EpochRecord


def worker_errors_line(worker_exceptions: dict) -> str:
    """The workers' errors in one line (for the job log, a failed run's message and a resize tag),
    redacted before it is cut: a cut URI would no longer show its password."""
    return "; ".join(
        f"rank {rank}: {type(error).__name__}: {first_line(str(error), 160)}"
        for rank, error in sorted(worker_exceptions.items())
    )


def log_epoch(logger: RunLogger, record: EpochRecord) -> None:
    """An epoch's metrics at step = epoch and its per-step ``step_loss``; with the first epoch, the
    untrained model's evaluation as step 0 of the same metrics, so that both read as one curve."""
    now = int(time.time() * 1000)
    if record.epoch == 1:
        logger.log_metrics(record.before_training, step=0, timestamp_ms=now)
    logger.log_series("step_loss", record.step_losses, timestamp_ms=now)
    epoch_metrics = {
        "epoch": record.epoch, "loss": record.loss, "lr": record.lr, "images_per_s": record.images_per_s,
        "world_size": record.world_size, "skipped_samples": record.skipped_samples, **(record.evaluation or {}),
    }  # fmt: skip
    logger.log_metrics(epoch_metrics, step=record.epoch, timestamp_ms=now)


def log_resize(logger: RunLogger, epoch: int, old: int, new: int, reason: str) -> None:
    """A change of the worker group's size, effective from ``epoch``: two metrics at that step and a
    tag with the reason (``resize.<epoch>``)."""
    logger.log_metrics({"resize_from_workers": old, "resize_to_workers": new}, step=epoch)
    logger.set_tag(f"resize.{epoch}", f"{old} -> {new} workers: {reason}")


class EpochMetricsToMlflow(UserCallback):
    def __init__(self, cfg: RunConfig, run_id: str, flush_evaluated: bool = False):
        """``flush_evaluated``: an evaluated epoch's metrics are sent (up to 30 s) before the next
        callback hears of the epoch: a search may stop the run on them."""
        self.cfg, self.run_id, self.flush_evaluated = cfg, run_id, flush_evaluated
        self._logger: RunLogger | None = None  # made in the controller: a thread does not pickle
        self._world_size: int | None = None  # of the last committed epoch
        self._failure: str | None = None  # why the worker group last failed

    def after_exception(self, run_context, worker_exceptions: dict) -> None:
        """Note why the group failed (for the resize record) and end the run when the cause would come
        back in the next attempt: raised here, the error reaches Ray Train as a controller error,
        which it does not retry (``run.max_failures`` is for lost workers and nodes)."""
        self._failure = worker_errors_line(worker_exceptions)
        for _, error in sorted(worker_exceptions.items()):
            if isinstance(error, ReidError) and not error.transient:
                # the worker's traceback is in the job log already; the controller's of this raise is noise
                logging.getLogger(controller.__name__).setLevel(logging.CRITICAL)
                raise error

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        record = EpochRecord.from_report(metrics[0])  # world rank 0's; every rank reports the same
        if record is None:
            return
        tracking = self.cfg.tracking
        if self._logger is None:
            # this runs in the Ray Train controller, whose log records (MLflow's warnings quote the
            # tracking URI) go to the job log as the workers' do
            redact_log_records()
            self._logger = RunLogger(tracking.uri, self.run_id)
        self._note_resize(record)
        log_epoch(self._logger, record)
        if checkpoint is not None and (record.pictures or (record.evaluation and tracking.log_checkpoints_as_models)):
            with checkpoint.as_directory() as directory:
                for name in record.pictures:
                    self._logger.log_artifact(Path(directory) / EVALUATION_DIR / name, EVALUATION_DIR)
                if record.evaluation and tracking.log_checkpoints_as_models:
                    self._log_model(Path(directory), record.epoch)
        if self.flush_evaluated and record.evaluation and not record.last:
            if not self._logger.flush(min(30.0, tracking.outage_timeout_s)):
                say(f"warning: MLflow is unavailable; epoch {record.epoch}'s metrics may be lost if the run is stopped now")
        if record.last:
            # the controller ends with the run: the backlog of an outage must go out now
            if lost := self._logger.close(tracking.outage_timeout_s):
                say(f"warning: {lost}; the run's MLflow history is incomplete")
            self._logger = None

    def _note_resize(self, record: EpochRecord) -> None:
        """A worker group of another size than the last committed epoch's: one job-log line, and the
        resize in MLflow (epoch, old and new size, reason)."""
        resumed = self._world_size is None and record.epoch > 1  # a new controller of a run that trained before
        if resumed:
            self._world_size = self._logged_world_size() or record.world_size
        old, new = self._world_size or record.world_size, record.world_size
        if new != old:
            if resumed:
                reason = "the run was started again"
            elif new < old:
                reason = self._failure or "a worker was lost"
            else:
                reason = "resources are available again"
            say(f"resized from {old} to {new} workers from epoch {record.epoch} ({reason})")
            log_resize(self._logger, record.epoch, old, new, reason)
        self._world_size, self._failure = new, None

    def _logged_world_size(self) -> int | None:
        """The group size of the run's last logged epoch; None when MLflow cannot say now (a resize
        is then not noted, rather than the controller failing on a tracking outage)."""
        try:
            with mlflow_settings(ONE_ATTEMPT):  # an answer now or none: not MLflow's minutes of retries
                logged = self._logger.client.get_run(self.run_id).data.metrics.get("world_size")
        except Exception:  # noqa: BLE001 - any tracking failure: training goes on
            return None
        return int(logged) if logged is not None else None

    def _log_model(self, checkpoint_dir: Path, epoch: int) -> None:
        """The epoch's model, once its metrics are in the run (they are linked to it from there)."""
        # briefly: during an outage the controller must go on health-checking and resizing the group
        if not self._logger.flush(min(30.0, self.cfg.tracking.outage_timeout_s)):
            say(f"warning: MLflow is unavailable; epoch {epoch}'s model is not logged")
            return
        try:
            with mlflow_settings(ONE_ATTEMPT):
                log_checkpoint_model(self.cfg, checkpoint_dir, self.run_id, epoch)
        except Exception as error:  # noqa: BLE001 - a model that cannot be logged must not stop training
            say(f"warning: epoch {epoch}'s model was not logged to MLflow: {type(error).__name__}: {error}")
