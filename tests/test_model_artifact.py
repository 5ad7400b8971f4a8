"""Model directories are data, never code: a pickle planted where the weights belong is refused
without being unpickled."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from reid_platform.config import InputConfig
from reid_platform.model.artifact import load_model_dir, save_model_dir
from reid_platform.model.backbone import ModelSpec, ReIDNet


class Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_and_refusal_of_a_planted_pickle(tmp_path):
    model = ReIDNet(ModelSpec("resnet18", 16, 1)).eval()
    directory = save_model_dir(model, InputConfig(height=64, width=32), tmp_path / "model")
    loaded, input_cfg = load_model_dir(directory)
    images = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(loaded.embed(images), model.embed(images))
    assert (input_cfg.height, input_cfg.width) == (64, 32)

    marker = tmp_path / "pwned"
    (directory / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ValueError, match="model.safetensors: not a readable safetensors file"):
        load_model_dir(directory)
    assert not marker.exists()
    (directory / "model.json").unlink()
    with pytest.raises(ValueError, match="not a model directory"):
        load_model_dir(directory)
