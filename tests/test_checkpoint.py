"""Classifier checkpoints load with any world size; the model artifact round-trips without pickle."""

from __future__ import annotations

import torch

from reid_platform.config import InputConfig
from reid_platform.model.artifact import load_model_dir, save_model_dir
from reid_platform.model.backbone import ModelSpec, ReIDNet
from reid_platform.parallel.classifier import ShardedClassifier

CLASSES, DIM = 10, 6


def cosine(embeddings, weight):
    normalize = torch.nn.functional.normalize
    return normalize(embeddings, dim=1) @ normalize(weight, dim=1).t()


def shards(world_size, seed=0):
    return [ShardedClassifier(CLASSES, DIM, rank, world_size, seed=seed) for rank in range(world_size)]


def test_saved_with_two_workers_loads_with_one_and_three(tmp_path):
    saved = shards(2, seed=1)
    for model in saved:
        model.momentum_buffer.normal_()  # optimizer state worth saving
        model.save_shard(tmp_path)
    full_weight = torch.cat([m.weight.detach() for m in saved])
    full_momentum = torch.cat([m.momentum_buffer for m in saved])
    assert full_momentum.abs().sum() > 0
    embeddings = torch.randn(5, DIM)
    reference = cosine(embeddings, full_weight)
    for world_size in (1, 3):
        loaded = shards(world_size, seed=99)
        for model in loaded:
            model.load_shards(tmp_path)
        torch.testing.assert_close(torch.cat([m.weight.detach() for m in loaded]), full_weight)
        torch.testing.assert_close(torch.cat([m.momentum_buffer for m in loaded]), full_momentum)
        logits = cosine(embeddings, torch.cat([m.weight.detach() for m in loaded]))
        torch.testing.assert_close(logits, reference)


def test_missing_rows_are_named(tmp_path):
    saved = shards(2)
    saved[0].save_shard(tmp_path)  # rank 1's rows [5, 10) never written
    try:
        shards(1)[0].load_shards(tmp_path)
    except ValueError as error:
        assert "cover 5 of rows [0, 10); row 5 is in none" in str(error)
    else:
        raise AssertionError("a checkpoint missing rows loaded silently")


def test_mismatched_classifier_checkpoint_is_refused(tmp_path):
    shards(1)[0].save_shard(tmp_path)
    other = ShardedClassifier(CLASSES + 1, DIM)
    try:
        other.load_shards(tmp_path)
    except ValueError as error:
        assert "10 classes x 6 dims" in str(error) and "11 x 6" in str(error)
    else:
        raise AssertionError("a checkpoint with another class count loaded silently")


def test_model_directory_round_trip(tmp_path):
    model = ReIDNet(ModelSpec("resnet18", embedding_dim=32, last_stride=1)).eval()
    images = torch.randn(2, 3, 64, 32)
    save_model_dir(model, InputConfig(height=64, width=32), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "model.json"}
    loaded, input_cfg = load_model_dir(tmp_path)
    assert (input_cfg.height, input_cfg.width) == (64, 32)
    torch.testing.assert_close(loaded.embed(images), model.embed(images))
    assert loaded.embed(images).shape == (2, 32)


def test_last_stride_one_doubles_the_final_map():
    images = torch.randn(1, 3, 128, 64)
    for arch, width in (("resnet18", 512), ("resnet50", 2048)):  # BasicBlock and Bottleneck
        strided = ReIDNet(ModelSpec(arch, last_stride=2)).trunk(images)
        unstrided = ReIDNet(ModelSpec(arch, last_stride=1)).trunk(images)
        assert strided.shape[1:] == (width, 4, 2) and unstrided.shape[1:] == (width, 8, 4)


def test_local_pretrained_weights_load_into_the_trunk(tmp_path):
    import torchvision

    from reid_platform.model.backbone import load_pretrained_trunk

    source = torchvision.models.resnet18(weights=None)
    torch.save(source.state_dict(), tmp_path / "resnet18.pth")
    model = ReIDNet(ModelSpec("resnet18"))
    load_pretrained_trunk(model, tmp_path / "resnet18.pth")
    torch.testing.assert_close(model.trunk[0].weight, source.conv1.weight)
    torch.testing.assert_close(model.trunk[7][1].conv2.weight, source.layer4[1].conv2.weight)
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), tmp_path / "resnet50.pth")
    try:
        load_pretrained_trunk(model, tmp_path / "resnet50.pth")
    except ValueError as error:
        assert "resnet50.pth" in str(error)
    else:
        raise AssertionError("resnet50 weights loaded into a resnet18")
