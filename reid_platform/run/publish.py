"""A training checkpoint as a model in MLflow: a LoggedModel of the run (pyfunc, pickle-free, with
its evaluation metrics linked to it) and, at the end of a run, a registered version.

The driver publishes the final checkpoint; with ``tracking.log_checkpoints_as_models`` the Ray Train
controller also logs every evaluated epoch's checkpoint, so ``mlflow.search_logged_models`` can pick
the best epoch by mAP.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from mlflow.tracking import MlflowClient

from reid_platform.config import RunConfig
from reid_platform.model.artifact import save_model_dir
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import Preprocessing
from reid_platform.tracking.logged_model import link_evaluation_metrics, log_pyfunc_model
from reid_platform.tracking.registry import register_model
from reid_platform.train.checkpoint import read_trainer_state


def log_checkpoint_model(cfg: RunConfig, checkpoint_dir: Path, run_id: str, epoch: int) -> str:
    """The LoggedModel (its id) of the backbone in the checkpoint of ``epoch``."""
    model = ReIDNet(cfg.model, cfg.input)  # its trunk's weights come from the checkpoint
    model.load_state_dict(read_trainer_state(checkpoint_dir)["backbone"])
    with tempfile.TemporaryDirectory() as tmp:
        directory = save_model_dir(model, Preprocessing.of(cfg.input), Path(tmp) / "model")
        model_id = log_pyfunc_model(cfg.tracking.uri, run_id, f"{cfg.run.name}-epoch-{epoch}", directory, model.feature_dim)
    link_evaluation_metrics(cfg.tracking.uri, run_id, model_id, step=epoch)
    return model_id


def publish_model(cfg: RunConfig, checkpoint_dir: Path, run_id: str, epoch: int) -> str | None:
    """The checkpoint of ``epoch`` as a LoggedModel of the run (pyfunc, pickle-free), its evaluation
    metrics linked to it, registered under ``tracking.registered_model``.

    Safe to repeat: the LoggedModel of an epoch is found again instead of logged twice, and
    registering reuses the version of that model. A run continued to more epochs publishes a new one.
    """
    model_id = log_checkpoint_model(cfg, checkpoint_dir, run_id, epoch)
    if cfg.tracking.registered_model is None:
        return None
    source = MlflowClient(cfg.tracking.uri).get_logged_model(model_id).artifact_location
    register_model(cfg.tracking.uri, run_id, source, cfg.tracking.registered_model, cfg.tracking.alias, model_id)
    return f"{cfg.tracking.registered_model}@{cfg.tracking.alias}"
