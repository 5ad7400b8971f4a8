"""Packed shards read from a real S3 API server give exactly what the same shards give from local
disk: the manifest and sidecars, DALI's training and evaluation batches, the identity sampler's
ranged reads, the torch backend's streams, and `reid data verify`; a changed or missing object is
named by its URI."""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from reid_platform.data.manifest import ShardDataset
from reid_platform.data.pack import read_images, verify_shards
from reid_platform.data.sample_table import SampleTable
from reid_platform.errors import DatasetError
from reid_platform.input.backend import eval_batches, train_loader
from reid_platform.input.config import InputConfig
from reid_platform.input.partition import Partition
from reid_platform.storage import files
from reid_platform.storage.location import S3Uri

CFG = InputConfig(height=64, width=32, batch_size=8, num_threads=1, pad=4, shuffle_buffer=32)
REID = str(Path(sys.executable).parent / "reid")


@pytest.fixture
def remote_shards(tiny_shards, s3_bucket, tmp_path, monkeypatch) -> S3Uri:
    monkeypatch.setenv(files.STAGE_DIR, str(tmp_path / "staged"))  # DALI's whole local copies: the test's own
    prefix = S3Uri(s3_bucket, "datasets/tiny")
    files.upload_folder(tiny_shards, prefix)
    return prefix


def _all(batches) -> tuple[torch.Tensor, torch.Tensor]:
    batches = list(batches)
    return torch.cat([images for images, _ in batches]), torch.cat([meta for _, meta in batches])


def test_the_dataset_opens_from_the_bucket_with_local_sidecars(tiny_dataset, remote_shards):
    remote = ShardDataset.open(str(remote_shards))
    assert remote.root == remote_shards and remote.manifest == tiny_dataset.manifest
    for name, split in tiny_dataset.splits.items():
        theirs = remote.split(name)
        assert theirs.tars == tuple(f"{remote_shards}/{Path(tar).name}" for tar in split.tars)
        assert [Path(index).read_bytes() for index in theirs.indexes] == [Path(i).read_bytes() for i in split.indexes]
        assert all(Path(index).is_file() for index in theirs.indexes + theirs.tables)
    local_table, remote_table = SampleTable.read(tiny_dataset), SampleTable.read(remote)
    assert np.array_equal(local_table.rows, remote_table.rows)
    positions = np.arange(0, len(local_table.rows), 7)
    local_bytes, remote_bytes = local_table.reader()(positions), remote_table.reader()(positions)
    assert all(np.array_equal(a, b) for a, b in zip(local_bytes, remote_bytes))
    assert read_images(remote, "query", [0, 3]) == read_images(tiny_dataset, "query", [0, 3])


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_evaluation_batches_from_the_bucket_equal_the_local_ones(tiny_dataset, remote_shards, backend):
    cfg = CFG.model_copy(update={"backend": backend})
    remote = ShardDataset.open(remote_shards)
    for split in ("query", "gallery"):
        local_images, local_meta = _all(eval_batches(tiny_dataset, split, Partition(0, 1), cfg, 16))
        remote_images, remote_meta = _all(eval_batches(remote, split, Partition(0, 1), cfg, 16))
        assert torch.equal(local_meta, remote_meta) and torch.equal(local_images, remote_images)


@pytest.mark.parametrize(
    "overrides",
    [{}, {"stage_objects": False}, {"sampler": "identity", "images_per_identity": 4}, {"backend": "torch", "num_threads": 1}],
)
def test_training_batches_from_the_bucket_equal_the_local_ones(tiny_dataset, remote_shards, overrides):
    cfg = CFG.model_copy(update=overrides)
    remote = ShardDataset.open(remote_shards)
    local = list(islice(train_loader(tiny_dataset, Partition(0, 1), cfg, seed=5), 3))
    theirs = list(islice(train_loader(remote, Partition(0, 1), cfg, seed=5), 3))
    for (images, labels), (remote_images, remote_labels) in zip(local, theirs, strict=True):
        assert torch.equal(labels, remote_labels) and torch.equal(images, remote_images)


def test_verify_finds_a_changed_object_and_names_it(tiny_shards, remote_shards):
    assert verify_shards(remote_shards).problems == []
    tar = remote_shards / "gallery-000000.tar"
    data = bytearray(files.read_bytes(tar))
    data[1536 : 1536 + 400] = b"\x11" * 400  # the first JPEG's headers; the size stays the same
    files.write_bytes(tar, bytes(data))
    check = verify_shards(remote_shards)
    assert check.changed == [("gallery", 0)]
    assert any(problem.startswith(f"{tar}: sha256") for problem in check.problems)
    result = subprocess.run([REID, "data", "verify", str(remote_shards)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr
    assert f"{tar}: sample gallery_000000000 does not decode" in result.stdout


def test_a_missing_object_is_named_before_anything_reads(remote_shards):
    files.s3.delete(remote_shards / "train-000001.idx")
    with pytest.raises(DatasetError, match=rf"^{remote_shards}/train-000001.idx: shard file listed in the manifest is missing"):
        ShardDataset.open(remote_shards)
    with pytest.raises(DatasetError, match=rf"^{remote_shards}/nowhere/manifest.json: no manifest"):
        ShardDataset.open(remote_shards / "nowhere")


def test_reid_eval_reads_the_bucket_as_it_reads_local_shards(tiny_shards, remote_shards, tmp_path, capsys):
    from reid_platform.cli import main
    from reid_platform.model.artifact import save_model_dir
    from reid_platform.model.backbone import ReIDNet
    from reid_platform.model.config import ModelConfig, Preprocessing

    preprocessing = Preprocessing(height=64, width=32)
    torch.manual_seed(0)
    model = save_model_dir(ReIDNet(ModelConfig(arch="resnet18", embedding_dim=16), preprocessing).eval(), preprocessing, tmp_path / "m")
    metrics = {}
    for where, data in (("local", tiny_shards), ("store", remote_shards)):
        assert main(["eval", "--model", str(model), "--data", str(data), "--out", str(tmp_path / where)]) == 0
        metrics[where] = json.loads((tmp_path / where / "metrics.json").read_text())
    for key in ("mAP", "rank1", "mINP", "cmc"):
        assert metrics["store"][key] == metrics["local"][key], key
    assert metrics["store"]["data"] == str(remote_shards)
