"""The Ray-free training engine, driven directly on real gloo processes: resuming (also at another
world size, through the checkpoint files) and the same global batch giving the same update on 1, 2
and 3 ranks."""

from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

import pytest
import torch

from reid_platform.config import load_config
from reid_platform.data.manifest import ShardDataset
from reid_platform.input.partition import steps_per_epoch
from reid_platform.train.checkpoint import open_checkpoint, save_checkpoint
from reid_platform.train.engine import Engine
from tests import DEMO_CONFIG
from tests.gloo import run_gloo

pytestmark = pytest.mark.numeric  # also run under every CPU capability and thread count (make test-numeric)

GLOBAL_BATCH = 12  # splits over 1, 2 and 3 ranks
BATCH_STATISTICS = "training-mode-batchnorm"  # a run name that makes frozen_norm_steps train BatchNorm


def tiny_config(shards: Path, **overrides):
    # SGD: Adam's first step is about lr * sign(gradient), which turns the last-bit differences of
    # another summation order into whole steps wherever a gradient is near zero.
    settings = {
        "data.shards": shards, "model.embedding_dim": 32, "input.height": 64, "input.width": 32,
        "input.batch_size": 4, "input.shuffle_buffer": 32, "train.warmup_epochs": 0, "train.epochs": 2,
        "train.optimizer": "sgd", "train.lr": 0.05, "loss.scale": 32, **overrides,
    }  # fmt: skip
    return load_config(DEMO_CONFIG, [f"{key}={value}" for key, value in settings.items()])


def global_batches(count: int, num_classes: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(GLOBAL_BATCH, 3, 64, 32, generator=generator, dtype=torch.float64), torch.randint(0, num_classes, (GLOBAL_BATCH,), generator=generator))
        for _ in range(count)
    ]  # fmt: skip


def engine_for(shards: Path, overrides: dict | None = None, dtype=torch.float64) -> Engine:
    """An engine in float64 unless asked otherwise: 1 and W ranks sum in different orders, and only in
    float64 is the rounding of that far below what a wrong gradient would change, on any CPU. Its rank
    and world size are the process group's."""
    torch.set_num_threads(1)
    cfg = tiny_config(shards, **(overrides or {}))
    return Engine(cfg, ShardDataset.open(shards), torch.device("cpu"), dtype)


def frozen_norm_steps(engine: Engine, batches, rank: int, world_size: int, epochs_done: float = 1.0) -> None:
    """Steps with BatchNorm in eval mode (running statistics, not the batch's): the update then does
    not depend on how the global batch is split. With model.sync_bn, BatchNorm stays in training mode:
    its statistics are those of the global batch anyway (and ``BATCH_STATISTICS`` forces it, to show
    what happens without)."""
    engine.network.train(engine.cfg.model.sync_bn or engine.cfg.run.name == BATCH_STATISTICS)
    share = GLOBAL_BATCH // world_size
    for images, labels in batches:
        mine = slice(rank * share, (rank + 1) * share)
        engine.step(images[mine], labels[mine], epochs_done=epochs_done)


def snapshot(engine: Engine) -> dict:
    """What must agree between runs: backbone, its optimizer state, this rank's classifier rows and
    their state, and the progress."""
    optimizer_state = [
        value.clone() for state in engine.optimizer.state_dict()["state"].values()
        for value in state.values() if isinstance(value, torch.Tensor) and value.dim()
    ]  # fmt: skip
    return {
        "backbone": {k: v.clone() for k, v in engine.network.state_dict().items()},
        "momentum": optimizer_state,
        "rows": (engine.classifier.start, engine.classifier.weight.detach().clone()),
        "row_state": {name: engine.classifier.state(name).clone() for name in engine.classifier.optimizer.state_names},
        "progress": dataclasses.replace(engine.progress),
    }


def assert_same_training(runs: list[list[dict]], reference: dict, rtol=1e-9, atol=1e-9):
    # float64 rounding (1e-16) grown as much as float32 rounding grows through the 20 layers' batch
    # statistics (below 1e4x, measured) stays under 1e-9; a wrong gradient differs by 1e-3 and more
    for ranks in runs:
        for got in ranks:
            for key, value in reference["backbone"].items():
                torch.testing.assert_close(got["backbone"][key], value, rtol=rtol, atol=atol, msg=key)
            for a, b in zip(got["momentum"], reference["momentum"]):
                torch.testing.assert_close(a, b, rtol=rtol, atol=atol)
            assert got["progress"] == reference["progress"]
        rows = torch.cat([got["rows"][1] for got in sorted(ranks, key=lambda g: g["rows"][0])])
        torch.testing.assert_close(rows, reference["rows"][1], rtol=rtol, atol=atol)


def step_on_ranks(rank: int, world_size: int, shards: Path, batches, resume_from: str | None = None, overrides=None) -> dict:
    return resume_and_step(rank, world_size, shards, batches, resume_from, overrides)[1]


def resume_and_step(
    rank: int, world_size: int, shards: Path, batches, resume_from: str | None, overrides: dict | None = None
) -> tuple[dict | None, dict]:
    """(the state just loaded from ``resume_from``, the state after ``batches``)."""
    engine = engine_for(shards, overrides)
    loaded = None
    if resume_from is not None:
        with open_checkpoint(Path(resume_from)) as state:
            engine.load_state_dict(state)
        loaded = snapshot(engine)
    frozen_norm_steps(engine, batches, rank, world_size)
    return loaded, snapshot(engine)


def train_and_save(rank: int, world_size: int, shards: Path, batches, directory: str, overrides=None) -> dict:
    engine = engine_for(shards, overrides)
    frozen_norm_steps(engine, batches, rank, world_size)
    save_checkpoint(engine.state_dict(), Path(directory), rank)  # every rank into the same folder
    return snapshot(engine)


@pytest.mark.parametrize("world_size", [2, 3])
def test_one_step_from_the_same_global_batch_is_the_same_update_on_any_world_size(tiny_shards, world_size):
    batches = global_batches(1, ShardDataset.open(tiny_shards).num_classes)
    single = step_on_ranks(0, 1, tiny_shards, batches)
    assert_same_training([run_gloo(world_size, step_on_ranks, tiny_shards, batches)], single)
    # and the step did something: the backbone and every classifier row moved
    untouched = engine_for(tiny_shards)
    moved = single["backbone"]["projection.weight"] - untouched.network.state_dict()["projection.weight"]
    assert moved.abs().max() > 1e-4
    assert (single["rows"][1] != untouched.classifier.weight.detach()).any(dim=1).all()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_a_resume_continues_exactly_where_training_stopped(tiny_shards, tmp_path, optimizer):
    batches = global_batches(4, ShardDataset.open(tiny_shards).num_classes, seed=1)
    settings = {"train.optimizer": optimizer, "train.lr": 0.001}
    uninterrupted = step_on_ranks(0, 1, tiny_shards, batches, overrides=settings)
    train_and_save(0, 1, tiny_shards, batches[:2], str(tmp_path), settings)
    resumed = step_on_ranks(0, 1, tiny_shards, batches[2:], resume_from=str(tmp_path), overrides=settings)
    assert resumed["progress"].step == 4
    assert_same_training([[resumed]], uninterrupted, rtol=0, atol=0)  # bit for bit


def test_a_resume_at_another_world_size_loads_the_same_state_and_trains_on_the_same(tiny_shards):
    batches = global_batches(3, ShardDataset.open(tiny_shards).num_classes, seed=2)
    with tempfile.TemporaryDirectory() as directory:
        saved = run_gloo(2, train_and_save, tiny_shards, batches[:2], directory)
        loaded, continued = zip(*run_gloo(3, resume_and_step, tiny_shards, batches[2:], directory))
        reference = step_on_ranks(0, 1, tiny_shards, batches[2:], resume_from=directory)
    # what 3 ranks loaded is what 2 saved: backbone, optimizer, the classifier's rows re-sharded
    assert_same_training([list(loaded)], saved[0] | {"rows": (0, torch.cat([s["rows"][1] for s in saved]))})
    assert reference["progress"].step == 3
    assert_same_training([list(continued)], reference)  # and the next step is the same as on 1 rank


def test_run_reports_every_epoch_with_counts_from_the_data(tiny_shards):
    """One process, the real DALI input: the untrained evaluation, then one record per epoch."""
    engine = engine_for(tiny_shards, dtype=torch.float32)  # as a run trains
    steps = steps_per_epoch(engine.dataset.split("train").samples, 1, engine.cfg.input.batch_size)
    records = [outcome.record for outcome in engine.run()]
    assert [r.epoch for r in records] == [1, 2] and engine.progress.epoch == 2
    assert [step for r in records for step, _ in r.step_losses] == list(range(1, 2 * steps + 1))
    assert records[0].evaluation is None and records[1].evaluation is not None  # eval_every 0: at the end
    assert 0 < records[1].before_training["mAP"] <= 1 and records[1].evaluation["valid_queries"] > 0
    assert records[1].lr == pytest.approx(0.05 * 0.01)  # the cosine schedule's floor at the end
    assert list(engine.run()) == []  # nothing left to train


@pytest.mark.parametrize("world_size", [2, 3])
def test_with_sync_bn_batchnorm_in_training_mode_gives_the_same_update_on_any_split(tiny_shards, world_size):
    """model.sync_bn: statistics of the global batch, so even training-mode BatchNorm does not care
    how the batch is split (without it, each rank normalises by its own share's statistics)."""
    batches = global_batches(1, ShardDataset.open(tiny_shards).num_classes, seed=3)
    synced = {"model.sync_bn": True}
    single = step_on_ranks(0, 1, tiny_shards, batches, overrides=synced)
    assert_same_training([run_gloo(world_size, step_on_ranks, tiny_shards, batches, None, synced)], single)
    unsynced = run_gloo(world_size, step_on_ranks, tiny_shards, batches, None, {"run.name": BATCH_STATISTICS})
    with pytest.raises(AssertionError):  # the test can tell: each rank's own batch statistics change the update
        assert_same_training([unsynced], single)


def freeze_steps(rank: int, world_size: int, shards: Path, batches) -> dict:
    engine = engine_for(shards, {"train.freeze_backbone_epochs": 1})
    before = snapshot(engine)
    frozen_norm_steps(engine, batches, rank, world_size, epochs_done=0.5)  # inside the warm-up
    during = snapshot(engine)
    frozen_norm_steps(engine, batches, rank, world_size, epochs_done=1.5)
    return {"before": before, "during": during, "after": snapshot(engine), "trunk_state": [
        key for key, value in engine.optimizer.state.items() if any(key is p for p in engine.trunk_parameters)
    ]}  # fmt: skip


def test_the_freeze_warm_up_trains_only_the_neck_and_the_classifier(tiny_shards):
    batches = global_batches(1, ShardDataset.open(tiny_shards).num_classes, seed=4)
    result = freeze_steps(0, 1, tiny_shards, batches)
    before, during, after = result["before"]["backbone"], result["during"]["backbone"], result["after"]["backbone"]
    trunk = [key for key in before if key.startswith("trunk.") and before[key].dtype.is_floating_point and "running" not in key]
    assert trunk and all(torch.equal(during[key], before[key]) for key in trunk)
    assert not torch.equal(during["bnneck.weight"], before["bnneck.weight"])  # the neck trains
    assert not torch.equal(result["during"]["rows"][1], result["before"]["rows"][1])  # and the classifier
    assert any(not torch.equal(after[key], during[key]) for key in trunk)  # the trunk trains after it
