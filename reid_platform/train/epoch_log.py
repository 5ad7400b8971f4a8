"""Epoch records go to MLflow when Ray Train commits the checkpoint they belong to.

This callback runs in the Ray Train controller, which calls it once every worker has reported an
epoch and the checkpoint is persisted. A worker group that restarts from checkpoint K repeats the
epochs after K, but their lost first attempts were never committed and so never logged: the history
holds every committed epoch once, however often the workers failed. The final evaluation's pictures
travel in the checkpoint and are logged from there. (What is still queued during a tracking outage
is lost if the controller itself dies, that is if the whole job does.)
"""

from __future__ import annotations

from pathlib import Path

from ray.train import UserCallback

from reid_platform.console import say
from reid_platform.tracking.mlflow_run import RunLogger
from reid_platform.train.record import EVALUATION_DIR, EpochRecord


class EpochMetricsToMlflow(UserCallback):
    def __init__(self, tracking_uri: str, run_id: str, outage_timeout_s: float):
        self.tracking_uri, self.run_id, self.outage_timeout_s = tracking_uri, run_id, outage_timeout_s
        self._logger: RunLogger | None = None  # made in the controller: a thread does not pickle

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        record = EpochRecord.from_report(metrics[0])  # world rank 0's; every rank reports the same
        if record is None:
            return
        self._logger = self._logger or RunLogger(self.tracking_uri, self.run_id)
        self._logger.log_epoch(record)
        if record.pictures and checkpoint is not None:
            with checkpoint.as_directory() as directory:
                for name in record.pictures:
                    self._logger.log_artifact(Path(directory) / EVALUATION_DIR / name, EVALUATION_DIR)
        if record.last:
            # the controller ends with the run: the backlog of an outage must go out now
            if lost := self._logger.close(self.outage_timeout_s):
                say(f"warning: {lost}; the run's MLflow history is incomplete")
            self._logger = None
