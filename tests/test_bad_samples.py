"""Samples that stop decoding after packing: skipped and named in training, fatal and named in
evaluation and with ``data.on_bad_sample: fail``; the sample tables the search and the identity
sampler read instead of every meta member."""

from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from reid_platform.data.images import decode_problem
from reid_platform.data.manifest import ShardDataset
from reid_platform.data.pack import ShardCheck, verify_shards
from reid_platform.data.sample_table import SampleTable
from reid_platform.data.shard_format import SAMPLE_INDEX, TABLE_COLUMNS, decode_meta
from reid_platform.errors import DatasetError
from reid_platform.input.backend import train_loader
from reid_platform.input.config import InputConfig
from reid_platform.input.dali import eval_batches
from reid_platform.input.partition import Partition
from tests.faults import damage_sample

CFG = InputConfig(height=64, width=32, batch_size=8, num_threads=1, pad=4, shuffle_buffer=32)


@pytest.fixture
def damaged(tiny_shards, tmp_path):
    """A copy of the tiny shards with one training JPEG damaged in place: (dataset, tar, key)."""
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    tar, key = damage_sample(ShardDataset.open(copy), "train", position=5)
    return ShardDataset.open(copy), tar, key


def test_sample_tables_hold_every_meta_member_and_the_jpeg_offsets(tiny_dataset):
    """Against the tar files read with tarfile: every member's data offset, size and meta fields."""
    for split, info in tiny_dataset.splits.items():
        table = SampleTable.read(tiny_dataset, split)
        expected = []
        for tar in info.tars:
            with tarfile.open(tar) as archive:
                members = {member.name: member for member in archive}
                for name in sorted(members):
                    if name.endswith(".jpg"):
                        meta = decode_meta(archive.extractfile(members[name.replace(".jpg", ".meta")]).read())
                        expected.append([*meta.tolist(), members[name].offset_data, members[name].size])
        assert sorted(table.rows.tolist()) == sorted(expected)
        assert table.rows.shape == (info.samples, len(TABLE_COLUMNS))
        assert sorted(table.meta[:, SAMPLE_INDEX].tolist()) == list(range(info.samples))
        first = table.reader()(np.array([0]))[0].tobytes()
        assert decode_problem(first) == "" and first[:2] == b"\xff\xd8"


def test_shards_packed_before_the_tables_are_read_from_their_meta_members(tiny_shards, tiny_dataset, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(tiny_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for entry in manifest["splits"].values():
        for shard in entry["shards"]:
            (copy / shard.pop("table")).unlink()
            del shard["index_sha256"], shard["table_sha256"]  # recorded since the tables
    (copy / "manifest.json").write_text(json.dumps(manifest))
    old = ShardDataset.open(copy)
    assert np.array_equal(SampleTable.read(old).rows, SampleTable.read(tiny_dataset).rows)
    assert verify_shards(copy) == ShardCheck([], sum(len(s.tars) for s in old.splits.values()), [])
    # without the index's digest, verify rebuilds the index from the tar to check it
    index = Path(old.split("gallery").indexes[0])
    index.write_text(index.read_text().replace("jpg", "JPG", 1))
    assert verify_shards(copy).problems == [f"{index}: does not match {Path(old.split('gallery').tars[0]).name} (the tar or the index changed)"]


def test_a_damaged_table_is_named(tiny_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    table = copy / "train-000000.samples.npy"
    np.save(table, np.zeros((3, 2), np.int64))
    with pytest.raises(DatasetError, match=rf"{table}: sample table of int64 \(3, 2\), expected int64 \(\d+, 6\)"):
        SampleTable.read(ShardDataset.open(copy))
    assert f"{table}: missing, unreadable or does not match train-000000.tar" in verify_shards(copy).problems


def test_the_damage_keeps_the_size_and_pil_still_decodes_it(damaged, tiny_shards):
    """PIL, what the search used before, would find nothing; that DALI refuses it the skip tests show
    (a sample is skipped only after DALI's decoder failed on it)."""
    dataset, tar, key = damaged
    assert Path(tar).stat().st_size == (tiny_shards / Path(tar).name).stat().st_size
    table = SampleTable.read(dataset)
    position = [table.key(i) for i in range(len(table.rows))].index(key)
    assert decode_problem(table.reader()(np.array([position]))[0].tobytes()) == ""  # PIL would find nothing
    check = verify_shards(dataset.root)
    assert any(tar in problem and "sha256" in problem for problem in check.problems)
    assert check.changed == [("train", dataset.split("train").tars.index(tar))]


@pytest.mark.parametrize("sampler", ["shuffle", "identity"])
def test_skip_drops_the_bad_sample_names_it_and_keeps_every_batch_full(damaged, sampler, capfd):
    dataset, tar, key = damaged
    cfg = CFG.model_copy(update={"sampler": sampler})
    loader = train_loader(dataset, Partition(0, 1), cfg, seed=0, on_bad_sample="skip")
    epochs = 6  # enough for the identity sampler to draw the bad sample
    batches = [labels for _ in range(epochs) for _, labels in loader]
    assert len(batches) == epochs * len(loader) and all(len(labels) == cfg.batch_size for labels in batches)
    assert [(bad.tar, bad.key) for bad in loader.skipped] == [(tar, key)]
    assert f"skipping a bad training sample: {tar}: sample {key} does not decode (nvImageCodec, DALI's decoder, refuses it" in capfd.readouterr().out


def test_fail_stops_at_the_bad_sample_naming_shard_and_key(damaged):
    dataset, tar, key = damaged
    loader = train_loader(dataset, Partition(0, 1), CFG, seed=0, on_bad_sample="fail")
    with pytest.raises(DatasetError, match=rf"^{tar}: sample {key} does not decode \(nvImageCodec, DALI's decoder, refuses it\); data.on_bad_sample is fail$"):
        for _ in range(2):
            list(loader)


def test_evaluation_never_skips(tiny_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    tar, key = damage_sample(ShardDataset.open(copy), "gallery", position=3)
    with pytest.raises(DatasetError, match=rf"^{tar}: sample {key} does not decode .*evaluation does not skip samples"):
        list(eval_batches(ShardDataset.open(copy), "gallery", Partition(), CFG, 16))


def test_the_torch_backend_skips_what_pil_cannot_decode(tiny_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    tar, key = damage_sample(ShardDataset.open(copy), "train", position=2, lenient_pil=False)
    cfg = CFG.model_copy(update={"backend": "torch"})
    dataset = ShardDataset.open(copy)
    train = dataset.split("train")
    shard = train.tars.index(tar)
    only_the_damaged_shard = Partition(shard, len(train.tars))  # a rank reads tars[rank::world_size]
    loader = train_loader(dataset, only_the_damaged_shard, cfg, seed=0, on_bad_sample="skip")
    epochs = 1 + -(-train.shard_samples[shard] // (len(loader) * cfg.batch_size))  # past the whole shard once
    batches = [labels for _ in range(epochs) for _, labels in loader]
    assert all(len(labels) == cfg.batch_size for labels in batches)
    assert {(bad.tar, bad.key) for bad in loader.skipped} == {(tar, key)}
