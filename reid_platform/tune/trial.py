"""One trial of a search: a training run like any other (``run/launcher.train``: the same engine,
workers, evaluation and MLflow logging), with the sampled values set in its config, its MLflow run a
child of the search's, and every evaluated epoch reported to Ray Tune.

Runs in the Tune trial's actor, which is only the Ray Train driver: the run's workers get their own
placement group from Ray Train, as in `reid train`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from reid_platform.config import RunConfig
from reid_platform.errors import RunAlreadyFinished
from reid_platform.run.launcher import committed_record, train
from reid_platform.train.record import EpochRecord
from reid_platform.tune.options import METRICS
from reid_platform.tune.space import with_values

TIME_ATTR = "epoch"  # what the scheduler counts a trial's progress in
TRIAL_TAG, SEARCH_TAG, STOPPED_TAG = "tune.trial_id", "tune.search", "tune.stopped_early"
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests the run under its parent


def tune_result(record: EpochRecord) -> dict[str, float]:
    """What Tune receives from an evaluated epoch: the epoch, the metrics, the training loss."""
    return {TIME_ATTR: record.epoch, "epochs": record.epochs, **{key: record.evaluation[key] for key in METRICS},
            "loss": record.loss}  # fmt: skip


class EvaluatedEpochsToTune(TuneReportCallback):
    """Ray Tune's report of Ray Train's results, of the evaluated epochs only: a scheduler compares
    trials on the metric, and an epoch without it is not a result to compare (Tune also refuses a
    result without the metric it searches on)."""

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        record = EpochRecord.from_report(metrics[0])
        if record is not None and record.evaluation:
            super().after_report(run_context, [tune_result(record)], checkpoint)


@dataclass(frozen=True)
class TrialSetup:
    """What every trial of a search shares (pickled to the trial actors)."""

    base: RunConfig  # absolute paths, train.eval_every as the scheduler needs it
    search_name: str
    parent_run_id: str
    config_name: str  # the config file as given: each run logs it
    config_text: str

    def trial_config(self, values: dict[str, Any], trial_id: str) -> RunConfig:
        """The base config with a trial's values, as its own run: its name (so that starting the search
        again resumes it from its checkpoints), its own output folder, and no registered model (the
        search registers the best trial's)."""
        name = f"{self.search_name}-{trial_id}"
        cfg = with_values(self.base, values, f"trial {trial_id}")
        return cfg.model_copy(update={
            "run": cfg.run.model_copy(update={"name": name, "output_dir": cfg.run.output_dir / "trials" / name}),
            "tracking": cfg.tracking.model_copy(update={"registered_model": None}),
        })  # fmt: skip


def run_trial(values: dict[str, Any], setup: TrialSetup) -> None:
    """The Tune trainable: train the trial's config, reporting every evaluated epoch to Tune."""
    trial_id = ray.tune.get_context().get_trial_id()
    cfg = setup.trial_config(values, trial_id)
    tags = {PARENT_TAG: setup.parent_run_id, SEARCH_TAG: setup.search_name, TRIAL_TAG: trial_id}
    with tempfile.TemporaryDirectory() as scratch:
        config_path = Path(scratch) / setup.config_name  # the run logs the file; this node may not have it
        config_path.write_text(setup.config_text)
        # a trial whose run trained all its epochs before the search was stopped (and before Tune
        # recorded its end) reports its last epoch again: this attempt trains nothing
        finished = committed_record(cfg)
        try:
            train(cfg, config_path, callbacks=[EvaluatedEpochsToTune()], run_tags=tags)
        except RunAlreadyFinished:
            pass
        if finished is not None and finished.last and finished.evaluation:
            ray.tune.report(tune_result(finished))
