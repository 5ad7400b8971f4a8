"""Epoch metrics go to MLflow when Ray Train commits the checkpoint they belong to.

This callback runs in the Ray Train controller, which calls it once every worker has reported an
epoch and the checkpoint is persisted. A worker group that restarts from checkpoint K repeats the
epochs after K, but their lost first attempts were never committed and so never logged: the history
holds every committed epoch once, however often the workers failed. (What is still queued during a
tracking outage is lost if the controller itself dies, that is if the whole job does.)
"""

from __future__ import annotations

import time

from ray.train import UserCallback

from reid_platform.console import say
from reid_platform.tracking.mlflow_run import RunLogger

STEP_LOSSES = "step_losses"  # [(step, loss), ...] of the epoch, reported by world rank 0
INITIAL = "initial_"  # evaluation before training, logged at step 0


class EpochMetricsToMlflow(UserCallback):
    def __init__(self, tracking_uri: str, run_id: str, last_epoch: int, outage_timeout_s: float):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self.last_epoch, self.outage_timeout_s = last_epoch, outage_timeout_s
        self._logger: RunLogger | None = None  # made in the controller: a thread does not pickle

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        reported = metrics[0]  # world rank 0's
        if "epoch" not in reported:
            return
        self._logger = self._logger or RunLogger(self.tracking_uri, self.run_id)
        epoch, now = int(reported["epoch"]), int(time.time() * 1000)
        if epoch == 1:
            initial = {key: value for key, value in reported.items() if key.startswith(INITIAL)}
            self._logger.log_metrics(initial, step=0, timestamp_ms=now)
        epoch_metrics = {k: v for k, v in reported.items() if k != STEP_LOSSES and not k.startswith(INITIAL)}
        self._logger.log_epoch(epoch_metrics, reported[STEP_LOSSES], now)
        if epoch == self.last_epoch:
            # the controller ends with the run: the backlog of an outage must go out now
            if lost := self._logger.close(self.outage_timeout_s):
                say(f"warning: {lost}; the run's MLflow history is incomplete")
            self._logger = None
