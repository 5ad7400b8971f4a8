"""Model directories are data, never code: a pickle planted where the weights belong is refused
without being unpickled. Format v2 stores only what the network needs; v1 directories still load."""

from __future__ import annotations

import json
import lzma
import os
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_platform.errors import ModelFormatError
from reid_platform.input.config import InputConfig
from reid_platform.model.artifact import FORMAT, load_model_dir, save_model_dir
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig, Preprocessing

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)

V1_FIXTURE = Path(__file__).parent / "fixtures" / "model_v1"


class Payload:
    """Unpickling this writes a marker file: proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_round_trip_and_refusal_of_a_planted_pickle(tmp_path):
    model = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=16, last_stride=1)).eval()
    directory = save_model_dir(model, Preprocessing(height=64, width=32), tmp_path / "model")
    loaded, preprocessing = load_model_dir(directory)
    images = torch.randn(2, 3, 64, 32)
    torch.testing.assert_close(loaded.embed(images), model.embed(images))
    assert (preprocessing.height, preprocessing.width) == (64, 32)

    marker = tmp_path / "pwned"
    (directory / "model.safetensors").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(ModelFormatError, match="model.safetensors: not a readable safetensors file"):
        load_model_dir(directory)
    assert not marker.exists()
    (directory / "model.json").unlink()
    with pytest.raises(ModelFormatError, match="not a model directory"):
        load_model_dir(directory)


def test_v2_describes_the_network_and_its_preprocessing_only(tmp_path):
    training_input = InputConfig(height=64, width=32, batch_size=16, erasing_prob=0.3, sampler="identity")
    model = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=16, pretrained="/somewhere.pth"))
    save_model_dir(model, training_input, tmp_path)
    description = json.loads((tmp_path / "model.json").read_text())
    assert description == {
        "format": FORMAT,
        "model": {"arch": "resnet18", "embedding_dim": 16, "last_stride": 1, "pooling": "avg"},
        "preprocessing": {"height": 64, "width": 32, "mean": list(training_input.mean), "std": list(training_input.std)},
    }


def test_a_version_1_directory_still_loads_and_embeds_as_before(tmp_path):
    """The fixture was written by the version-1 code (see its README), with its embeddings."""
    directory = tmp_path / "model"
    shutil.copytree(V1_FIXTURE, directory)
    (directory / "model.safetensors").write_bytes(lzma.decompress((directory / "model.safetensors.xz").read_bytes()))
    assert json.loads((directory / "model.json").read_text())["format"] == "reid-platform-model/1"
    model, preprocessing = load_model_dir(directory)
    assert preprocessing == Preprocessing(height=64, width=32)
    assert (model.cfg.arch, model.cfg.embedding_dim, model.feature_dim) == ("resnet18", 16, 16)
    pixels = np.load(directory / "images_uint8.npy")
    embeddings = model.double().embed(torch.from_numpy(pixels.astype(np.float64) / 127.5 - 1.0))
    # Ours in float64; the fixture's are float32, whose rounding through 20 layers is 0.9-1.2e-5 of these
    # unit vectors against float64 (AVX-512, AVX2 and default kernels): 1e-4 holds on any CPU, and a
    # misplaced or missing weight moves them by 1e-2 and more.
    np.testing.assert_allclose(embeddings.numpy(), np.load(directory / "expected_embeddings.npy"), rtol=0, atol=1e-4)


def test_unknown_format_and_wrong_weights_are_named(tmp_path):
    directory = save_model_dir(ReIDNet(ModelConfig(arch="resnet18")), Preprocessing(), tmp_path / "model")
    description = json.loads((directory / "model.json").read_text())
    (directory / "model.json").write_text(json.dumps({**description, "model": {"arch": "resnet34"}}))
    with pytest.raises(ModelFormatError, match="model.safetensors: does not fit a resnet34 network"):
        load_model_dir(directory)
    (directory / "model.json").write_text(json.dumps({**description, "format": "reid-platform-model/9"}))
    with pytest.raises(ModelFormatError, match="format 'reid-platform-model/9', expected 'reid-platform-model/2'"):
        load_model_dir(directory)
