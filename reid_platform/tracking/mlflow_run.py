"""MLflow from the edges: the driver opens the run, world rank 0 logs into it, the driver registers.

Workers never start their own runs: they get the run id, so every attempt of a restarted or resumed
job writes one continuous history.
"""

from __future__ import annotations

import time
from pathlib import Path

import yaml
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from reid_platform.config import RunConfig

PARAM_LIMIT = 100  # MLflow accepts at most 100 params per batch call


def open_run(cfg: RunConfig, config_path: Path, run_id: str | None = None) -> str:
    """Create (or reopen) the MLflow run of a training job; log params and the resolved config."""
    client = MlflowClient(cfg.tracking.uri)
    if run_id is None:
        experiment = client.get_experiment_by_name(cfg.tracking.experiment)
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(cfg.tracking.experiment)
        run_id = client.create_run(experiment_id, run_name=cfg.run.name).info.run_id
        params = [Param(key, value[:6000]) for key, value in sorted(cfg.flat().items())]
        for start in range(0, len(params), PARAM_LIMIT):
            client.log_batch(run_id, params=params[start : start + PARAM_LIMIT])
        client.log_text(run_id, cfg_yaml(cfg), "config/resolved.yaml")
        client.log_artifact(run_id, str(config_path), "config")
    else:
        client.update_run(run_id, status="RUNNING")
    return run_id


def cfg_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


class RunLogger:
    """Metric logging into an existing run (used by world rank 0)."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.client, self.run_id = MlflowClient(tracking_uri), run_id

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(
            self.run_id, metrics=[Metric(key, float(value), now, step) for key, value in metrics.items()]
        )

    def log_series(self, key: str, values: list[tuple[int, float]]) -> None:
        """Per-step values (step, value) of one metric in a single call."""
        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for step, value in values]
        for start in range(0, len(metrics), 1000):
            self.client.log_batch(self.run_id, metrics=metrics[start : start + 1000])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)


def finish_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status)
