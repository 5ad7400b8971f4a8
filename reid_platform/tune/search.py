"""The driver of a search: a Ray Tune ``Tuner`` whose trials are training runs (``trial.py``), an
MLflow parent run around them, and the best trial's model registered at the end.

Starting the same search again (same ``run.name`` and ``run.storage_path``) resumes it: Tune restores
its state from ``run.storage_path/<run.name>-tune``, finished trials are not run again and unfinished
ones resume from their Ray Train checkpoints (a trial's run name is the search's and its trial id).

Trials share the cluster through Ray's resources. A trial's actor is only its run's driver (no CPU,
a little memory); its workers are reserved by Ray Train as a placement group when the run starts.
So as many trials run at once as the cluster holds workers for (``concurrent_capacity``), or fewer
(``max_concurrent``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import ray
import ray.tune
from mlflow.tracking import MlflowClient

from reid_platform.config import RunConfig
from reid_platform.console import say
from reid_platform.data.manifest import ShardDataset
from reid_platform.run.launcher import MLFLOW_RUN_ID_FILE, check_inputs, connect_ray
from reid_platform.storage import files, s3
from reid_platform.tracking.mlflow_run import call_with_retries, dataset_inputs, finish_run, open_run
from reid_platform.tracking.registry import register_model
from reid_platform.tune.options import DRIVER_MEMORY, METRICS, SearchOptions, check_options, concurrency
from reid_platform.tune.plots import trials_picture
from reid_platform.tune.space import Space, with_values
from reid_platform.tune.trial import PARENT_TAG, STOPPED_TAG, TIME_ATTR, TRIAL_TAG, TrialSetup, run_trial

REDUCTION_FACTOR = 2  # ASHA keeps the better half of the trials at each rung
# Tune snapshots its state every few seconds (its default: 10 s at least), so that a search stopped
# right after a trial finished does not run that trial again when it resumes.
STATE_SNAPSHOT_S = "2"


@dataclass(frozen=True)
class TrialRow:
    trial_id: str
    values: dict
    metrics: dict[str, float]  # the last evaluated epoch's (empty when none was)
    epoch: int  # the last evaluated epoch
    status: Literal["finished", "stopped early", "failed"]


@dataclass(frozen=True)
class SearchOutcome:
    best: TrialRow
    best_config: RunConfig  # the config as given, with the best trial's values
    trials: list[TrialRow]
    parent_run_id: str
    registered_model: str | None
    wall_s: float


def search_name(cfg: RunConfig) -> str:
    return f"{cfg.run.name}-tune"


def searched_config(cfg: RunConfig, options: SearchOptions) -> RunConfig:
    """The base config of every trial: with ASHA, an evaluation every epoch unless the config sets
    its own (ASHA compares trials at evaluated epochs, and every trial evaluates the same ones)."""
    if options.scheduler == "asha" and not cfg.train.eval_every:
        say("train.eval_every is 0 (evaluate at the end only): trials evaluate every epoch, for ASHA to compare them")
        return cfg.model_copy(update={"train": cfg.train.model_copy(update={"eval_every": 1})})
    return cfg


def asha(cfg: RunConfig):
    """ASHA at the evaluated epochs (on TuneConfig's metric). Its last rung comes before the last epoch:
    a trial is never stopped on its final result, when its run is publishing its model and closing."""
    every, epochs = cfg.train.eval_every, cfg.train.epochs
    if epochs - every < every:  # a single evaluated epoch: nothing to compare early
        say(f"ASHA: with {epochs} epochs evaluated every {every}, no trial can be stopped early; every trial runs to the end")
        return None
    from ray.tune.schedulers import ASHAScheduler

    return ASHAScheduler(
        time_attr=TIME_ATTR, grace_period=every, max_t=epochs - every,
        reduction_factor=REDUCTION_FACTOR, stop_last_trials=False,
    )  # fmt: skip


class TrialsToMlflow(ray.tune.Callback):
    """In the search's driver: each trial's end is a line, and its MLflow run is marked. A trial
    stopped before its last epoch (by the scheduler or the time budget) keeps its run, tagged
    ``tune.stopped_early`` at once and marked KILLED (again at the end of the search: the trial's own
    driver, stopped by Tune like a failure, may mark its run FAILED on its way out)."""

    def __init__(self, cfg: RunConfig, parent_run_id: str, metric: str):
        self.cfg, self.parent_run_id, self.metric = cfg, parent_run_id, metric

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        last = trial.last_result or {}
        epoch, epochs = int(last.get(TIME_ATTR, 0)), self.cfg.train.epochs
        score = f"{self.metric} {last[self.metric]:.2%} at epoch {epoch}" if self.metric in last else "no evaluated epoch"
        if epoch >= epochs:
            say(f"trial {trial.trial_id} finished: {score} ({_values_text(trial.config)})")
            return
        say(f"trial {trial.trial_id} stopped early: {score} of {epochs} ({_values_text(trial.config)})")
        self.end_child_run(trial.trial_id, "KILLED", stopped_after(epoch, epochs))

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        say(f"trial {trial.trial_id} failed ({_values_text(trial.config)}); its error is above")
        self.end_child_run(trial.trial_id, "FAILED")

    def end_child_run(self, trial_id: str, status: str, stopped_after: str | None = None) -> None:
        """The trial's MLflow run ended as ``status`` (its own driver is gone, or was stopped)."""
        uri = self.cfg.tracking.uri
        run_id = _child_run_id(uri, self.parent_run_id, trial_id)
        if run_id is None:  # it failed before its run was opened
            return
        if stopped_after:
            MlflowClient(uri).set_tag(run_id, STOPPED_TAG, stopped_after)
        finish_run(uri, run_id, status)


def stopped_after(epoch: int, epochs: int) -> str:
    return f"after epoch {epoch} of {epochs}"


def _values_text(values: dict) -> str:
    return ", ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}" for key, value in values.items())


def _child_run_id(uri: str, parent_run_id: str, trial_id: str) -> str | None:
    client = MlflowClient(uri)
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    found = client.search_runs(
        [experiment_id], f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'"
    )
    return found[0].info.run_id if found else None


def _open_parent_run(cfg: RunConfig, config_path: Path, space: Space, options: SearchOptions, concurrent: int) -> str:
    """The search's MLflow run (reopened when the search resumes): the space, the scheduler and the
    base config as params, the config files as artifacts."""
    id_file = cfg.run.storage_path / search_name(cfg) / MLFLOW_RUN_ID_FILE
    known = files.read_text(id_file).strip() if files.is_file(id_file) else None
    params = {
        **space.params(), "search.scheduler": options.scheduler, "search.metric": options.metric,
        "search.trials": str(options.trials), "search.max_concurrent": str(concurrent),
        "search.time_budget_s": str(options.time_budget_s), **{f"base.{k}": v for k, v in cfg.flat().items()},
    }  # fmt: skip
    note = (
        f"Search of {options.trials} trial(s) over {', '.join(d.key for d in space.dimensions)} of {config_path.name} "
        f"({space.path.name}), {options.scheduler} on {options.metric}; each trial is a child run."
    )
    texts = {f"config/{config_path.name}": config_path.read_text(), f"config/{space.path.name}": space.path.read_text(),
             "config/base_resolved.yaml": cfg.to_yaml()}  # fmt: skip
    dataset = ShardDataset.open(cfg.data.shards)
    run_id = open_run(cfg.tracking.uri, cfg.tracking.experiment, search_name(cfg), params, note, dataset_inputs(dataset),
                      texts, known)  # fmt: skip
    files.write_text(id_file, run_id)
    return run_id


def _tuner(cfg: RunConfig, setup: TrialSetup, space: Space, options: SearchOptions, concurrent: int, callback):
    storage_path, storage_filesystem = files.for_arrow(cfg.run.storage_path)
    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(run_trial, setup=setup), {"cpu": 0, "memory": DRIVER_MEMORY}
    )
    experiment, filesystem = files.for_arrow(cfg.run.storage_path / search_name(cfg))
    if ray.tune.Tuner.can_restore(experiment, storage_filesystem=filesystem):
        say(f"resuming search {search_name(cfg)} from {cfg.run.storage_path / search_name(cfg)}")
        return ray.tune.Tuner.restore(experiment, trainable, resume_errored=True, storage_filesystem=filesystem)
    scheduler = asha(cfg) if options.scheduler == "asha" else None  # on TuneConfig's metric
    return ray.tune.Tuner(
        trainable,
        param_space=space.to_tune(),
        tune_config=ray.tune.TuneConfig(
            metric=options.metric, mode="max", scheduler=scheduler, num_samples=options.trials,
            max_concurrent_trials=concurrent, time_budget_s=options.time_budget_s, reuse_actors=False,
            trial_dirname_creator=lambda trial: trial.trial_id,
        ),
        run_config=ray.tune.RunConfig(
            name=search_name(cfg), storage_path=storage_path, storage_filesystem=storage_filesystem,
            callbacks=[callback], verbose=0,
        ),
    )  # fmt: skip


def _rows(results, epochs: int) -> list[TrialRow]:
    rows = []
    for result in results:
        last = result.metrics or {}
        epoch = int(last.get(TIME_ATTR, 0))
        status = "failed" if result.error else ("finished" if epoch >= epochs else "stopped early")
        trial_id = last.get("trial_id") or Path(result.path).name
        rows.append(TrialRow(trial_id, dict(result.config), {k: last[k] for k in METRICS if k in last}, epoch, status))
    return sorted(rows, key=lambda row: row.trial_id)


def _best_model(uri: str, parent_run_id: str, best: TrialRow, trial_run_name: str, epochs: int):
    """(run id, LoggedModel) the best trial's run published for its last epoch."""
    client = MlflowClient(uri)
    run_id = _child_run_id(uri, parent_run_id, best.trial_id)
    experiment_id = client.get_run(run_id).info.experiment_id
    name = f"{trial_run_name}-epoch-{epochs}"
    (model,) = [m for m in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}'")
                if m.name == name]  # fmt: skip
    return run_id, model


def _log_summary(cfg: RunConfig, parent_run_id: str, space: Space, rows: list[TrialRow], best: TrialRow,
                 best_config: RunConfig, best_run_id: str, metric: str) -> None:  # fmt: skip
    client = MlflowClient(cfg.tracking.uri)
    for key, value in best.values.items():
        client.log_param(parent_run_id, f"best.{key}", value)
    for key, value in best.metrics.items():
        client.log_metric(parent_run_id, f"best_{key}", value)
    client.log_metric(parent_run_id, "trials_finished", sum(row.status == "finished" for row in rows))
    client.log_metric(parent_run_id, "trials_stopped_early", sum(row.status == "stopped early" for row in rows))
    client.set_tag(parent_run_id, "best_trial", best.trial_id)
    client.set_tag(parent_run_id, "best_run_id", best_run_id)
    client.log_text(parent_run_id, best_config.to_yaml(), "best_config.yaml")
    client.log_text(parent_run_id, json.dumps([row.__dict__ for row in rows], indent=2), "trials.json")
    picture = trials_picture(rows, space, metric, cfg.run.output_dir / "trials.png")
    client.log_artifact(parent_run_id, str(picture))


def search(cfg: RunConfig, config_path: Path, space: Space, options: SearchOptions,
           base_dir: Path | None = None) -> SearchOutcome:  # fmt: skip
    """Run (or resume) the search of ``space`` around ``cfg``; relative paths are taken from ``base_dir``."""
    started = time.perf_counter()
    check_options(options)
    given = cfg
    cfg = searched_config(cfg, options).with_absolute_paths(base_dir or Path.cwd())
    s3.use_endpoint(cfg.data.s3_endpoint)
    check_inputs(cfg)
    connect_ray()
    concurrent = concurrency(cfg, options, ray.cluster_resources())
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", STATE_SNAPSHOT_S)  # read when the Tuner's controller starts
    uri = cfg.tracking.uri
    parent_run_id = _open_parent_run(cfg, config_path, space, options, concurrent)
    setup = TrialSetup(cfg, search_name(cfg), parent_run_id, config_path.name, config_path.read_text())
    say(f"search {search_name(cfg)}: {options.trials} trial(s), {concurrent} at once, {options.scheduler} on {options.metric}; "
        f"MLflow run {parent_run_id}")  # fmt: skip
    trials_to_mlflow = TrialsToMlflow(cfg, parent_run_id, options.metric)
    tuner = _tuner(cfg, setup, space, options, concurrent, trials_to_mlflow)
    try:
        results = tuner.fit()
    except BaseException:
        finish_run(uri, parent_run_id, "FAILED")
        raise
    rows = _rows(results, cfg.train.epochs)
    for row in rows:  # their actors are gone now: nothing marks their runs after this
        if row.status == "stopped early":
            trials_to_mlflow.end_child_run(row.trial_id, "KILLED", stopped_after(row.epoch, cfg.train.epochs))
    finished = [row for row in rows if row.status == "finished" and options.metric in row.metrics]
    if not finished:
        finish_run(uri, parent_run_id, "FAILED")
        raise RuntimeError(f"search {search_name(cfg)}: no trial trained all its epochs ({len(rows)} trial(s))")
    best = max(finished, key=lambda row: row.metrics[options.metric])
    best_config = with_values(given, best.values, f"trial {best.trial_id}")
    trial_cfg = setup.trial_config(best.values, best.trial_id)
    best_run_id, model = _best_model(uri, parent_run_id, best, trial_cfg.run.name, cfg.train.epochs)
    cfg.run.output_dir.mkdir(parents=True, exist_ok=True)
    (cfg.run.output_dir / "best.yaml").write_text(best_config.to_yaml())
    patience = cfg.tracking.outage_timeout_s
    call_with_retries(lambda: _log_summary(cfg, parent_run_id, space, rows, best, best_config, best_run_id, options.metric),
                      "logging the search's summary", uri, patience)  # fmt: skip
    registered = None
    if name := cfg.tracking.registered_model:
        call_with_retries(lambda: register_model(uri, best_run_id, model.artifact_location, name, cfg.tracking.alias,
                                                 model.model_id), "registering the best model", uri, patience)  # fmt: skip
        registered = f"{name}@{cfg.tracking.alias}"
    finish_run(uri, parent_run_id)
    return SearchOutcome(best, best_config, rows, parent_run_id, registered, time.perf_counter() - started)
