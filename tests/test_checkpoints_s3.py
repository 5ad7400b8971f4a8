"""Runs and models kept in an S3 API server (moto's, authentication on: tests/object_store.py):
shards read from ``data.shards: s3://...``, Ray Train's checkpoints under ``run.storage_path:
s3://bucket/prefix`` and a resume after a killed worker read back from there, an MLflow server whose
artifacts are in the bucket while the clients that pull and serve the model hold no AWS credentials
at all, and a storage bucket that cannot be used refused before Ray starts.

Each ``reid train`` here is a process of its own with the store's environment, as a user runs it;
this process's environment keeps no AWS_* variable unless a test sets one.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3
import psutil
import pytest
from mlflow.tracking import MlflowClient

from reid_platform.data.manifest import ShardDataset
from reid_platform.input.partition import steps_per_epoch
from reid_platform.parallel.classifier import shard_range
from reid_platform.storage import files
from reid_platform.storage.location import S3Uri
from tests import DEMO_CONFIG
from tests.object_store import REGION
from tests.services import MlflowServer, Serving, wait_for
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
def test_a_run_kept_in_the_store_survives_a_killed_worker_and_its_model_is_served_from_there(
    s3_server, tiny_shards, tiny_market, tmp_path, monkeypatch
):
    """Shards, checkpoints and model artifacts all in the bucket; the job starts on an empty local
    temporary folder, loses a training worker after its second epoch, resumes from the checkpoint in
    the bucket, registers its model there, and processes without any AWS credential pull and serve it."""
    bucket = s3_server.new_bucket()
    with monkeypatch.context() as patch:
        for name, value in s3_server.environment().items():
            patch.setenv(name, value)
        files.upload_folder(tiny_shards, S3Uri(bucket, "data/tiny"))
    server = MlflowServer(tmp_path / "mlflow", artifacts=f"s3://{bucket}/mlartifacts", env=s3_server.environment())
    (tmp_path / "mlflow").mkdir()
    # every local copy a process makes (indexes, tables, staged shards, checkpoints) starts in an empty
    # temporary folder; a short path: Ray's sockets live under it
    fresh = Path(tempfile.mkdtemp(prefix="reid-"))
    epochs, work = 3, tmp_path / "job"
    overrides = tiny_run(
        f"s3://{bucket}/data/tiny", work, "stored", epochs, "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        f"run.storage_path=s3://{bucket}/runs", f"tracking.uri={server.uri}", "tracking.system_metrics=false",
        "tracking.registered_model=reid-s3", "tracking.alias=champion",
    )  # fmt: skip
    try:
        server.start()
        log = (tmp_path / "train.log").open("w+")
        job = subprocess.Popen(
            [REID, "train", str(DEMO_CONFIG), *set_arguments(overrides)], stdout=log, stderr=subprocess.STDOUT, text=True,
            env={**without_aws(), **s3_server.environment(), "TMPDIR": str(fresh)},
        )  # fmt: skip
        printed = lambda: (tmp_path / "train.log").read_text()
        # epoch 2's line on rank 0 means epoch 1's checkpoint was committed by every rank
        wait_for(lambda: "epoch 2/" in printed() or job.poll() is not None, "epoch 2", timeout=400)
        workers = [p for p in psutil.process_iter(["cmdline"]) if any("ray::RayTrainWorker" in part for part in p.info["cmdline"] or [])]
        assert len(workers) == 2, printed()[-3000:]
        workers[-1].kill()
        assert job.wait(timeout=500) == 0, printed()[-3000:]
        assert re.search(rf"resumed after epoch [12] on 2 workers from s3://{bucket}/runs/stored/checkpoint_", printed())
        outcome = json.loads((work / "out/results.json").read_text())
        assert outcome["checkpoint"].startswith(f"s3://{bucket}/runs/stored/checkpoint_")
        assert not (work / "ray").exists()  # nothing of the run kept on local disk
        stored = objects(s3_server, bucket, "runs/stored/")
        checkpoint = key(outcome["checkpoint"], bucket)
        classes = ShardDataset.open(tiny_shards).num_classes
        assert f"{checkpoint}/trainer.pt" in stored
        assert classifier_rows(stored, checkpoint) == [shard_range(classes, rank, 2) for rank in range(2)]

        client = MlflowClient(server.uri)
        per_epoch = steps_per_epoch(ShardDataset.open(tiny_shards).split("train").samples, 2, BATCH)
        history = client.get_metric_history(outcome["mlflow_run_id"], "step_loss")
        assert sorted(m.step for m in history) == list(range(1, epochs * per_epoch + 1))  # every step once
        assert client.get_model_version_by_alias("reid-s3", "champion").run_id == outcome["mlflow_run_id"]
        assert "MLmodel" in {name.rpartition("/")[2] for name in objects(s3_server, bucket, "mlartifacts/")}

        # pulled and served by processes that hold no AWS credential: the server hands the artifacts over
        for name in [name for name in os.environ if name.startswith("AWS_")]:
            monkeypatch.delenv(name)
        pulled = subprocess.run(
            [REID, "models", "pull", "reid-s3@champion", "--out", str(tmp_path / "pulled"), "--tracking-uri", server.uri],
            capture_output=True, text=True, timeout=300, env=without_aws(),
        )  # fmt: skip
        assert pulled.returncode == 0, pulled.stderr[-3000:]
        assert next((tmp_path / "pulled").rglob("model.json"))
        serving = Serving(server.uri, "reid-s3@champion")
        try:
            serving.wait()
            image = base64.b64encode(sorted((tiny_market / "query").glob("*.jpg"))[0].read_bytes()).decode()
            answer = serving.invoke({"inputs": {"image": [image]}})
            assert answer.status_code == 200, answer.text
            assert len(answer.json()["predictions"]) == 1
        finally:
            serving.stop()

        # --out s3://: the pulled folder uploaded by a process that has the store's credentials
        to_store = subprocess.run(
            [REID, "models", "pull", "reid-s3@champion", "--out", f"s3://{bucket}/pulled", "--tracking-uri", server.uri],
            capture_output=True, text=True, timeout=300, env={**without_aws(), **s3_server.environment()},
        )  # fmt: skip
        assert to_store.returncode == 0, to_store.stderr[-3000:]
        local = {f"pulled/{path.relative_to(tmp_path / 'pulled').as_posix()}": path.stat().st_size
                 for path in (tmp_path / "pulled").rglob("*") if path.is_file()}  # fmt: skip
        assert objects(s3_server, bucket, "pulled/") == local
    finally:
        if job.poll() is None:
            job.kill()
        server.kill()
        shutil.rmtree(fresh, ignore_errors=True)


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
