"""Runs and models kept in an S3 API server (moto's, authentication on: tests/object_store.py):
Ray Train's checkpoints under ``run.storage_path: s3://bucket/prefix`` and a resume read back from
there, a storage bucket that cannot be used refused before Ray starts, and an MLflow server whose
artifacts are in a bucket while its clients hold no AWS credentials at all.

Each ``reid train`` here is a process of its own with the store's environment, as a user runs it;
this process's environment keeps no AWS_* variable unless a test sets one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pytest
import torch
from mlflow.tracking import MlflowClient

from reid_platform.cli import main
from reid_platform.data.manifest import ShardDataset
from reid_platform.errors import RunAlreadyFinished
from reid_platform.input.partition import steps_per_epoch
from reid_platform.model.artifact import save_model_dir
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig, Preprocessing
from reid_platform.parallel.classifier import shard_range
from reid_platform.tracking.config import ARTIFACTS_THROUGH_THE_SERVER
from reid_platform.tracking.logged_model import log_pyfunc_model
from reid_platform.tracking.registry import register_model
from tests import DEMO_CONFIG
from tests.object_store import REGION
from tests.services import MlflowServer
from tests.tiny_run import BATCH, set_arguments, tiny_run

REID = str(Path(sys.executable).parent / "reid")


def without_aws() -> dict[str, str]:
    """This process's environment less every AWS_* variable (and a Ray address: each run has its own Ray)."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}


def reid_train(shards: Path, work: Path, name: str, epochs: int, env: dict, *extra: str) -> subprocess.CompletedProcess:
    work.mkdir(parents=True, exist_ok=True)  # the SQLite store's folder
    overrides = tiny_run(
        shards, work, name, epochs, "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.system_metrics=false", *extra,
    )  # fmt: skip
    return subprocess.run(
        [REID, "train", str(DEMO_CONFIG), *set_arguments(overrides)], capture_output=True, text=True, timeout=600, env=env
    )


def store(s3_server):
    """A client of the store with its key (this process's environment has none)."""
    environment = s3_server.environment()
    return boto3.client(
        "s3", endpoint_url=s3_server.url, region_name=REGION, aws_access_key_id=environment["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=environment["AWS_SECRET_ACCESS_KEY"],
    )  # fmt: skip


def objects(s3_server, bucket: str, prefix: str) -> dict[str, int]:
    """Every object under ``prefix`` with its size."""
    pages = store(s3_server).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"]: item["Size"] for page in pages for item in page.get("Contents", [])}


def key(uri: str, bucket: str) -> str:
    return uri.removeprefix(f"s3://{bucket}/")


def classifier_rows(stored: dict[str, int], checkpoint: str) -> list[tuple[int, int]]:
    """The class rows of each classifier file of the checkpoint at key ``checkpoint``."""
    found = (re.fullmatch(rf"{re.escape(checkpoint)}/classifier/rows-(\d+)-(\d+)\.safetensors", key) for key in stored)
    return sorted((int(match[1]), int(match[2])) for match in found if match)


@pytest.mark.ray
def test_checkpoints_go_to_s3_and_the_job_resumes_from_there(s3_server, tiny_shards, tmp_path):
    """One epoch into the bucket, then the same job started again for a second epoch from another
    folder (nothing local of the first attempt is used) resumes from the bucket; a third start, on
    one worker, re-shards the classifier files Ray downloaded; a fourth finds the run finished."""
    bucket = s3_server.new_bucket()
    env = {**without_aws(), **s3_server.environment()}
    storage = f"run.storage_path=s3://{bucket}/runs"

    started = time.perf_counter()
    first = reid_train(tiny_shards, tmp_path / "s3", "tiny", 1, env, storage)
    first_s = time.perf_counter() - started
    assert first.returncode == 0, first.stderr[-3000:]
    stored = objects(s3_server, bucket, "runs/tiny/")
    assert "runs/tiny/mlflow_run_id" in stored
    (checkpoint,) = [key.split("/")[2] for key in stored if re.fullmatch(r"runs/tiny/checkpoint_[^/]+/trainer\.pt", key)]
    classes = ShardDataset.open(tiny_shards).num_classes
    assert classifier_rows(stored, f"runs/tiny/{checkpoint}") == [shard_range(classes, rank, 2) for rank in range(2)]

    resumed = reid_train(tiny_shards, tmp_path / "s3-again", "tiny", 2, env, storage,
                         f"tracking.uri=sqlite:///{tmp_path / 's3' / 'mlflow.db'}")  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert re.search(rf"resumed after epoch 1 on 2 workers from s3://{bucket}/runs/tiny/checkpoint_", resumed.stdout)
    assert "before training:" not in resumed.stdout
    outcome = json.loads((tmp_path / "s3-again/out/results.json").read_text())
    assert outcome["checkpoint"].startswith(f"s3://{bucket}/runs/tiny/checkpoint_")

    # one MLflow run, its step losses numbered on from epoch 1's; no uninterrupted run to compare
    # with: one started with train.epochs=2 decays its learning rate on another schedule from step 3
    per_epoch = steps_per_epoch(ShardDataset.open(tiny_shards).split("train").samples, 2, BATCH)
    history = MlflowClient(f"sqlite:///{tmp_path / 's3' / 'mlflow.db'}").get_metric_history(outcome["mlflow_run_id"], "step_loss")
    assert sorted(m.step for m in history) == list(range(1, 2 * per_epoch + 1))

    elastic = reid_train(tiny_shards, tmp_path / "s3-one", "tiny", 3, env, storage, "scaling.num_workers=1",
                         f"tracking.uri=sqlite:///{tmp_path / 's3' / 'mlflow.db'}")  # fmt: skip
    assert elastic.returncode == 0, elastic.stderr[-3000:]
    assert "resumed after epoch 2 on 1 workers from s3://" in elastic.stdout
    last = json.loads((tmp_path / "s3-one/out/results.json").read_text())["checkpoint"]
    assert classifier_rows(objects(s3_server, bucket, key(last, bucket)), key(last, bucket)) == [(0, classes)]
    print(f"first attempt {first_s:.0f} s; objects in the bucket: {len(objects(s3_server, bucket, 'runs/'))}")

    again = reid_train(tiny_shards, tmp_path / "s3-one", "tiny", 3, env, storage, "scaling.num_workers=1",
                       f"tracking.uri=sqlite:///{tmp_path / 's3' / 'mlflow.db'}")  # fmt: skip
    assert again.returncode == RunAlreadyFinished.exit_code and "finished its 3 epochs already" in again.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("problem", ["no such bucket", "a refused key"])
def test_an_unusable_storage_bucket_is_one_line_before_ray_starts(problem, s3_server, tiny_shards, tmp_path):
    bucket = "reid-no-such-bucket" if problem == "no such bucket" else s3_server.new_bucket()
    env = {**without_aws(), **s3_server.environment(), "RAY_TMPDIR": str(tmp_path / "ray")}
    if problem == "a refused key":
        env["AWS_SECRET_ACCESS_KEY"] = "not-the-secret"
    started = time.perf_counter()
    done = reid_train(tiny_shards, tmp_path, "tiny", 1, env, f"run.storage_path=s3://{bucket}/runs")
    elapsed = time.perf_counter() - started
    assert done.returncode == 1
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"reid: error: s3://{bucket}/runs/tiny/mlflow_run_id: ")
    expected = f"bucket '{bucket}' does not exist" if problem == "no such bucket" else "the store refused the credentials"
    assert expected in line and env["AWS_SECRET_ACCESS_KEY"] not in line
    assert not (tmp_path / "ray").exists() and "before training" not in done.stdout  # no Ray process started
    assert elapsed < 30, elapsed  # the imports: nothing waits for the store


def test_mlflow_artifacts_in_s3_reach_clients_without_aws_credentials(s3_server, tiny_market, tmp_path, monkeypatch, capsys):
    """The server alone holds the store's key; this process and the pulling ones hold none."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    bucket = s3_server.new_bucket()
    server = MlflowServer(tmp_path, artifacts=f"s3://{bucket}/mlartifacts", env=s3_server.environment())
    try:
        server.start()
        client = MlflowClient(server.uri)
        run_id = client.create_run(client.create_experiment("s3")).info.run_id
        preprocessing = Preprocessing(height=64, width=32)
        torch.manual_seed(0)
        model = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=16), preprocessing).eval()
        directory = save_model_dir(model, preprocessing, tmp_path / "model")
        model_id = log_pyfunc_model(server.uri, run_id, "s3-epoch-1", directory, model.feature_dim)
        register_model(server.uri, run_id, client.get_logged_model(model_id).artifact_location, "reid-s3", "champion", model_id)
        stored = objects(s3_server, bucket, "mlartifacts/")
        names = {key.rpartition("/")[2] for key in stored}
        assert {"MLmodel", "model.json"} <= names, sorted(stored)

        image = sorted((tiny_market / "query").glob("*.jpg"))[0]
        load = (
            "import mlflow, pandas, sys; model = mlflow.pyfunc.load_model('models:/reid-s3@champion'); "
            "print(model.predict(pandas.DataFrame({'image': [open(sys.argv[1], 'rb').read()]})).shape)"
        )
        # what `reid` sets for itself (tracking/config.py): downloads through the server, not from presigned
        # URLs of the bucket (which moto's server refuses with authentication on)
        no_aws = {**without_aws(), "MLFLOW_TRACKING_URI": server.uri, **ARTIFACTS_THROUGH_THE_SERVER}
        loaded = subprocess.run([sys.executable, "-c", load, str(image)], capture_output=True, text=True, timeout=300, env=no_aws)
        assert loaded.returncode == 0, loaded.stderr[-3000:]
        assert loaded.stdout.strip().splitlines()[-1] == "(1, 16)"
        pulled = subprocess.run(
            [REID, "models", "pull", "reid-s3@champion", "--out", str(tmp_path / "pulled")],
            capture_output=True, text=True, timeout=300, env=no_aws,
        )  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        model_dir = next((tmp_path / "pulled").rglob("model.json")).parent
        assert (model_dir / "model.json").read_bytes() == (directory / "model.json").read_bytes()

        # --out s3://: the pulled folder uploaded, by a process that has the store's credentials
        for name, value in s3_server.environment().items():
            monkeypatch.setenv(name, value)
        capsys.readouterr()
        assert main(["models", "pull", "reid-s3@champion", "--out", f"s3://{bucket}/pulled", "--tracking-uri", server.uri]) == 0
        uploaded = objects(s3_server, bucket, "pulled/")
        local = {f"pulled/{path.relative_to(tmp_path / 'pulled').as_posix()}": path.stat().st_size
                 for path in (tmp_path / "pulled").rglob("*") if path.is_file()}  # fmt: skip
        assert uploaded == local
        model_uri = f"s3://{bucket}/pulled/{model_dir.relative_to(tmp_path / 'pulled').as_posix()}".rstrip("/.")
        assert capsys.readouterr().out.strip() == f"pulled reid-s3@champion into {model_uri}"
    finally:
        server.kill()
