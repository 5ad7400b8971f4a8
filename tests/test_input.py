"""The DALI CPU pipelines read what was packed: labels of any size, every eval sample once, equal steps."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from reid_platform.config import InputConfig
from reid_platform.data.datasets import DatasetError, load_market1501
from reid_platform.data.pack import PackOptions, pack_dataset
from reid_platform.input.dali import Partition, TrainLoader, eval_batches

CFG = InputConfig(height=64, width=32, batch_size=8, num_threads=1, pad=4, shuffle_buffer=32)


def test_labels_of_any_size_survive_dali(tiny_market, tmp_path):
    splits = load_market1501(tiny_market)
    big = [0, 9, 255, 256, 1000, 65_537, 2_000_000, 123_456_789]
    remap = {s.label: big[s.label] for s in splits["train"]}
    splits["train"] = [dataclasses.replace(s, label=remap[s.label]) for s in splits["train"]]
    out = tmp_path / "shards"
    pack_dataset(splits, tiny_market, out, "market1501", PackOptions(samples_per_shard=25), progress=False)
    loader = TrainLoader(out, Partition(0, 1), CFG, seed=0)
    seen = torch.cat([labels for _, labels in loader])
    assert set(seen.tolist()) <= set(big) and len(set(seen.tolist())) >= 6
    assert loader.num_classes == big[-1] + 1


def test_label_outside_the_manifest_is_named(tiny_shards, tmp_path):
    import json
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["num_classes"] = 3  # the shards hold labels 0..7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"training sample index \d+ has label [3-7], outside the manifest's 3 classes"):
        list(TrainLoader(copy, Partition(0, 1), CFG, seed=0))


def test_train_loader_gives_every_rank_the_same_steps(tiny_shards):
    loaders = [TrainLoader(tiny_shards, Partition(rank, 2), CFG, seed=rank) for rank in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == (96 // 2) // 8
    for loader in loaders:
        for epoch in range(2):  # the reader wraps around; each epoch still has exactly `steps` batches
            batches = list(loader)
            assert len(batches) == len(loader)
            images, labels = batches[0]
            assert images.shape == (8, 3, 64, 32) and images.dtype == torch.float32
            assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 8
    # normalised: roughly zero-mean, with the zero padding showing as the most negative values
    assert -1.5 < images.mean() < 1.5 and images.min() < -1.5


def test_eval_pipeline_reads_each_sample_once_with_ids(tiny_market, tiny_shards):
    expected = load_market1501(tiny_market)["gallery"]
    metas = []
    for rank in range(2):
        for images, meta in eval_batches(tiny_shards, "gallery", Partition(rank, 2), CFG, batch_size=16):
            assert images.shape[1:] == (3, 64, 32)
            metas.append(meta)
    meta = torch.cat(metas)
    assert sorted(meta[:, 3].tolist()) == list(range(len(expected)))
    by_index = {int(row[3]): row for row in meta}
    for index, sample in enumerate(expected):
        assert (int(by_index[index][1]), int(by_index[index][2])) == (sample.person_id, sample.camera_id)
