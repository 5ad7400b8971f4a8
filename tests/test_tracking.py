"""The tracking edge without a cluster: URI redaction, reachability checks, the logging backlog, and
what `reid submit` refuses before it contacts any server."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from ray._private.runtime_env.packaging import _get_excludes  # the matcher of Ray's uploads (pinned Ray)

from reid_platform.cluster.jobs import build_submission
from reid_platform.cluster.local import free_port
from reid_platform.errors import ConfigError, TrackingUnavailable
from reid_platform.tracking.mlflow_run import RunLogger
from reid_platform.tracking.server import check_reachable, has_password, redact
from reid_platform.train.record import EpochRecord

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://alice:s3cret@mlflow.example.com/", "https://alice:***@mlflow.example.com/"),
        ("postgresql://mlflow:pa:ss@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("http://bob:p@ss@host:5000/api", "http://bob:***@host:5000/api"),  # an unencoded '@' in it
        ("API request to http://u:pw@h/api failed", "API request to http://u:***@h/api failed"),  # inside a message
        ("http://token@host:5000", "http://token@host:5000"),  # a user name alone is not a secret
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
    ],
)
def test_redact_hides_passwords_only(uri, shown):
    assert redact(uri) == shown
    assert has_password(uri) == (shown != uri) or " " in uri


def test_unreachable_servers_and_missing_folders_are_named(tmp_path):
    with pytest.raises(TrackingUnavailable, match=r"MLflow tracking server http://127.0.0.1:\d+ is unreachable"):
        check_reachable(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(TrackingUnavailable, match=f"folder {tmp_path / 'nope'} does not exist"):
        check_reachable(f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}")
    check_reachable(f"sqlite:///{tmp_path / 'mlflow.db'}")  # a new file in an existing folder is fine


def test_logger_sends_in_order_and_reports_a_server_that_never_answers(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("t")).info.run_id
    logger = RunLogger(uri, run_id)
    picture = tmp_path / "picture.txt"
    picture.write_text("x")
    first = EpochRecord(
        epoch=1, epochs=2, world_size=2, step_losses=[(1, 3.0), (2, 2.5)], lr=0.1, images_per_s=10.0,
        evaluation=None, before_training={"mAP": 0.05, "rank1": 0.1},
    )  # fmt: skip
    second = dataclasses.replace(first, epoch=2, step_losses=[(3, 2.0), (4, 1.5)], evaluation={"mAP": 0.5, "rank1": 0.6})
    logger.log_epoch(first)
    logger.log_epoch(second)
    logger.log_artifact(picture, "evaluation")
    picture.unlink()  # the logger kept its own copy
    assert logger.close(timeout_s=60) is None
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "step_loss")] == [(1, 3.0), (2, 2.5), (3, 2.0), (4, 1.5)]
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")] == [(1, 2.75), (2, 1.75)]
    # the untrained model is step 0 of the same curve; the run's latest mAP is the final one
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "mAP")] == [(0, 0.05), (2, 0.5)]
    assert client.get_run(run_id).data.metrics["mAP"] == 0.5
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")] == ["evaluation/picture.txt"]

    offline = RunLogger(f"http://127.0.0.1:{free_port()}", run_id, retry_delay_s=0.05, max_delay_s=0.1)
    offline.log_metrics({"loss": 1.0}, step=1)  # returns at once: training does not wait
    assert "stayed unavailable: 1 logging calls were not sent" in offline.close(timeout_s=1.0)


def test_submit_refuses_what_the_cluster_would_fail_on(tmp_path):
    config = REPO / "configs/demo.yaml"
    sqlite = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    with pytest.raises(ConfigError, match="data.shards, run.storage_path, run.output_dir relative, but"):
        build_submission(config, sqlite, REPO, "http://ray-head.example.com:8265")
    with pytest.raises(ConfigError, match="is remote"):  # through kubectl port-forward
        build_submission(config, sqlite, REPO, "http://127.0.0.1:8265", remote=True)
    with pytest.raises(ConfigError, match="must be inside the uploaded working directory"):
        build_submission(config, sqlite, tmp_path, "http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match=r"carries a password"):
        build_submission(config, ["tracking.uri=http://bob:pw@mlflow:5000"], REPO, "http://127.0.0.1:8265")
    with pytest.raises(ConfigError, match="train.epochs"):
        build_submission(config, ["train.epochs=0", *sqlite], REPO, "http://127.0.0.1:8265")

    local = build_submission(config, ["train.epochs=2", *sqlite], REPO, "http://127.0.0.1:8265")
    assert local.entrypoint == (
        f"python jobs/train.py configs/demo.yaml --base-dir {REPO} --set train.epochs=2 --set {sqlite[0]}"
    )
    assert local.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"] == sqlite[0].split("=", 1)[1]
    assert local.runtime_env["working_dir"] == str(REPO)
    # matched the way Ray matches them when it packs the working directory (gitignore syntax)
    excluded = _get_excludes(REPO, local.runtime_env["excludes"])
    assert excluded(REPO / ".venv") and excluded(REPO / "data") and excluded(REPO / "runs")
    assert not excluded(REPO / "reid_platform/data/pack.py") and not excluded(REPO / "jobs/train.py")
    absolute = [f"data.shards={tmp_path}", f"run.storage_path={tmp_path}", f"run.output_dir={tmp_path}", *sqlite]
    remote = build_submission(config, absolute, REPO, "http://ray-head.example.com:8265")
    assert "--base-dir" not in remote.entrypoint
