"""Backbones by name: torchvision ResNets, IBN-a, timm; ImageNet weights through the libraries' own
caches (never downloaded in a test: the files are generated and placed where the caches keep them);
GeM; and every family through the model format, embeddings and ONNX."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import safetensors.torch
import torch
import torchvision
from torch import nn

from reid_platform.errors import ConfigError, ModelFormatError
from reid_platform.model.artifact import load_model_dir, save_model_dir
from reid_platform.model.backbone import GeM, ReIDNet, build_model
from reid_platform.model.config import ModelConfig, Preprocessing
from reid_platform.model.export import export_onnx
from reid_platform.model.resnet import IBN
from tests import REPO

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)

SMALL = Preprocessing(height=64, width=32)


def numbered_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict whose every tensor is recognisable: filled with its position in the dict."""
    return {
        key: (torch.full_like(value, float(number)) if value.dtype.is_floating_point else value)
        for number, (key, value) in enumerate(module.state_dict().items())
    }


def run_python(code: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter (the caches read their folders from the environment)."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)


def test_imagenet_weights_load_from_torch_hub_cache_where_torchvision_keeps_them(tmp_path):
    weights = torchvision.models.ResNet18_Weights.DEFAULT  # IMAGENET1K_V1: resnet18-f37072fd.pth
    cached = tmp_path / "hub" / "checkpoints" / Path(weights.url).name
    cached.parent.mkdir(parents=True)
    torch.save(numbered_state(torchvision.models.resnet18()), cached)
    code = """
import torch
from reid_platform.model.backbone import build_model
from reid_platform.model.config import ModelConfig
for arch in ("resnet18", "resnet18_ibn_a"):
    trunk = build_model(ModelConfig(arch=arch, pretrained="imagenet")).trunk
    print(arch, float(trunk[0].weight.detach()[0, 0, 0, 0]), float(trunk[7][1].conv2.weight.detach().flatten()[0]))
"""
    done = run_python(code, TORCH_HOME=str(tmp_path))
    assert done.returncode == 0, done.stderr
    source = list(torchvision.models.resnet18().state_dict())
    conv1, layer4_conv2 = source.index("conv1.weight"), source.index("layer4.1.conv2.weight")
    lines = done.stdout.splitlines()
    assert lines[0] == f"resnet18 {float(conv1)} {float(layer4_conv2)}"
    assert lines[1] == f"resnet18_ibn_a {float(conv1)} {float(layer4_conv2)}"  # the plain ResNet's weights


def test_missing_cached_weights_name_the_file_to_place(tmp_path):
    done = run_python(
        "from reid_platform.model.backbone import build_model\nfrom reid_platform.model.config import ModelConfig\n"
        "build_model(ModelConfig(arch='resnet50', pretrained='imagenet'))",
        TORCH_HOME=str(tmp_path),
    )
    assert done.returncode != 0
    expected = f"place https://download.pytorch.org/models/resnet50-11ad3fa6.pth at {tmp_path}/hub/checkpoints/resnet50-11ad3fa6.pth"
    assert expected in done.stderr and "workers never download" in done.stderr


def test_ibn_layers_take_both_halves_of_the_plain_resnet_weights(tmp_path):
    plain = torchvision.models.resnet50()
    state = numbered_state(plain)
    torch.save(state, tmp_path / "r50.pth")
    model = build_model(ModelConfig(arch="resnet50_ibn_a", pretrained=str(tmp_path / "r50.pth")))
    block = model.trunk[4][0]  # layer1, first block: its bn1 is IBN
    assert isinstance(block.bn1, IBN) and not isinstance(model.trunk[7][0].bn1, IBN)  # layer4 unchanged
    half = block.bn1.half
    assert half == plain.layer1[0].bn1.num_features // 2 and block.bn1.IN.affine
    torch.testing.assert_close(block.bn1.IN.weight, state["layer1.0.bn1.weight"][:half])
    torch.testing.assert_close(block.bn1.BN.weight, state["layer1.0.bn1.weight"][half:])
    torch.testing.assert_close(block.bn1.BN.running_var, state["layer1.0.bn1.running_var"][half:])
    torch.testing.assert_close(model.trunk[7][2].conv3.weight, state["layer4.2.conv3.weight"])


def test_weights_of_another_architecture_are_named_with_the_first_mismatch(tmp_path):
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "r50.pth")
    with pytest.raises(ModelFormatError, match=r"r50.pth: not resnet18 weights: layer1.0.conv1.weight has shape \(64, 64, 1, 1\), resnet18 needs \(64, 64, 3, 3\)"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "r50.pth")))
    with pytest.raises(ModelFormatError, match="is not a file"):
        build_model(ModelConfig(arch="resnet18", pretrained=str(tmp_path / "nothing.pth")))


def test_timm_weights_load_from_a_file_and_from_the_hugging_face_cache(tmp_path):
    import timm

    source = timm.create_model("resnet10t", num_classes=0)
    state = numbered_state(source)
    safetensors.torch.save_file(state, tmp_path / "resnet10t.safetensors")
    model = build_model(ModelConfig(arch="timm/resnet10t", pretrained=str(tmp_path / "resnet10t.safetensors")), SMALL)
    torch.testing.assert_close(model.trunk.layer4[0].conv1.weight, state["layer4.0.conv1.weight"])
    # the cache layout of huggingface_hub: models--ORG--NAME/{refs/main, snapshots/REVISION/FILE}
    hub_id = timm.models.get_pretrained_cfg("resnet10t").hf_hub_id
    repo = tmp_path / "hf" / f"models--{hub_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    (repo / "snapshots" / ("0" * 40)).mkdir(parents=True)
    safetensors.torch.save_file(state, repo / "snapshots" / ("0" * 40) / "model.safetensors")
    code = """
from reid_platform.model import pretrained
from reid_platform.model.config import ModelConfig
print(pretrained.weights_file(ModelConfig(arch="timm/resnet10t", pretrained="imagenet"), download=False))
pretrained.weights_file(ModelConfig(arch="timm/resnet18", pretrained="imagenet"), download=False)
"""
    done = run_python(code, HF_HUB_CACHE=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    assert done.stdout.strip() == str(repo / "snapshots" / ("0" * 40) / "model.safetensors")
    assert "timm/resnet18's weights are not in the Hugging Face cache" in done.stderr  # and nothing downloaded


def test_unknown_timm_models_are_named_with_close_matches():
    from reid_platform.model.timm_family import check_timm_name

    with pytest.raises(ConfigError, match=r"timm has no model 'resnet5O' \(close: resnet50"):
        check_timm_name("resnet5O")


@pytest.mark.parametrize(
    "arch, pooling, feature_map",
    [("resnet18", "avg", (512, 4, 2)), ("resnet18", "avg", None), ("timm/resnet10t", "gem", (512, 4, 2)),
     ("timm/convnext_atto", "gem", (320, 2, 1)), ("timm/vit_tiny_patch16_224", "avg", (9, 192))],
)  # fmt: skip
def test_every_family_gives_features_embeddings_and_keeps_last_stride_one(arch, pooling, feature_map):
    model = ReIDNet(ModelConfig(arch=arch, pooling=pooling, embedding_dim=16), SMALL).eval()
    images = torch.randn(2, 3, 64, 32)
    if feature_map is not None:  # 64x32 inputs: stride 16 with last stride 1 (32 for convnext, which has none)
        assert tuple(model.forward_features(images).shape[1:]) == feature_map
    embeddings = model.embed(images)
    assert embeddings.shape == (2, 16) and torch.allclose(embeddings.norm(dim=1), torch.ones(2))


def test_gem_is_the_generalised_mean_with_a_learnable_p():
    x = torch.rand(2, 3, 4, 4) + 0.1
    gem = GeM()
    assert gem.p.requires_grad and float(gem.p) == 3.0
    torch.testing.assert_close(gem(x).flatten(1), (x**3).mean(dim=(2, 3)) ** (1 / 3))
    with pytest.raises(ConfigError, match="gem pools feature maps, and timm/vit_tiny_patch16_224 gives tokens"):
        ReIDNet(ModelConfig(arch="timm/vit_tiny_patch16_224", pooling="gem"), SMALL)


@pytest.mark.parametrize("arch", ["resnet18_ibn_a", "timm/resnet10t", "timm/vit_tiny_patch16_224"])
def test_every_family_goes_through_the_model_format_and_onnx(arch, tmp_path):
    model = ReIDNet(ModelConfig(arch=arch, pooling="gem" if "resnet" in arch else "avg", embedding_dim=16), SMALL).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # away from the initial values, so a lost tensor shows
            parameter.add_(torch.randn_like(parameter) * 0.01)
    directory = save_model_dir(model, SMALL, tmp_path / "model")
    loaded, preprocessing = load_model_dir(directory)
    images = torch.randn(3, 3, 64, 32)
    torch.testing.assert_close(loaded.embed(images), model.embed(images))
    assert json.loads((directory / "model.json").read_text())["model"]["arch"] == arch
    check = export_onnx(loaded, preprocessing, tmp_path / "model.onnx", flip=True)
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(["embeddings"], {"images": images.numpy()})
    torch.testing.assert_close(torch.from_numpy(got), model.embed(images, flip=True), atol=1e-4, rtol=1e-4)
    assert check.max_abs_diff <= 1e-4
    assert session.get_modelmeta().custom_metadata_map["flip"] == "true"
