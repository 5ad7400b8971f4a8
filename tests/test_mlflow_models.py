"""MLflow-native models with a real SQLite store and a real serving process: the pyfunc flavour
(models from code, nothing pickled) against ``reid embed``, registry round trips old and new, and
``mlflow models serve`` answering JPEGs over HTTP."""

from __future__ import annotations

import base64
import io
import json
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from PIL import Image

from reid_platform.cli import main
from reid_platform.cluster.local import free_port
from reid_platform.model.artifact import save_model_dir
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig, Preprocessing
from reid_platform.model.inference import embed_images
from reid_platform.tracking.logged_model import log_pyfunc_model
from reid_platform.tracking.registry import register_model
from tests.services import Serving

REID = str(Path(sys.executable).parent / "reid")
PRE = Preprocessing(height=64, width=32)


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """A model logged as a LoggedModel of a run and registered as reid-serve@champion."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("serve", artifact_location=str(root / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    torch.manual_seed(0)
    model = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=16), PRE).eval()
    directory = save_model_dir(model, PRE, root / "model")
    model_id = log_pyfunc_model(uri, run_id, "serve-epoch-1", directory, model.feature_dim)
    register_model(uri, run_id, client.get_logged_model(model_id).artifact_location, "reid-serve", "champion", model_id)
    return uri, run_id, model_id, directory


@pytest.fixture(scope="module")
def jpegs(tiny_market) -> list[Path]:
    return sorted((tiny_market / "query").glob("*.jpg"))[:4]


def reid_embed(directory: Path, images: list[Path], flip: bool = False) -> np.ndarray:
    from reid_platform.model.artifact import load_model_dir

    model, preprocessing = load_model_dir(directory)
    return embed_images(model, preprocessing, images, flip=flip)


def test_pyfunc_predicts_what_reid_embed_gives_for_bytes_and_arrays(registered, jpegs, tmp_path, monkeypatch):
    uri, _, model_id, directory = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # as an MLflow user points models:/ at a server
    model = mlflow.pyfunc.load_model("models:/reid-serve@champion")
    expected = reid_embed(directory, jpegs)
    got = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in jpegs]}))
    np.testing.assert_allclose(got, expected, atol=1e-5)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in jpegs]
    np.testing.assert_allclose(model.predict(pd.DataFrame({"image": arrays})), expected, atol=1e-5)
    flipped = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in jpegs]}), params={"flip": True})
    np.testing.assert_allclose(flipped, reid_embed(directory, jpegs, flip=True), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    with pytest.raises(MlflowException, match="image 1: not an image"):
        model.predict(pd.DataFrame({"image": [jpegs[0].read_bytes(), b"not an image at all"]}))
    # nothing in the model is a pickle: the code file, JSON, YAML and the safetensors weights
    files = {p.name for p in Path(mlflow.artifacts.download_artifacts(f"models:/{model_id}", dst_path=str(tmp_path))).rglob("*") if p.is_file()}
    assert {"MLmodel", "pyfunc_model.py", "model.safetensors", "model.json"} <= files
    assert not [name for name in files if name.endswith((".pkl", ".pickle"))]


def test_the_logged_model_belongs_to_its_run_and_is_logged_once(registered):
    uri, run_id, model_id, directory = registered
    client = MlflowClient(uri)
    assert log_pyfunc_model(uri, run_id, "serve-epoch-1", directory, 16) == model_id  # a retry finds it again
    (found,) = client.search_logged_models([client.get_run(run_id).info.experiment_id])
    assert (found.model_id, found.source_run_id, found.name) == (model_id, run_id, "serve-epoch-1")
    version = client.get_model_version_by_alias("reid-serve", "champion")
    assert version.source == found.artifact_location and version.run_id == run_id
    assert json.loads(found.tags["mlflow.modelVersions"]) == [{"name": "reid-serve", "version": str(version.version)}]


def test_old_plain_folder_versions_and_new_ones_pull_embed_and_export(registered, jpegs, tmp_path, capsys):
    uri, run_id, _, directory = registered
    client = MlflowClient(uri)
    client.log_artifacts(run_id, str(directory), "model")  # how versions were registered before
    old = client.create_model_version("reid-serve", f"{client.get_run(run_id).info.artifact_uri}/model", run_id=run_id)
    flags = ["--tracking-uri", uri]
    for reference in ("reid-serve@champion", f"reid-serve/{old.version}"):
        out = tmp_path / reference.replace("/", "_")
        assert main(["embed", "--model", reference, *map(str, jpegs), "--out", str(out / "e.npz"), *flags]) == 0
        with np.load(out / "e.npz") as saved:
            np.testing.assert_allclose(saved["embeddings"], reid_embed(directory, jpegs), atol=1e-5)
        assert main(["models", "pull", reference, "--out", str(out / "pulled"), *flags]) == 0
        assert any((out / "pulled").rglob("model.safetensors"))
    assert main(["export", "onnx", "--model", "reid-serve@champion", "--out", str(tmp_path / "m.onnx"), *flags]) == 0
    capsys.readouterr()
    assert main(["models", "serve", f"reid-serve/{old.version}", *flags]) == 1  # MLflow cannot serve a plain folder
    assert f"reid-serve/{old.version} is a plain model folder" in capsys.readouterr().err
    assert main(["models", "pull", "reid-serve@nobody", "--out", str(tmp_path / "x"), *flags]) == 1
    assert "has no alias 'nobody' (aliases: champion->1; versions: 1, 2)" in capsys.readouterr().err
    assert main(["models", "pull", "nothing@champion", "--out", str(tmp_path / "x"), *flags]) == 1
    assert "has no registered model 'nothing' (models: reid-serve)" in capsys.readouterr().err


def test_mlflow_models_serve_answers_jpegs_over_http_and_refuses_bad_ones(registered, jpegs):
    uri, _, _, directory = registered
    expected = reid_embed(directory, jpegs)
    encoded = [base64.b64encode(p.read_bytes()).decode() for p in jpegs]
    server = Serving(uri, "reid-serve@champion")
    try:
        server.wait()
        for payload in ({"inputs": {"image": encoded}}, {"dataframe_split": {"columns": ["image"], "data": [[e] for e in encoded]}}):
            answer = server.invoke(payload)
            assert answer.status_code == 200, answer.text
            np.testing.assert_allclose(np.array(answer.json()["predictions"]), expected, atol=1e-5)
        flipped = server.invoke({"inputs": {"image": encoded}, "params": {"flip": True}})
        np.testing.assert_allclose(np.array(flipped.json()["predictions"]), reid_embed(directory, jpegs, flip=True), atol=1e-5)
        png = io.BytesIO()
        Image.new("RGB", (10, 20), (1, 2, 3)).save(png, "PNG")
        bad = server.invoke({"inputs": {"image": [encoded[0], base64.b64encode(b"not an image").decode()]}})
        assert bad.status_code == 400 and "image 1: not an image" in bad.json()["message"]
        assert len(bad.json()["message"].splitlines()) == 1
        assert server.invoke({"inputs": {"image": [base64.b64encode(png.getvalue()).decode()]}}).status_code == 200  # still serving
    finally:
        server.stop()


def test_serving_is_refused_with_one_line_for_a_missing_model_or_server(registered, capsys):
    uri, *_ = registered
    assert main(["models", "serve", "reid-serve@nobody", "--tracking-uri", uri]) == 1
    assert "has no alias 'nobody'" in capsys.readouterr().err
    assert main(["models", "serve", "reid-serve@champion", "--tracking-uri", f"http://127.0.0.1:{free_port()}"]) == 1
    assert "is unreachable" in capsys.readouterr().err
