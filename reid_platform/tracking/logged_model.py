"""A trained model as an MLflow 3 LoggedModel with the pyfunc flavour, logged as models from code.

The LoggedModel is created through the client (no active run is needed, so the driver and the Ray
Train controller log the same way), linked to its run, and holds a pyfunc model: MLflow's copy of
``pyfunc_model.py`` plus the model directory (safetensors + JSON) as its one artifact. Loading it
runs that file; nothing is unpickled. The run's evaluation metrics are linked to the model with the
same step and timestamp they have in the run, so the run's history keeps one point per epoch while
``mlflow.search_logged_models`` can rank models by mAP.
"""

from __future__ import annotations

import importlib.metadata
import io
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import LoggedModelStatus, Metric
from mlflow.models import ModelSignature
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec
from PIL import Image

from reid_platform.tracking import pyfunc_model

EVALUATION_KEYS = ("rank1", "rank5", "rank10", "mAP", "mINP")
MODEL_TYPE = "reid-embedding"
# what the model code imports; pinned to this environment's versions (serving with --env-manager local
# uses the environment as it is, a conda or virtualenv manager installs these)
REQUIREMENTS = ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas", "pydantic", "mlflow")


def signature(feature_dim: int) -> ModelSignature:
    return ModelSignature(
        inputs=Schema([ColSpec("binary", pyfunc_model.IMAGE_COLUMN)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, feature_dim), "embeddings")]),
        params=ParamSchema([ParamSpec("flip", "boolean", False)]),
    )


def _example() -> pd.DataFrame:
    """One flat grey JPEG crop: the input example MLflow stores with the model."""
    encoded = io.BytesIO()
    Image.new("RGB", (32, 64), (128, 128, 128)).save(encoded, "JPEG")
    return pd.DataFrame({pyfunc_model.IMAGE_COLUMN: [encoded.getvalue()]})


def _requirements() -> list[str]:
    return [f"{name}=={importlib.metadata.version(name)}" for name in REQUIREMENTS]


def log_pyfunc_model(tracking_uri: str, run_id: str, name: str, model_dir: Path, feature_dim: int) -> str:
    """The id of the READY LoggedModel ``name`` of ``run_id`` holding ``model_dir`` as a pyfunc model.

    Idempotent: a READY model of that name and run is reused (a retry after a lost reply creates
    no second one); a half-logged one is replaced.
    """
    client = MlflowClient(tracking_uri)
    experiment_id = client.get_run(run_id).info.experiment_id
    for existing in client.search_logged_models([experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = '{name}'"):
        if existing.status == LoggedModelStatus.READY:
            return existing.model_id
        client.delete_logged_model(existing.model_id)  # an attempt that died half-way
    model = client.create_logged_model(experiment_id, name=name, source_run_id=run_id, model_type=MODEL_TYPE)
    with tempfile.TemporaryDirectory() as scratch:
        packaged = Path(scratch) / "pyfunc"
        mlflow.pyfunc.save_model(
            str(packaged),
            python_model=pyfunc_model.__file__,
            artifacts={pyfunc_model.MODEL_DIR: str(model_dir)},
            signature=signature(feature_dim),
            input_example=_example(),
            pip_requirements=_requirements(),
        )
        client.log_model_artifacts(model.model_id, str(packaged))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def link_evaluation_metrics(tracking_uri: str, run_id: str, model_id: str, step: int) -> None:
    """The run's evaluation metrics at ``step`` linked to ``model_id`` (same values and timestamps)."""
    client = MlflowClient(tracking_uri)
    linked = []
    for key in EVALUATION_KEYS:
        for point in client.get_metric_history(run_id, key):
            if point.step == step:
                linked.append(Metric(key, point.value, point.timestamp, point.step, model_id=model_id))
    if linked:
        client.log_batch(run_id, metrics=linked)
