"""Classifier checkpoints load with any world size; the model artifact round-trips without pickle."""

from __future__ import annotations

import pytest
import torch

from reid_platform.errors import ModelFormatError
from reid_platform.model.artifact import load_model_dir, save_model_dir
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig, Preprocessing
from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.parallel.classifier_files import saved_shards, write_shards

CLASSES, DIM = 10, 6


def load_from(model: ShardedClassifier, directory) -> None:
    with saved_shards(directory) as states:
        model.load_shards(states, where=str(directory))


def cosine(embeddings, weight):
    normalize = torch.nn.functional.normalize
    return normalize(embeddings, dim=1) @ normalize(weight, dim=1).t()


def shards(world_size, seed=0):
    return [ShardedClassifier(CLASSES, DIM, rank, world_size, seed=seed) for rank in range(world_size)]


def test_saved_with_two_workers_loads_with_one_and_three(tmp_path):
    saved = shards(2, seed=1)
    for model in saved:
        model.state("momentum").normal_()  # optimizer state worth saving
        write_shards([model.shard_state()], tmp_path)
    full_weight = torch.cat([m.weight.detach() for m in saved])
    full_momentum = torch.cat([m.state("momentum") for m in saved])
    assert full_momentum.abs().sum() > 0
    embeddings = torch.randn(5, DIM)
    reference = cosine(embeddings, full_weight)
    for world_size in (1, 3):
        loaded = shards(world_size, seed=99)
        for model in loaded:
            load_from(model, tmp_path)
        torch.testing.assert_close(torch.cat([m.weight.detach() for m in loaded]), full_weight)
        torch.testing.assert_close(torch.cat([m.state("momentum") for m in loaded]), full_momentum)
        logits = cosine(embeddings, torch.cat([m.weight.detach() for m in loaded]))
        torch.testing.assert_close(logits, reference)


def test_in_memory_states_of_every_rank_load_with_any_world_size():
    saved = shards(3, seed=2)
    states = [model.shard_state() for model in saved]
    (loaded,) = shards(1, seed=99)
    loaded.load_shards(states)
    torch.testing.assert_close(loaded.weight.detach(), torch.cat([m.weight.detach() for m in saved]))


def test_missing_rows_are_named(tmp_path):
    saved = shards(2)
    write_shards([saved[0].shard_state()], tmp_path)  # rank 1's rows [5, 10) never written
    with pytest.raises(ModelFormatError, match=r"cover 5 of rows \[0, 10\); row 5 is in none"):
        load_from(shards(1)[0], tmp_path)


def test_mismatched_classifier_checkpoint_is_refused(tmp_path):
    write_shards([shards(1)[0].shard_state()], tmp_path)
    other = ShardedClassifier(CLASSES + 1, DIM)
    with pytest.raises(ModelFormatError, match="10 classes x 6 dims, this run expects 11 x 6"):
        load_from(other, tmp_path)


def test_model_directory_round_trip(tmp_path):
    model = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=32, last_stride=1)).eval()
    images = torch.randn(2, 3, 64, 32)
    save_model_dir(model, Preprocessing(height=64, width=32), tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "model.json"}
    loaded, preprocessing = load_model_dir(tmp_path)
    assert (preprocessing.height, preprocessing.width) == (64, 32)
    torch.testing.assert_close(loaded.embed(images), model.embed(images))
    assert loaded.embed(images).shape == (2, 32)


def test_last_stride_one_doubles_the_final_map():
    images = torch.randn(1, 3, 128, 64)
    for arch, width in (("resnet18", 512), ("resnet50", 2048)):  # BasicBlock and Bottleneck
        strided = ReIDNet(ModelConfig(arch=arch, last_stride=2)).trunk(images)
        unstrided = ReIDNet(ModelConfig(arch=arch, last_stride=1)).trunk(images)
        assert strided.shape[1:] == (width, 4, 2) and unstrided.shape[1:] == (width, 8, 4)


def test_the_initial_classifier_is_the_same_on_any_world_size():
    from reid_platform.parallel.classifier import INIT_BLOCK_ROWS

    classes = 2 * INIT_BLOCK_ROWS + 5  # ranks' ranges cross the initialisation blocks
    single = ShardedClassifier(classes, 4, seed=3).weight.detach()
    for world_size in (2, 3):
        parts = [ShardedClassifier(classes, 4, rank, world_size, seed=3).weight.detach() for rank in range(world_size)]
        assert torch.equal(torch.cat(parts), single)
    assert not torch.equal(ShardedClassifier(classes, 4, seed=4).weight.detach(), single)


def test_a_checkpoint_of_another_version_is_named_not_half_loaded(tmp_path):
    from reid_platform.train.checkpoint import TRAINER_STATE, open_checkpoint

    old = {"backbone": {}, "backbone_optimizer": {}, "progress": {"epoch": 1, "step": 5, "carried": {}}}
    torch.save(old, tmp_path / TRAINER_STATE)
    with pytest.raises(ModelFormatError, match=r"trainer.pt: holds \['backbone', 'backbone_optimizer', 'progress'\]"):
        with open_checkpoint(tmp_path):
            pass
