"""`reid tune`: the space file and the search's options refused before anything starts (fast, no
Ray), and real searches on Ray Tune of tiny training runs: ASHA stopping a hopeless trial, the MLflow
parent and child runs and the registered best model, and a search resumed after its driver was killed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from reid_platform.cli import main
from reid_platform.cluster.jobs import build_submission
from reid_platform.config import load_config
from reid_platform.errors import ConfigError
from reid_platform.tune.options import SearchOptions, concurrency
from reid_platform.tune.space import load_space, with_values
from tests import DEMO_CONFIG, REPO
from tests.tiny_run import set_arguments, tiny_run

SPACE = {"loss.scale": {"loguniform": [16, 256]}, "train.decay_start_epochs": {"randint": [0, 3]},
         "input.images_per_identity": {"choice": [2, 4]}, "loss.label_smoothing": {"grid": [0.0, 0.1]}}  # fmt: skip


def write_space(path: Path, space: dict | str) -> Path:
    path.write_text(space if isinstance(space, str) else yaml.safe_dump(space))
    return path


def test_a_space_becomes_tune_domains_drawing_what_it_says(tmp_path):
    from ray.tune.search.sample import Domain

    cfg = load_config(DEMO_CONFIG, ["train.epochs=3", "input.sampler=identity"])
    space = load_space(write_space(tmp_path / "space.yaml", SPACE), cfg)
    assert space.params() == {"space.loss.scale": "loguniform(16, 256)", "space.train.decay_start_epochs": "randint(0, 3)",
                              "space.input.images_per_identity": "choice(2, 4)", "space.loss.label_smoothing": "grid(0.0, 0.1)"}
    domains = space.to_tune()
    assert domains["loss.label_smoothing"] == {"grid_search": [0.0, 0.1]}
    drawn = {key: [domain.sample() for _ in range(400)] for key, domain in domains.items() if isinstance(domain, Domain)}
    assert set(drawn["train.decay_start_epochs"]) == {0, 1, 2, 3}  # both ends of randint included
    assert set(drawn["input.images_per_identity"]) == {2, 4}
    assert 16 <= min(drawn["loss.scale"]) < 32 and 128 < max(drawn["loss.scale"]) <= 256  # log scale: both octaves
    trial = with_values(cfg, {key: values[0] for key, values in drawn.items()}, "trial")
    assert (trial.loss.scale, trial.train.decay_start_epochs) == (drawn["loss.scale"][0], drawn["train.decay_start_epochs"][0])


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"loss.scal": {"uniform": [1, 2]}}, "'loss.scal' is not a config key"),
        ({"loss": {"choice": [1]}}, "'loss' is a section"),
        ({"train.epochs": {"uniform": [2, 8]}}, "train.epochs is an integer: uniform draws floats; use randint"),
        ({"loss.name": {"loguniform": [1, 2]}}, "loss.name is not a number: loguniform draws floats; use choice"),
        ({"loss.margin": {"uniform": [0.2, 0.6]}}, "loss.margin: the config refuses 0.6 of uniform [0.2, 0.6]: "
                                                   "loss: loss.margin must be below 0.5 for circle"),
        ({"train.lr": {"uniform": [0, 0.1]}}, "train.lr: the config refuses 0 of uniform [0, 0.1]: train.lr: Input should be greater than 0"),
        ({"train.decay_start_epochs": {"randint": [0, 9]}}, "the config refuses 9 of randint [0, 9]: train.decay_start_epochs (9) must lie"),
        ({"loss.pairwise.weight": {"uniform": [0.5, 2]}}, "loss.pairwise.weight: loss.pairwise is not set in the config"),
        ({"loss.scale": {"normal": [1, 2]}}, "loss.scale: give one distribution, {NAME: VALUES}"),
        ({"train.lr": {"loguniform": [1e-3, 1e-4]}}, "train.lr: loguniform needs LOW < HIGH and LOW > 0"),
        ({"input.sampler": {"choice": []}}, "input.sampler: choice takes a list of values"),
        ("- loss.scale", "a search space is a mapping of config keys to distributions"),
    ],
)  # fmt: skip
def test_a_bad_space_is_one_line_exit_2_before_anything_starts(space, message, tmp_path, capsys):
    path = write_space(tmp_path / "space.yaml", space)
    assert main(["tune", str(DEMO_CONFIG), "--space", str(path), "--set", "train.epochs=5"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"reid: config error: {path}: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--metric", "loss"], "--metric loss: no run reports it; choose one of mAP, rank1, rank5, mINP"),
     (["--time-budget", "-5"], "--time-budget -5: must be a positive number of seconds")],
)  # fmt: skip
def test_bad_search_flags_are_one_line_exit_2(flags, message, tmp_path, capsys):
    path = write_space(tmp_path / "space.yaml", {"loss.scale": {"loguniform": [16, 256]}})
    assert main(["tune", str(DEMO_CONFIG), "--space", str(path), *flags]) == 2
    assert capsys.readouterr().err == f"reid: config error: {message}\n"


def test_trials_at_once_follow_the_clusters_resources():
    memory = {"memory": 64 * 1024**3}
    gpu_trial = load_config(DEMO_CONFIG, ["scaling.use_gpu=true", "scaling.num_workers=2", "scaling.cpus_per_worker=4"])
    assert concurrency(gpu_trial, SearchOptions(), {"CPU": 256, "GPU": 16, **memory}) == 8  # 8 trials of 2 GPUs
    assert concurrency(gpu_trial, SearchOptions(), {"CPU": 20, "GPU": 16, **memory}) == 2  # CPU-bound: 2 x 8 CPUs
    demo = load_config(DEMO_CONFIG)  # 2 workers of 1 CPU: this machine holds one trial at a time
    assert concurrency(demo, SearchOptions(), {"CPU": 2, **memory}) == 1
    assert concurrency(demo, SearchOptions(max_concurrent=2), {"CPU": 5, **memory}) == 2
    with pytest.raises(ConfigError, match=r"--max-concurrent 3: the cluster holds 1 trial\(s\) at once \(each needs 2 CPU; it has 2 CPU\)"):
        concurrency(demo, SearchOptions(max_concurrent=3), {"CPU": 2, **memory})
    with pytest.raises(ConfigError, match="a trial needs 2 CPU, 2 GPU .* but the cluster has 8 CPU, 1 GPU"):
        concurrency(load_config(DEMO_CONFIG, ["scaling.use_gpu=true"]), SearchOptions(), {"CPU": 8, "GPU": 1, **memory})


def test_submit_tune_runs_the_search_entrypoint_with_a_checked_space(tmp_path):
    checkout = tmp_path / "checkout"  # the uploaded working directory: the config, the space, the entrypoints
    (checkout / "jobs").mkdir(parents=True)
    for entrypoint in ("train.py", "tune.py"):
        (checkout / "jobs" / entrypoint).write_text((REPO / "jobs" / entrypoint).read_text())
    config = checkout / "demo.yaml"
    config.write_text(DEMO_CONFIG.read_text())
    space = write_space(checkout / "space.yaml", {"train.lr": {"loguniform": [1e-4, 1e-3]}})
    sqlite = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "train.epochs=4"]
    job = build_submission(config, sqlite, checkout, "http://127.0.0.1:8265", search=(space, ["--trials", "3"]))
    assert job.entrypoint.startswith(f"python jobs/tune.py demo.yaml --space space.yaml --trials 3 --base-dir {checkout} ")
    assert job.metadata["reid.space"] == "space.yaml"
    write_space(space, {"train.epochs": {"uniform": [2, 4]}})
    with pytest.raises(ConfigError, match="train.epochs is an integer"):
        build_submission(config, sqlite, checkout, "http://127.0.0.1:8265", search=(space, []))
    outside = write_space(tmp_path / "space.yaml", {"train.lr": {"choice": [1e-3]}})
    with pytest.raises(ConfigError, match="the space file must be inside the uploaded working directory"):
        build_submission(config, sqlite, checkout, "http://127.0.0.1:8265", search=(outside, []))


HOPELESS_LR = 1e-9  # the config refuses a rate of 0: this one learns nothing in a few steps either
ASHA_SPACE = {"train.lr": {"grid": [3e-3, 2e-3, 1e-3, HOPELESS_LR]}, "loss.margin": {"uniform": [0.2, 0.3]}}


def tiny_search(shards: Path, work: Path, name: str, tracking_uri: str, *extra: str) -> list[str]:
    """Overrides of a search's base run: tiny_run's, Adam at 1e-3 (it learns within an epoch of these
    few steps), its own MLflow experiment and registered model."""
    return tiny_run(
        shards, work, name, 2, "input.batch_size=16", "train.lr=0.001", f"tracking.uri={tracking_uri}",
        "tracking.experiment=tune-tests", "tracking.registered_model=reid-tuned", "tracking.system_metrics=false", *extra,
    )  # fmt: skip


@pytest.fixture(scope="module")
def searched(tiny_shards, mlflow_server, tmp_path_factory):
    """ASHA over 4 trials of 2 epochs, one at a time (1 worker of 2 CPUs on this machine's 2), the
    hopeless one last; the search started in this process, as `reid tune` does."""
    import ray

    from reid_platform.tune.search import search

    work = tmp_path_factory.mktemp("asha")
    cfg = load_config(DEMO_CONFIG, tiny_search(tiny_shards, work, "asha", mlflow_server.uri,
                                               "scaling.num_workers=1", "scaling.cpus_per_worker=2"))  # fmt: skip
    space = load_space(write_space(work / "space.yaml", ASHA_SPACE), cfg)
    try:
        yield cfg, search(cfg, DEMO_CONFIG, space, SearchOptions(trials=1))
    finally:
        ray.shutdown()


def child_runs(client: MlflowClient, parent_run_id: str) -> dict:
    """The search's child runs by trial id."""
    parent = client.get_run(parent_run_id)
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {child.data.tags["tune.trial_id"]: child for child in children}


@pytest.mark.ray
def test_asha_stops_the_hopeless_trial_by_its_rule(searched):
    import numpy as np

    cfg, outcome = searched
    client = MlflowClient(cfg.tracking.uri)
    children = child_runs(client, outcome.parent_run_id)
    assert sorted(children) == sorted(row.trial_id for row in outcome.trials) and len(children) == 4
    # ASHA's rule, from the children's logged mAP: the trials ran one at a time in the grid's order; at
    # the rung (epoch 1) a trial is stopped when below the median of the trials that reached it before
    rung = [client.get_metric_history(children[row.trial_id].info.run_id, "mAP")[1] for row in outcome.trials]
    assert [m.step for m in rung] == [1] * 4 and [row.values["train.lr"] for row in outcome.trials] == [3e-3, 2e-3, 1e-3, HOPELESS_LR]
    expected = ["finished"] + [
        "stopped early" if rung[k].value < np.nanpercentile([m.value for m in rung[:k]], 50) else "finished" for k in range(1, 4)
    ]
    assert [row.status for row in outcome.trials] == expected
    assert expected[-1] == "stopped early"  # the hopeless trial, below every trial that learned
    for row in outcome.trials:
        child = children[row.trial_id]
        history = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "mAP")}
        assert list(history) == list(range(row.epoch + 1)) and history[row.epoch] == pytest.approx(row.metrics["mAP"])
        assert float(child.data.params["train.lr"]) == row.values["train.lr"]  # each child has its own params
        assert float(child.data.params["loss.margin"]) == row.values["loss.margin"]
        if row.status == "finished":
            assert child.info.status == "FINISHED" and "tune.stopped_early" not in child.data.tags and row.epoch == 2
        else:
            assert child.info.status == "KILLED" and child.data.tags["tune.stopped_early"] == "after epoch 1 of 2"


@pytest.mark.ray
def test_the_parent_run_holds_the_search_and_the_best_model_is_registered(searched, tiny_shards, tmp_path):
    cfg, outcome = searched
    client = MlflowClient(cfg.tracking.uri)
    parent = client.get_run(outcome.parent_run_id)
    finished = [row for row in outcome.trials if row.status == "finished"]
    assert outcome.best == max(finished, key=lambda row: row.metrics["mAP"])
    assert parent.info.status == "FINISHED" and parent.info.run_name == "asha-tune"
    params = parent.data.params
    assert params["space.train.lr"] == "grid(0.003, 0.002, 0.001, 1e-09)" and params["space.loss.margin"] == "uniform(0.2, 0.3)"
    assert params["search.scheduler"] == "asha" and params["search.metric"] == "mAP" and params["search.max_concurrent"] == "1"
    assert float(params["best.train.lr"]) == outcome.best.values["train.lr"]
    assert parent.data.metrics["best_mAP"] == pytest.approx(outcome.best.metrics["mAP"])
    assert parent.data.metrics["trials_stopped_early"] == sum(row.status == "stopped early" for row in outcome.trials)
    artifacts = {a.path: a.file_size for a in client.list_artifacts(outcome.parent_run_id)}
    assert artifacts["trials.png"] > 5000 and "best_config.yaml" in artifacts
    best_yaml = Path(client.download_artifacts(outcome.parent_run_id, "best_config.yaml", str(tmp_path))).read_text()
    assert yaml.safe_load(best_yaml) == yaml.safe_load(with_values(cfg, outcome.best.values, "best").to_yaml())
    best_child = child_runs(client, outcome.parent_run_id)[outcome.best.trial_id]
    version = client.get_model_version_by_alias("reid-tuned", "champion")
    assert version.run_id == best_child.info.run_id and len(client.search_model_versions("name = 'reid-tuned'")) == 1
    # the registered model is the best trial's last epoch: evaluated again here, its logged mAP
    uri = ["--tracking-uri", cfg.tracking.uri]
    assert main(["eval", "--model", "reid-tuned@champion", "--data", str(tiny_shards), "--out", str(tmp_path), *uri]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text())["mAP"] == pytest.approx(outcome.best.metrics["mAP"], abs=1e-6)


@pytest.mark.ray
def test_a_search_resumes_after_its_driver_is_killed(tiny_shards, tmp_path):
    """`reid tune` as a user runs it (its own Ray), killed with its whole process tree once the first
    trial finished and the second committed an epoch; the same command then runs only what was left:
    the second trial from its checkpoint, the first not at all."""
    import psutil

    from tests.services import REID, wait_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = tiny_search(tiny_shards, tmp_path, "resume", uri, "scaling.num_workers=2", "scaling.cpus_per_worker=1",
                            "input.batch_size=8")  # 2 workers: multi-worker trials; the same global batch  # fmt: skip
    space = write_space(tmp_path / "space.yaml", {"loss.margin": {"grid": [0.2, 0.3]}})
    command = [REID, "tune", str(DEMO_CONFIG), "--space", str(space), "--trials", "1", "--scheduler", "none",
               *set_arguments(overrides)]
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
    client = MlflowClient(uri)

    def progress() -> list | None:
        """(trial id, status, epochs logged) of each child run, once the second trial committed an epoch."""
        try:
            runs = client.search_runs([client.get_experiment_by_name("tune-tests").experiment_id], "tags.`tune.trial_id` != ''")
        except Exception:  # noqa: BLE001 - the store is being created
            return None
        rows = sorted((r.data.tags["tune.trial_id"], r.info.status, len(client.get_metric_history(r.info.run_id, "epoch")))
                      for r in runs)  # fmt: skip
        return rows if len(rows) == 2 and rows[0][1] == "FINISHED" and rows[1][2] >= 1 else None

    try:
        before = wait_for(progress, "the first trial to finish and the second to commit an epoch", 600, interval=1)
    finally:
        tree = [first, *psutil.Process(first.pid).children(recursive=True)]
        for process in tree:  # the driver and everything it started (its Ray cluster), as a crash would
            process.send_signal(signal.SIGKILL)
        psutil.wait_procs(tree, timeout=30)
    assert before[0][2] == 2 and before[1][1] == "RUNNING"
    second = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
    out = second.stdout
    assert "resuming search resume-tune" in out
    assert "before training:" not in out  # no trial started from the beginning: the first is not run again
    assert f"resume-tune-{before[1][0]}" in out and "resumed after epoch 1 on 2 workers" in out
    after = progress()
    assert [(trial, status) for trial, status, _ in after] == [(before[0][0], "FINISHED"), (before[1][0], "FINISHED")]
    assert [epochs for _, _, epochs in after] == [2, 2]  # each epoch logged once, the interrupted one's included
    best = load_config(write_space(tmp_path / "best.yaml", out[out.index("# the best trial's config"):]))  # as printed
    assert best.loss.margin in (0.2, 0.3) and best.run.name == "resume"
