"""No secret leaves through what the platform prints, logs or stores: a tracking URI whose password
holds '/', '@' and ':', a token in a URI's query and a secret environment variable, given to the
commands that show or use them (`reid config show`, `reid mlflow serve`, `reid submit`, a failing
and a finished `reid train`), are searched for in every output, the job log, and everything the run
left in MLflow (params, tags, metrics, artifacts, models) and on disk.

A password with an unencoded '/' is not a URI any client can use, so the finished run talks to a real
MLflow server with the same password percent-encoded; the commands that only print or refuse get it
as typed.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import uuid
from pathlib import Path
from urllib.parse import quote

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from reid_platform.cluster.local import free_port
from tests.services import REID, REPO, job_overrides, reid

MARKER = f"pw{uuid.uuid4().hex}"  # the password's distinctive part: found in its encoded form as well
PASSWORD = f"{MARKER}/x@y:z"
TOKEN = f"tk{uuid.uuid4().hex}"
ENV_SECRET = f"ev{uuid.uuid4().hex}"
SECRETS = (MARKER, TOKEN, ENV_SECRET)
SECRET_ENV = {"MLFLOW_TRACKING_USERNAME": "user", "MLFLOW_TRACKING_PASSWORD": ENV_SECRET}


def typed_uri(port: int) -> str:
    return f"http://user:{PASSWORD}@127.0.0.1:{port}?token={TOKEN}"


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [secret for secret in SECRETS if secret.encode() in data]


def leaks_in_files(root: Path) -> dict[str, list[str]]:
    found = {}
    for path in root.rglob("*"):
        if path.is_file() and (secrets := leaks(path.read_bytes())):
            found[str(path)] = secrets
    return found


def test_printing_and_refusing_commands_show_no_secret(tmp_path):
    uri = typed_uri(free_port())
    shown = reid("config", "show", "configs/demo.yaml", "--set", f"tracking.uri={uri}", env=SECRET_ENV)
    assert shown.returncode == 0 and "uri: http://user:***@127.0.0.1:" in shown.stdout
    from_env = reid("config", "show", "configs/demo.yaml", env={**SECRET_ENV, "MLFLOW_TRACKING_URI": uri})
    assert from_env.returncode == 0 and "?token=***" in from_env.stdout
    # a value a config error quotes, and the value of a secret variable a config holds
    quoted = reid("config", "show", "configs/demo.yaml", "--set", f"train.epochs={uri}", env=SECRET_ENV)
    assert quoted.returncode == 2 and "got 'http://user:***@" in quoted.stderr
    held = reid("config", "show", "configs/demo.yaml", "--set", f"run.name={ENV_SECRET}", env=SECRET_ENV)
    assert held.returncode == 0 and "  name: ***\n" in held.stdout

    refused = reid("submit", "configs/demo.yaml", "--address", "http://127.0.0.1:1", env={**SECRET_ENV, "MLFLOW_TRACKING_URI": uri})
    assert refused.returncode == 2 and "carries a password or token" in refused.stderr

    failed = reid("train", "configs/demo.yaml", "--set", f"tracking.uri={uri}", env=SECRET_ENV)  # no client can use it
    assert failed.returncode == 1 and failed.stderr.startswith("reid: error: MLflow tracking server http://user:***@")

    backend = f"postgresql://user:{PASSWORD}@127.0.0.1:{free_port()}/mlflow?password={TOKEN}"
    server = subprocess.Popen(
        [REID, "mlflow", "serve", "--port", str(free_port()), "--backend-store-uri", backend, "--artifacts", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        start_lines = [server.stdout.readline(), server.stdout.readline()]  # ours, before mlflow takes over
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    assert start_lines[0].startswith("MLflow tracking server on http://127.0.0.1:")
    assert "runs in postgresql://user:***@127.0.0.1:" in start_lines[0]

    outputs = [shown, from_env, quoted, held, refused, failed]
    assert not [leaks(done.stdout + done.stderr) for done in outputs if leaks(done.stdout + done.stderr)]
    assert not leaks("".join(start_lines))


@pytest.fixture(scope="module")
def finished(mlflow_server, tiny_shards, tmp_path_factory):
    """One tiny `reid train` (1 worker, 1 epoch, a registered model) of a config file that holds the
    URI with the password; (its output, the work folder, the MLflow run id)."""
    work = tmp_path_factory.mktemp("secret-run")
    config = tmp_path_factory.mktemp("secret-config") / "secretive.yaml"  # the one file that holds it
    uri = mlflow_server.uri.replace("http://", f"http://user:{quote(PASSWORD, safe='')}@")
    config.write_text(f"base: {REPO / 'configs/demo.yaml'}\ntracking:\n  uri: {uri}\n")
    overrides = job_overrides(tiny_shards, work, "secretive", 1, "scaling.num_workers=1", "tracking.registered_model=secretive")
    done = subprocess.run(
        [REID, "train", str(config), *overrides], cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **SECRET_ENV},
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    run_id = json.loads((work / "out" / "results.json").read_text())["mlflow_run_id"]
    return done.stdout + done.stderr, work, run_id


@pytest.mark.ray
def test_a_finished_run_shows_and_stores_no_secret(finished, mlflow_server, tmp_path):
    output, work, run_id = finished
    assert "MLflow: http://user:***@127.0.0.1:" in output and "epoch 1/1" in output
    assert not leaks(output)
    assert not leaks_in_files(work)  # checkpoints, results.json, Ray Train's records

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(run_id)
    assert run.data.params["tracking.uri"].startswith("http://user:***@127.0.0.1:")
    experiment = client.get_experiment(run.info.experiment_id)
    stored = [run.data.params, run.data.tags, list(run.data.metrics), experiment.tags,
              [(i.dataset.source, i.dataset.profile) for i in run.inputs.dataset_inputs]]  # fmt: skip
    models = client.search_logged_models([run.info.experiment_id])
    versions = client.search_model_versions("name = 'secretive'")
    assert models and versions
    stored += [(m.params, m.tags) for m in models] + [(v.tags, v.description, v.source) for v in versions]
    assert not leaks(json.dumps(stored, default=str))

    artifacts = Path(mlflow.artifacts.download_artifacts(run_id=run_id, dst_path=str(tmp_path / "run"),
                                                         tracking_uri=mlflow_server.uri))  # fmt: skip
    assert {"config/secretive.yaml", "config/resolved.yaml"} <= {str(p.relative_to(artifacts)) for p in artifacts.rglob("*.yaml")}
    for model in models:
        mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, dst_path=str(tmp_path / model.model_id),
                                            tracking_uri=mlflow_server.uri)  # fmt: skip
    assert not leaks_in_files(tmp_path)
