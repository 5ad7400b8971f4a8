"""The tracking edge without a cluster: redaction, reachability checks, the logging backlog, MLflow's
retry settings scoped to our calls, publishing after a lost reply, and what `reid submit` refuses
before it contacts any server."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import psutil
import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray._private.runtime_env.packaging import _get_excludes  # the matcher of Ray's uploads (pinned Ray)

from reid_platform.cli.ops import redacted_lines
from reid_platform.cluster.jobs import build_submission
from reid_platform.cluster.local import free_port
from reid_platform.errors import ConfigError, TrackingUnavailable
from reid_platform.redaction import carries_secret, redact
from reid_platform.run.epoch_log import log_epoch, worker_errors_line
from reid_platform.tracking.mlflow_run import ONE_ATTEMPT, RunLogger, call_with_retries, mlflow_settings
from reid_platform.tracking.registry import register_model
from reid_platform.tracking.server import check_reachable
from reid_platform.train.record import EpochRecord
from tests import DEMO_CONFIG, REPO
from tests.services import LossyProxy, closed_port_uri, silent_server


@pytest.mark.parametrize(
    ("uri", "shown"),
    [
        ("https://alice:s3cret@mlflow.example.com/", "https://alice:***@mlflow.example.com/"),
        ("postgresql://mlflow:pa:ss@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
        ("http://bob:p@ss@host:5000/api", "http://bob:***@host:5000/api"),  # an unencoded '@' in it
        ("http://u:a/b@h", "http://u:***@h"),  # an unencoded '/': urllib.parse alone takes it for a path
        ("http://user:MARK/x@y:z@127.0.0.1:5000", "http://user:***@127.0.0.1:5000"),  # '/', '@' and ':'
        ("http://u:p%2Fw%40d@h:5000/", "http://u:***@h:5000/"),  # percent-encoded
        ("http://u:p'w@[::1]:5000/api", "http://u:***@[::1]:5000/api"),  # a quote in it, an IPv6 host
        ("http://[::1]:5000/api", "http://[::1]:5000/api"),
        ("http://token@host:5000", "http://token@host:5000"),  # a user name alone is not a secret
        ("http://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("http://h:5000/api?token=abc&run=1", "http://h:5000/api?token=***&run=1"),  # a token in the query
        ("https://h/x?access_token=a&apiKey=b&page=2#top", "https://h/x?access_token=***&apiKey=***&page=2#top"),
        ("s3://b/m.pt?X-Amz-Credential=AK%2F1&X-Amz-Signature=f0&X-Amz-Date=1",
         "s3://b/m.pt?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1"),  # a signed URL
        ("http://u:pw@h:1/x?secret=s&keyword=k", "http://u:***@h:1/x?secret=***&keyword=k"),
        ("API request to http://u:pw@h/api failed", "API request to http://u:***@h/api failed"),  # inside a message
        ("from http://a:1@h and http://b:2@g/?sig=3.", "from http://a:***@h and http://b:***@g/?sig=***."),
        ("see http://u:pw@h:5000.", "see http://u:***@h:5000."),  # at the end of a sentence
    ],
)
def test_redact_hides_passwords_and_tokens_only(uri, shown):
    assert redact(uri) == shown
    assert redact(shown) == shown  # once is enough
    assert carries_secret(uri) == (shown != uri)  # refused exactly when redaction would change it


def test_redact_hides_the_values_of_secret_environment_variables(monkeypatch):
    secrets = {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI/K7MDENG", "AWS_SESSION_TOKEN": "FQoGZXIvYXdzEJr",
               "MLFLOW_TRACKING_PASSWORD": "hunter2/@:x", "MY_SERVICE_TOKEN": "tok-123456"}  # fmt: skip
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/tmp/where-the-token-is")  # where a secret is, not one
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice-the-user")
    monkeypatch.setenv("DB_PASSWORD", "mlflow")  # a compose file's default: too short to search texts for
    text = " ".join(f"{name}={value}" for name, value in secrets.items())
    text += " encoded hunter2%2F%40%3Ax, /tmp/where-the-token-is, alice-the-user, http://mlflow:5000"
    shown = redact(text)
    assert not [value for value in secrets.values() if value in shown] and "hunter2" not in shown
    assert "/tmp/where-the-token-is" in shown and "alice-the-user" in shown and "http://mlflow:5000" in shown


def test_log_records_of_any_library_are_redacted_where_they_are_made():
    """MLflow's own warnings quote the request's URI; its loggers have handlers of their own. In a
    fresh process, as a worker or the CLI installs it."""
    code = (
        "import logging, mlflow\n"
        "from reid_platform.redaction import redact_log_records\n"
        "redact_log_records(); redact_log_records()\n"
        "logging.getLogger('mlflow.utils.rest_utils').warning('API request to %s failed', 'http://u:pa/ss@h:5000/api')\n"
        "logging.basicConfig()\n"
        "logging.getLogger('somelib').error('token %s', 'http://h/x?token=abcdef')\n"
        "try:\n    raise RuntimeError('API request to http://u:tb/pw@h/api failed')\n"
        "except RuntimeError:\n    logging.getLogger('somelib').exception('failed')\n"
        "logging.getLogger('somelib').error('%d', 'not a number')\n"  # a library's own slip: reported as before
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert "API request to http://u:***@h:5000/api failed" in done.stderr
    assert "token http://h/x?token=***\n" in done.stderr
    assert "RuntimeError: API request to http://u:***@h/api failed" in done.stderr  # the traceback too
    assert "--- Logging error ---" in done.stderr  # the malformed call, as logging reports it without us
    assert not [secret for secret in ("pa/ss", "abcdef", "tb/pw") if secret in done.stderr]


def test_a_followed_log_is_redacted_a_whole_line_at_a_time():
    log = "epoch 1\nMLflow at http://u:pass/word@h:5000 is unavailable\nepoch 2"
    for cut in range(1, len(log)):  # wherever the job server's chunks end, a URI inside among them
        assert "".join(redacted_lines([log[:cut], log[cut:]])) == redact(log)
    assert "pass/word" not in redact(log)


def test_worker_errors_are_redacted_before_they_are_cut():
    line = worker_errors_line({0: RuntimeError("API request to http://u:" + "p" * 300 + "@h/api failed")})
    assert line.startswith("rank 0: RuntimeError: API request to http://u:***@h/api failed")


def test_unreachable_servers_and_missing_folders_are_named(tmp_path):
    with pytest.raises(TrackingUnavailable, match=r"MLflow tracking server http://127.0.0.1:\d+ is unreachable"):
        check_reachable(closed_port_uri(), timeout_s=2)
    with silent_server() as uri, pytest.raises(TrackingUnavailable, match="is unreachable .no answer within 1 s"):
        check_reachable(uri, timeout_s=1)
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
    log_epoch(logger, first)
    log_epoch(logger, second)
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


def test_mlflow_retry_settings_hold_only_inside_our_calls(monkeypatch):
    """MLflow retries a request for minutes by default; our retrying calls make one attempt each, and
    the process's environment is as it was outside them (a user's own setting included)."""
    for name in ONE_ATTEMPT:
        monkeypatch.delenv(name, raising=False)
    down = MlflowClient(closed_port_uri())
    started = time.monotonic()
    with mlflow_settings(ONE_ATTEMPT), pytest.raises(MlflowException, match="Connection refused"):
        down.get_run("0" * 32)
    assert time.monotonic() - started < 5  # MLflow's own 7 retries back off for minutes
    assert not set(ONE_ATTEMPT) & set(os.environ)

    with pytest.raises(TrackingUnavailable, match="kept failing"):
        call_with_retries(lambda: down.get_run("0" * 32), "reading a run", down.tracking_uri, timeout_s=0.2, first_delay_s=0.1)
    logger = RunLogger(down.tracking_uri, "0" * 32, retry_delay_s=0.05, max_delay_s=0.1)
    logger.log_metrics({"loss": 1.0}, step=1)
    assert logger.close(timeout_s=0.5) is not None  # still retrying its call when given up
    logger._sender.join(timeout=5)  # then it stops: no sender retries (and sets them) for the rest of the process
    assert not logger._sender.is_alive() and not set(ONE_ATTEMPT) & set(os.environ)

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    with mlflow_settings(ONE_ATTEMPT):
        assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "3"


def test_publishing_after_a_lost_reply_registers_one_version(mlflow_server):
    """The reply to creating the model version is lost on its way back (the server made the version):
    the publish call fails, is retried, finds the version and registers no second one."""
    client = MlflowClient(mlflow_server.uri)
    run_id = client.create_run(client.create_experiment(f"lost-reply-{time.time_ns()}")).info.run_id
    name, attempts = f"lost-reply-{time.time_ns()}", []
    with LossyProxy(mlflow_server.uri, lose_reply_to="/model-versions/create") as proxy:

        def publish() -> str:
            attempts.append(1)
            return register_model(proxy.uri, run_id, f"runs:/{run_id}/model", name, "champion")

        version = call_with_retries(publish, "publishing the model", proxy.uri, timeout_s=60, first_delay_s=0.1)
    assert proxy.lost == 1 and len(attempts) == 2  # the retry path ran
    (registered,) = client.search_model_versions(f"name = '{name}'")
    assert str(registered.version) == version and registered.run_id == run_id
    assert str(client.get_model_version_by_alias(name, "champion").version) == version


def test_submit_refuses_what_the_cluster_would_fail_on(tmp_path):
    config = DEMO_CONFIG
    sqlite = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    with pytest.raises(ConfigError, match="data.shards, run.storage_path, run.output_dir relative, but"):
        build_submission(config, sqlite, REPO, "http://ray-head.example.com:8265")
    with pytest.raises(ConfigError, match="is remote"):  # through kubectl port-forward
        build_submission(config, sqlite, REPO, "http://127.0.0.1:8265", remote=True)
    with pytest.raises(ConfigError, match="must be inside the uploaded working directory"):
        build_submission(config, sqlite, tmp_path, "http://127.0.0.1:8265")
    for uri in ("http://bob:pw-9f3@mlflow:5000", "http://bob:a/b-9f3@mlflow:5000", "http://mlflow:5000?token=t-9f3"):
        with pytest.raises(ConfigError, match=r"carries a password or token") as refused:
            build_submission(config, [f"tracking.uri={uri}"], REPO, "http://127.0.0.1:8265")
        assert "9f3" not in str(refused.value)
    with pytest.raises(ConfigError, match=r"--set data.shards=s3://reid-data/s\?X-Amz-Signature=\*\*\* carries"):
        build_submission(config, ["data.shards=s3://reid-data/s?X-Amz-Signature=f0f0", *sqlite], REPO, "http://127.0.0.1:8265")
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


def test_mlflow_serve_keeps_the_store_uri_out_of_the_server_processes_arguments(mlflow_server):
    """A database's URI holds its password, and every user of a machine can read a process's arguments
    (ps, /proc/PID/cmdline): `reid mlflow serve` hands it to mlflow server through the environment."""
    store = mlflow_server.root / "mlflow.db"
    MlflowClient(mlflow_server.uri).search_experiments()  # the server answers from that store
    assert store.is_file()
    server = psutil.Process(mlflow_server.process.pid)  # `reid mlflow serve`, replaced by mlflow server
    tree = [server, *server.children(recursive=True)]
    assert len(tree) > 1 and "server" in server.cmdline()  # mlflow and its web workers
    assert not [process.cmdline() for process in tree if str(store) in " ".join(process.cmdline())]
