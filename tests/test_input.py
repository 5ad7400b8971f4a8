"""The DALI CPU pipelines read what was packed: labels of any size, every eval sample once, equal steps."""

from __future__ import annotations

import dataclasses
from itertools import islice

import numpy as np
import pytest
import torch

from reid_platform.data.datasets import load_dataset, load_market1501, with_labels
from reid_platform.data.manifest import ShardDataset
from reid_platform.data.pack import PackOptions, pack_splits
from reid_platform.data.sample_table import SampleTable
from reid_platform.data.shard_format import CAMERA_ID, LABEL, PERSON_ID, SAMPLE_INDEX
from reid_platform.errors import DatasetError
from reid_platform.input.backend import eval_batches as eval_batches_for
from reid_platform.input.backend import train_loader
from reid_platform.input.config import InputConfig
from reid_platform.input.dali import TrainLoader, eval_batches
from reid_platform.input.identity import identity_batches
from reid_platform.input.partition import Partition

CFG = InputConfig(height=64, width=32, batch_size=8, num_threads=1, pad=4, shuffle_buffer=32)


def test_labels_of_any_size_survive_dali(tiny_market, tmp_path):
    splits = load_dataset("market1501", tiny_market)
    splits["train"] = with_labels(splits["train"])
    big = [0, 9, 255, 256, 1000, 65_537, 2_000_000, 123_456_789]
    remap = {s.label: big[s.label] for s in splits["train"]}
    splits["train"] = [dataclasses.replace(s, label=remap[s.label]) for s in splits["train"]]
    out = tmp_path / "shards"
    sources = [{"dataset": "market1501", "root": str(tiny_market)}]
    pack_splits(splits, sources, out, PackOptions(samples_per_shard=25, workers=1), progress=False)
    dataset = ShardDataset.open(out)
    seen = torch.cat([labels for _, labels in TrainLoader(dataset, Partition(0, 1), CFG, seed=0)])
    assert set(seen.tolist()) <= set(big) and len(set(seen.tolist())) >= 6
    assert dataset.num_classes == big[-1] + 1


def test_label_outside_the_manifest_is_named(tiny_shards, tmp_path):
    import json
    import shutil

    copy = tmp_path / "shards"
    shutil.copytree(tiny_shards, copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["num_classes"] = 3  # the shards hold labels 0..7
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match=r"training sample index \d+ has label [3-7], outside the manifest's 3 classes"):
        list(TrainLoader(ShardDataset.open(copy), Partition(0, 1), CFG, seed=0))


def test_train_loader_gives_every_rank_the_same_steps(tiny_dataset):
    loaders = [TrainLoader(tiny_dataset, Partition(rank, 2), CFG, seed=rank) for rank in range(2)]
    assert len(loaders[0]) == len(loaders[1]) == (tiny_dataset.split("train").samples // 2) // 8
    for loader in loaders:
        for epoch in range(2):  # the reader wraps around; each epoch still has exactly `steps` batches
            batches = list(loader)
            assert len(batches) == len(loader)
            images, labels = batches[0]
            assert images.shape == (8, 3, 64, 32) and images.dtype == torch.float32
            assert labels.dtype == torch.int64 and 0 <= labels.min() and labels.max() < 8
    # normalised: roughly zero-mean, with the zero padding showing as the most negative values
    assert -1.5 < images.mean() < 1.5 and images.min() < -1.5


def test_eval_pipeline_reads_each_sample_once_with_ids(tiny_market, tiny_dataset):
    expected = load_market1501(tiny_market)["gallery"]
    metas = []
    for rank in range(2):
        for images, meta in eval_batches(tiny_dataset, "gallery", Partition(rank, 2), CFG, batch_size=16):
            assert images.shape[1:] == (3, 64, 32)
            metas.append(meta)
    meta = torch.cat(metas)
    assert sorted(meta[:, SAMPLE_INDEX].tolist()) == list(range(len(expected)))
    by_index = {int(row[SAMPLE_INDEX]): row for row in meta}
    for index, sample in enumerate(expected):
        row = by_index[index]
        assert (int(row[PERSON_ID]), int(row[CAMERA_ID])) == (sample.person_id, sample.camera_id)


def test_dali_and_torch_backends_apply_the_same_augmentation(tiny_dataset):
    """Both backends, same transforms: equal shapes, labels from the manifest, erased zero boxes."""
    cfg = CFG.model_copy(update=dict(erasing_prob=1.0, brightness=0.3, contrast=0.3, saturation=0.3, hue=0.05))
    erased = {}
    for backend in ("dali", "torch"):
        loader = train_loader(tiny_dataset, Partition(0, 1), cfg.model_copy(update={"backend": backend}), seed=1)
        images, labels = next(iter(loader))
        assert images.shape == (8, 3, 64, 32) and images.dtype == torch.float32
        assert ((labels >= 0) & (labels < tiny_dataset.num_classes)).all()
        assert len(loader) == tiny_dataset.split("train").samples // 8
        # every image has one erased rectangle of zeros (normalised padding is -mean/std, never 0)
        fractions = (images == 0).all(1).flatten(1).float().mean(1)
        assert (fractions > 0).all()
        erased[backend] = fractions.mean().item()
    # torchvision draws 2-33% of the area (retrying what does not fit); DALI clips instead
    assert 0.02 < erased["dali"] < 0.4 and 0.02 < erased["torch"] < 0.4


def test_torch_backend_evaluation_reads_every_sample_once(tiny_dataset):
    cfg = CFG.model_copy(update={"backend": "torch", "num_threads": 2})
    # one rank with 2 DataLoader workers over the gallery's 2 shards, then 2 ranks with 1 shard each
    for world_size in (1, 2):
        metas = [
            torch.cat([m for _, m in eval_batches_for(tiny_dataset, "gallery", Partition(r, world_size), cfg, 16)])
            for r in range(world_size)
        ]
        indices = torch.cat(metas)[:, SAMPLE_INDEX].sort().values
        assert torch.equal(indices, torch.arange(tiny_dataset.split("gallery").samples))
    # three ranks for one query shard: two of them read nothing, and say so with no batches
    assert len(tiny_dataset.split("query").tars) == 1
    assert list(eval_batches_for(tiny_dataset, "query", Partition(2, 3), cfg, 16)) == []


def test_identity_sampler_gives_p_identities_of_k_images(tiny_dataset):
    table = SampleTable.read(tiny_dataset)
    assert sorted(table.meta[:, SAMPLE_INDEX].tolist()) == list(range(tiny_dataset.split("train").samples))
    batches = identity_batches(table.meta[:, LABEL], identities=4, images=5, seed=3)
    for _ in range(20):
        labels = table.meta[next(batches), LABEL]
        assert len(labels) == 20 and np.array_equal(np.unique(labels, return_counts=True)[1], [5] * 4)
    # through DALI: decoded, augmented batches whose labels come in 2 groups of 4
    cfg = CFG.model_copy(update={"sampler": "identity", "images_per_identity": 4})
    loaders = [TrainLoader(tiny_dataset, Partition(rank, 2), cfg, seed=rank) for rank in range(2)]
    firsts = []
    for loader in loaders:
        images, labels = next(iter(loader))
        assert images.shape == (8, 3, 64, 32)
        assert sorted(torch.unique(labels, return_counts=True)[1].tolist()) == [4, 4]
        firsts.append(labels)
    assert not torch.equal(firsts[0], firsts[1])  # each rank draws with its own seed


def test_identity_sampler_refuses_what_cannot_work(tiny_dataset):
    with pytest.raises(ValueError, match=r"batch_size \(8\) must be a multiple of input.images_per_identity \(3\)"):
        InputConfig.model_validate({**CFG.model_dump(), "sampler": "identity", "images_per_identity": 3})
    with pytest.raises(ValueError, match="input.sampler identity needs input.backend dali"):
        InputConfig.model_validate({**CFG.model_dump(), "sampler": "identity", "backend": "torch"})
    table = SampleTable.read(tiny_dataset)
    with pytest.raises(DatasetError, match="8 training identities cannot fill batches of 9 identities"):
        next(identity_batches(table.meta[:, LABEL], identities=9, images=2, seed=0))


def test_a_sample_that_no_longer_decodes_is_named(tiny_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    tar = copy / "gallery-000000.tar"
    data = bytearray(tar.read_bytes())
    data[1536 : 1536 + 400] = b"\x11" * 400  # the first JPEG's headers; the size stays the same
    tar.write_bytes(bytes(data))
    with pytest.raises(DatasetError, match=rf"{tar}: sample gallery_000000000 does not decode"):
        list(eval_batches(ShardDataset.open(copy), "gallery", Partition(), CFG, 16))
    # the torch backend decodes in DataLoader workers; the message still names the sample, alone
    torch_cfg = CFG.model_copy(update={"backend": "torch"})
    with pytest.raises(DatasetError, match=rf"^{tar}: sample gallery_000000000 does not decode") as error:
        list(eval_batches_for(ShardDataset.open(copy), "gallery", Partition(), torch_cfg, 16))
    assert "Traceback" not in str(error.value)


def test_dali_colour_jitter_follows_torchvision_factors():
    """Contrast pivots on the mean grey (a flat image stays flat, as in torchvision); brightness scales."""
    import numpy as np
    from nvidia.dali import fn, pipeline_def

    from reid_platform.input.dali import _color_jitter

    flat = [np.full((8, 8, 3), value, np.uint8) for value in (50, 120, 200, 90)]

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=0)
    def jitter(cfg):
        return _color_jitter(fn.external_source(source=lambda: flat, batch=True, layout="HWC"), cfg)

    contrast_only = jitter(CFG.model_copy(update={"contrast": 0.5}))
    contrast_only.build()
    (out,) = contrast_only.run()
    assert all(np.array_equal(np.array(out[i]), flat[i]) for i in range(4))
    brightness_only = jitter(CFG.model_copy(update={"brightness": 0.4}))
    brightness_only.build()
    (out,) = brightness_only.run()
    ratios = [float(np.array(out[i]).mean()) / float(flat[i].mean()) for i in (0, 1, 3)]
    assert all(0.59 <= r <= 1.41 for r in ratios) and len({round(r, 3) for r in ratios}) > 1


def test_erasing_boxes_follow_torchvision_random_erasing():
    """Same draws as torchvision's RandomErasing.get_params: compare the distributions on 20k boxes."""
    from torchvision.transforms import RandomErasing

    from reid_platform.input.dali import ErasingBoxes

    cfg = InputConfig(height=256, width=128, erasing_prob=0.5)
    anchors, shapes = ErasingBoxes(cfg, 20_000, seed=0)()
    erased = shapes[:, 0] > 0
    assert abs(erased.mean() - 0.5) < 0.02
    assert ((anchors + shapes) <= [256, 128]).all() and (shapes < [256, 128]).all()
    assert (anchors[erased] + shapes[erased] == [256, 128]).any(axis=0).all()  # the last positions occur
    torch.manual_seed(0)
    image = torch.zeros(3, 256, 128)
    theirs = np.array([RandomErasing.get_params(image, (0.02, 0.33), (0.3, 3.3), [0.0])[2:4] for _ in range(10_000)])
    ours_area, their_area = (shapes[erased].prod(1) / (256 * 128)), theirs.prod(1) / (256 * 128)
    assert abs(ours_area.mean() - their_area.mean()) < 0.005


def test_shards_packed_at_the_input_size_skip_the_resize_and_decode_the_same(tiny_market, tmp_path, monkeypatch):
    from reid_platform.data.pack import pack_dataset
    from reid_platform.input import dali

    shards = tmp_path / "at-size"
    pack_dataset([("market1501", tiny_market)], shards, PackOptions(workers=1, resize=(CFG.height, CFG.width)), progress=False)
    dataset = ShardDataset.open(shards)
    assert dali.packed_at_input_size(dataset, CFG) and not dali.packed_at_input_size(dataset, CFG.model_copy(update={"height": 128}))

    def gallery():
        batches = list(eval_batches(dataset, "gallery", Partition(0, 1), CFG, batch_size=16))
        return torch.cat([images for images, _ in batches]), torch.cat([meta for _, meta in batches])

    skipped, skipped_meta = gallery()
    monkeypatch.setattr(dali, "packed_at_input_size", lambda *_: False)
    resized, resized_meta = gallery()
    assert torch.equal(skipped_meta, resized_meta) and skipped.shape == resized.shape
    torch.testing.assert_close(skipped, resized, rtol=0, atol=1e-5)  # a resize to the same size changes nothing


def test_erase_zeroes_each_box_across_channels_and_nothing_else():
    from reid_platform.input.dali import erase

    images = torch.ones(3, 3, 8, 6)
    anchors, shapes = np.array([[1, 2], [0, 0], [6, 5]]), np.array([[3, 2], [0, 0], [2, 1]])  # the second: no box
    erase(images, anchors, shapes)
    expected = torch.ones(3, 3, 8, 6)
    expected[0, :, 1:4, 2:4] = 0
    expected[2, :, 6:8, 5:6] = 0
    assert torch.equal(images, expected)


@pytest.mark.parametrize("start", [(-4, -4), (4, 4), (-4, 3), (0, 0), (2, -1)])
def test_padded_window_is_the_window_of_the_zero_padded_image(start):
    """DALI's one-copy window equals padding with zeros and cropping, as torchvision's Pad + RandomCrop."""
    from nvidia.dali import fn, pipeline_def, types

    from reid_platform.input.dali import padded_window

    image = np.random.default_rng(0).integers(1, 256, (CFG.height, CFG.width, 3), dtype=np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def window():
        images = fn.external_source(source=lambda: [image], batch=True, layout="HWC", dtype=types.UINT8)
        offsets = fn.external_source(source=lambda: [np.array(start, np.int32)], batch=True, dtype=types.INT32)
        return padded_window(images, CFG, offsets)

    pipe = window()
    pipe.build()
    (out,) = pipe.run()
    padded = np.pad(image, ((CFG.pad, CFG.pad), (CFG.pad, CFG.pad), (0, 0)))
    top, left = start[0] + CFG.pad, start[1] + CFG.pad
    assert np.array_equal(np.array(out[0]), padded[top : top + CFG.height, left : left + CFG.width])


def test_the_torch_backend_is_reproducible_from_its_seed(tiny_dataset):
    """Shard draws, shuffle buffer and augmentation all follow ``seed``, as DALI's do; the two
    DataLoader workers, which take turns at the batches, draw different samples."""
    cfg = CFG.model_copy(update={"backend": "torch", "num_threads": 2})
    first_batches = lambda seed: list(islice(train_loader(tiny_dataset, Partition(0, 1), cfg, seed=seed), 2))
    (images, labels), (_, second_worker_labels) = first_batches(5)
    ((same_images, same_labels), _), ((other_seed_images, _), _) = first_batches(5), first_batches(6)
    assert torch.equal(images, same_images) and torch.equal(labels, same_labels)
    assert not torch.equal(images, other_seed_images) and not torch.equal(labels, second_worker_labels)
