"""A real Ray Train run: DALI CPU input, sharded Circle loss, SQLite MLflow, registry.

One run is shared by the tests below (it is the slow part of the suite), and they only read it: two
epochs on 2 workers, then the same job started again for a third epoch on 3 workers (an elastic
resume: the classifier re-sharded, the schedule continued). A test that changes a registry works
on its own copy of the store.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import onnxruntime
import pandas as pd
import pytest
import ray
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from reid_platform.cli import main
from reid_platform.config import load_config
from reid_platform.data.manifest import ShardDataset
from reid_platform.data.pack import PackOptions, pack_dataset
from reid_platform.errors import RunAlreadyFinished
from reid_platform.input.partition import steps_per_epoch
from reid_platform.model.artifact import load_model_dir
from reid_platform.parallel.classifier import shard_range
from reid_platform.run.launcher import train
from reid_platform.train.schedule import lr_factor
from tests import DEMO_CONFIG
from tests.faults import damage_sample
from tests.tiny_run import set_arguments, tiny_run

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def tiny_config(shards: Path, work: Path, epochs: int, workers: int = 2):
    return load_config(DEMO_CONFIG, tiny_run(
        shards, work, "tiny", epochs,
        f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={2 / max(2, workers)}", "train.eval_every=1",
        # SGD decaying from the start learns within these few steps (Adam at 3.5e-4 needs more)
        "train.optimizer=sgd", "train.lr=0.05", "train.decay_start_epochs=0",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}", "tracking.experiment=tests",
        "tracking.registered_model=reid-test", "tracking.log_checkpoints_as_models=true",
        "tracking.system_metrics_interval_s=1",
    ))  # fmt: skip


@pytest.fixture(scope="module")
def damaged_shards(tiny_market, tmp_path_factory):
    """The tiny dataset with a truncated training image and an empty gallery file (over 1% of the
    files), packed: both are quarantined, and the run below trains and evaluates on the rest. Then
    one packed training JPEG is damaged in place (bit rot, as in a long run): the run skips it
    (``data.on_bad_sample: skip``, the default)."""
    root = tmp_path_factory.mktemp("damaged") / "market"
    shutil.copytree(tiny_market, root)
    truncated = sorted((root / "bounding_box_train").glob("*.jpg"))[5]
    truncated.write_bytes(truncated.read_bytes()[:300])
    sorted((root / "bounding_box_test").glob("0*.jpg"))[3].write_bytes(b"")
    out = root.parent / "shards"
    manifest = pack_dataset([("market1501", root)], out, PackOptions(samples_per_shard=40, workers=2), progress=False)
    assert len(manifest.quarantine) == 2
    damage_sample(ShardDataset.open(out), "train", position=5)
    return out


@pytest.fixture(scope="module")
def trained(ray_cluster, damaged_shards, tmp_path_factory):
    """(config of the final attempt, work folder, outcome of the 2-worker attempt, final outcome)."""
    work = tmp_path_factory.mktemp("run")
    first = train(tiny_config(damaged_shards, work, epochs=2), DEMO_CONFIG)
    cfg = tiny_config(damaged_shards, work, epochs=3, workers=3)
    return cfg, work, first, train(cfg, DEMO_CONFIG)


def steps(shards: Path, cfg, workers: int) -> int:
    return steps_per_epoch(ShardDataset.open(shards).split("train").samples, workers, cfg.input.batch_size)


def test_run_trains_evaluates_and_registers(trained, damaged_shards):
    cfg, work, first, outcome = trained
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(outcome.mlflow_run_id)
    assert run.info.status == "FINISHED" and outcome.mlflow_run_id == first.mlflow_run_id  # one run
    assert run.data.params["loss.name"] == "circle" and run.data.params["scaling.num_workers"] == "2"
    losses = [m.value for m in client.get_metric_history(outcome.mlflow_run_id, "loss")]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert {"mAP", "rank1", "mINP", "images_per_s", "lr", "world_size"} <= set(run.data.metrics)
    # the untrained model is step 0 of the evaluation curves; each attempt evaluated its last epoch
    history = {m.step: m.value for m in client.get_metric_history(outcome.mlflow_run_id, "mAP")}
    assert list(history) == [0, 1, 2, 3] and (history[0], history[2], history[3]) == (first.mAP_before_training, first.mAP, outcome.mAP)
    assert outcome.mAP_before_training == first.mAP_before_training
    version = client.get_model_version_by_alias("reid-test", "champion")
    assert version.run_id == outcome.mlflow_run_id
    results = json.loads((work / "out/results.json").read_text())
    assert results["registered_model"] == "reid-test@champion"
    # That it learns is the falling loss above: after 15 steps held-out mAP moves by less than float32
    # training differs between machines (0.2148 before, 0.2133 after on an AMD EPYC; above it elsewhere).
    assert 0.0 < results["mAP_before_training"] <= 1.0 and 0.0 < results["mAP"] <= 1.0
    artifacts = {a.path for a in client.list_artifacts(outcome.mlflow_run_id, "config")}
    assert "config/resolved.yaml" in artifacts
    pictures = {a.path: a.file_size for a in client.list_artifacts(outcome.mlflow_run_id, "evaluation")}
    assert set(pictures) == {"evaluation/cmc.png", "evaluation/ranked_lists.png"}
    assert all(size > 5000 for size in pictures.values())


def test_pulled_model_reproduces_logged_map(trained, damaged_shards, tmp_path, capsys):
    cfg, _, _, outcome = trained
    uri = ["--tracking-uri", cfg.tracking.uri]
    assert main(["models", "pull", "reid-test@champion", "--out", str(tmp_path / "pulled"), *uri]) == 0
    model_dir = next((tmp_path / "pulled").rglob("model.json")).parent
    assert main(["eval", "--model", str(model_dir), "--data", str(damaged_shards), "--out", str(tmp_path / "eval")]) == 0
    metrics = json.loads((tmp_path / "eval/metrics.json").read_text())
    # evaluated on 3 workers during training, in one process here: the same numbers
    assert metrics["mAP"] == pytest.approx(outcome.mAP, abs=1e-6)
    assert metrics["rank1"] == pytest.approx(outcome.rank1, abs=1e-6)
    table = capsys.readouterr().out
    assert "rank10" in table and "skipped_queries" in table
    for picture in ("cmc.png", "ranked_lists.png"):
        with Image.open(tmp_path / "eval" / picture) as image:
            assert image.format == "PNG" and image.width > 300
    assert main(["eval", "--model", str(model_dir), "--data", str(damaged_shards), "--rerank", "--rerank-k1", "6",
                 "--rerank-k2", "2", "--out", str(tmp_path / "rerank")]) == 0  # fmt: skip
    reranked = json.loads((tmp_path / "rerank/metrics.json").read_text())
    settings = reranked["evaluation"]
    assert (settings["rerank"], settings["rerank_k1"], settings["rerank_k2"], settings["rerank_lambda"]) == (True, 6, 2, 0.3)
    assert reranked["valid_queries"] == metrics["valid_queries"] and 0 < reranked["mAP"] < 1
    assert reranked["mAP"] != metrics["mAP"]


def test_registry_round_trip_promote_list_embed_export(trained, tiny_market, tmp_path, capsys):
    cfg, work, _, outcome = trained
    shutil.copyfile(work / "mlflow.db", tmp_path / "mlflow.db")  # this test moves aliases: its own registry
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    uri = ["--tracking-uri", store]
    client = MlflowClient(store)
    first = client.get_model_version_by_alias("reid-test", "champion")
    second = str(client.create_model_version("reid-test", first.source, run_id=outcome.mlflow_run_id).version)
    client.set_registered_model_alias("reid-test", "challenger", second)
    assert main(["models", "promote", "reid-test", second, "--alias", "champion", *uri]) == 0
    assert str(client.get_model_version_by_alias("reid-test", "champion").version) == second
    capsys.readouterr()
    assert main(["models", "list", *uri]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    versions = sorted((int(v.version) for v in client.search_model_versions("name = 'reid-test'")), reverse=True)
    assert versions[0] == int(second)  # each attempt of the run published its own version before it
    expected = [["reid-test", second, "challenger,champion"]] + [["reid-test", str(v), "-"] for v in versions[1:]]
    assert [row[:3] for row in rows] == expected
    assert rows[0][3] == f"{outcome.rank1:.2%}" and rows[0][-1] == outcome.mlflow_run_id
    assert main(["models", "promote", "reid-test", "99", "--alias", "champion", *uri]) == 1
    assert f"has no version 99 (aliases: challenger->{second}, champion->{second}; versions: {', '.join(map(str, sorted(versions)))})" in capsys.readouterr().err

    # embeddings of image files, with their paths; the oracle preprocesses by hand (PIL + numpy)
    images = sorted((tiny_market / "query").glob("*.jpg"))[:5]
    out = tmp_path / "embeddings.npz"
    assert main(["embed", "--model", "reid-test@champion", *map(str, images), "--out", str(out), *uri]) == 0
    with np.load(out, allow_pickle=False) as saved:
        embeddings, paths = saved["embeddings"], saved["paths"]
    assert list(paths) == [str(p) for p in images]
    assert main(["models", "pull", "reid-test@champion", "--out", str(tmp_path / "m"), *uri]) == 0
    model, preprocessing = load_model_dir(next((tmp_path / "m").rglob("model.json")).parent)
    batch = np.stack([
        (np.asarray(Image.open(p).convert("RGB").resize((preprocessing.width, preprocessing.height), Image.Resampling.BILINEAR),
                    np.float32) / 255.0 - preprocessing.mean) / preprocessing.std
        for p in images
    ]).transpose(0, 3, 1, 2).astype(np.float32)  # fmt: skip
    expected = model.embed(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(embeddings, expected, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)

    broken = tmp_path / "broken.jpg"
    broken.write_bytes(images[0].read_bytes()[:200])
    assert main(["embed", "--model", "reid-test@champion", str(images[0]), str(broken), "--out", str(tmp_path / "no.npz"), *uri]) == 1
    assert f"1 of 2 images cannot be read: {broken}" in capsys.readouterr().err
    assert not (tmp_path / "no.npz").exists()

    # ONNX: onnxruntime on the same preprocessed images gives the same embeddings
    onnx_path = tmp_path / "model.onnx"
    assert main(["export", "onnx", "--model", "reid-test@champion", "--out", str(onnx_path), *uri]) == 0
    session = onnxruntime.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (onnx_embeddings,) = session.run(["embeddings"], {"images": batch})
    np.testing.assert_allclose(onnx_embeddings, expected, atol=1e-4)
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["preprocessing"]) == preprocessing.model_dump(mode="json")


def test_restarting_a_finished_run_registers_nothing(trained, capsys):
    cfg, _, _, outcome = trained
    client = MlflowClient(cfg.tracking.uri)
    versions = len(client.search_model_versions("name = 'reid-test'"))
    with pytest.raises(RunAlreadyFinished, match=r"run 'tiny' in .* finished its 3 epochs already"):
        train(cfg, DEMO_CONFIG)
    assert len(client.search_model_versions("name = 'reid-test'")) == versions
    assert client.get_run(outcome.mlflow_run_id).info.status == "FINISHED"


def test_the_resume_on_3_workers_continued_epochs_schedule_and_steps(trained, damaged_shards):
    """Elastic resume through Ray (test_engine.py checks the state bit for bit on gloo processes)."""
    cfg, _, _, final = trained
    num_classes = ShardDataset.open(damaged_shards).num_classes
    ranges = sorted(re.findall(r"rows-(\d+)-(\d+)", " ".join(p.name for p in Path(final.checkpoint, "classifier").iterdir())))
    assert [(int(a), int(b)) for a, b in ranges] == [shard_range(num_classes, rank, 3) for rank in range(3)]
    client = MlflowClient(cfg.tracking.uri)
    history = {m.step: m.value for m in client.get_metric_history(final.mlflow_run_id, "lr")}
    # epoch 3 continues on the schedule of 3 epochs instead of starting again at epoch 1
    assert list(history) == [1, 2, 3] and history[3] == pytest.approx(cfg.train.lr * lr_factor(3, 3, 0, 0))
    assert [m.value for m in client.get_metric_history(final.mlflow_run_id, "world_size")] == [2, 2, 3]
    steps_logged = [m.step for m in client.get_metric_history(final.mlflow_run_id, "step_loss")]
    assert steps_logged == list(range(1, 2 * steps(damaged_shards, cfg, 2) + steps(damaged_shards, cfg, 3) + 1))
    assert 0.0 < final.mAP <= 1.0


def test_the_run_is_what_an_mlflow_user_expects(trained, damaged_shards, tiny_market):
    """LoggedModels per evaluated epoch with their metrics, the registered pyfunc model, the datasets as
    inputs, system metrics, the training view and a description."""
    cfg, _, _, outcome = trained
    client = MlflowClient(cfg.tracking.uri)
    run = client.get_run(outcome.mlflow_run_id)
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    description = run.data.tags["mlflow.note.content"]
    assert "resnet18" in description and "market1501" in description and "circle" in description
    dataset = ShardDataset.open(damaged_shards)
    inputs = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "evaluation"}
    assert json.loads(inputs["training"].profile)["train"]["samples"] == dataset.split("train").samples
    assert json.loads(inputs["evaluation"].profile)["gallery"]["identities"] == dataset.split("gallery").identities
    assert inputs["training"].digest != inputs["evaluation"].digest
    models = client.search_logged_models([run.info.experiment_id], order_by=[{"field_name": "metrics.mAP", "ascending": False}])
    assert sorted(m.name for m in models) == ["tiny-epoch-1", "tiny-epoch-2", "tiny-epoch-3"]
    assert all(m.source_run_id == run.info.run_id for m in models)
    best = max(models, key=lambda m: next(x.value for x in m.metrics if x.key == "mAP"))
    assert models[0].model_id == best.model_id  # ranked by mAP
    final = next(m for m in models if m.name == "tiny-epoch-3")
    assert {x.key: x.value for x in final.metrics}["mAP"] == outcome.mAP
    assert client.get_model_version_by_alias("reid-test", "champion").source == final.artifact_location
    assert [m.step for m in client.get_metric_history(run.info.run_id, "mAP")] == [0, 1, 2, 3]  # linking added no point
    mlflow.set_tracking_uri(cfg.tracking.uri)
    image = sorted((tiny_market / "query").glob("*.jpg"))[0].read_bytes()
    embedding = mlflow.pyfunc.load_model("models:/reid-test@champion").predict(pd.DataFrame({"image": [image]}))
    assert embedding.shape == (1, 512) and abs(float(np.linalg.norm(embedding)) - 1) < 1e-5
    system = [key for key in run.data.metrics if key.startswith("system/")]
    assert any(key.endswith("/cpu_utilization_percentage") for key in system)
    assert any(key.endswith("/system_memory_usage_megabytes") for key in system)


def test_the_damaged_sample_was_skipped_and_counted(trained):
    cfg, _, first, outcome = trained
    client = MlflowClient(cfg.tracking.uri)
    skipped = [m.value for m in client.get_metric_history(outcome.mlflow_run_id, "skipped_samples")]
    assert len(skipped) == cfg.train.epochs and max(skipped) == 1  # found in an epoch of the first attempt


def test_a_bad_sample_with_fail_ends_the_run_at_once_naming_it(damaged_shards, tmp_path):
    """`reid train` as a user runs it (its own Ray, the workers' lines in its output): one attempt (no
    restart for a data error, whatever run.max_failures says), one last line naming shard and key, exit 1."""
    overrides = tiny_run(
        damaged_shards, tmp_path, "fails", 1, "data.on_bad_sample=fail", "scaling.num_workers=1",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}", "tracking.system_metrics=false",
    )  # fmt: skip
    cfg = load_config(DEMO_CONFIG, overrides)
    assert cfg.run.max_failures > 0
    done = subprocess.run(
        [str(Path(sys.executable).parent / "reid"), "train", str(DEMO_CONFIG), *set_arguments(overrides)],
        capture_output=True, text=True, timeout=300, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )  # fmt: skip
    tar, key = damaged_sample(damaged_shards)
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1] == (
        f"reid: error: {tar}: sample {key} does not decode (nvImageCodec, DALI's decoder, refuses it); "
        "data.on_bad_sample is fail"
    )
    assert done.stdout.count("before training:") == 1  # the worker group started once
    run_id = (cfg.run.storage_path / "fails" / "mlflow_run_id").read_text()
    assert MlflowClient(cfg.tracking.uri).get_run(run_id).info.status == "FAILED"


def damaged_sample(shards: Path) -> tuple[str, str]:
    from reid_platform.input.bad_samples import find_bad_samples

    (bad,) = find_bad_samples(ShardDataset.open(shards), "train")
    return bad.tar, bad.key
