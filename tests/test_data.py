"""Synthetic data, the Market-1501 parser, packing and the manifest."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pytest

from reid_platform.data.datasets import DatasetError, load_market1501, parse_market1501_name
from reid_platform.data.pack import MANIFEST, decode_meta, read_manifest, shard_paths
from reid_platform.data.synth import write_synthetic_market1501


def test_synthetic_data_is_deterministic_and_splits_are_disjoint(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    write_synthetic_market1501(a, identities=6, cameras=2, seed=7, progress=False)
    write_synthetic_market1501(b, identities=6, cameras=2, seed=7, progress=False)
    files = sorted(p.relative_to(a) for p in a.rglob("*.jpg"))
    assert files == sorted(p.relative_to(b) for p in b.rglob("*.jpg"))
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)
    splits = load_market1501(a)
    train_ids = {s.person_id for s in splits["train"]}
    test_ids = {s.person_id for s in splits["query"]} | {s.person_id for s in splits["gallery"]}
    assert train_ids and not train_ids & test_ids


def test_market1501_parser(tiny_market):
    splits = load_market1501(tiny_market)
    labels = sorted({s.label for s in splits["train"]})
    assert labels == list(range(len(labels)))
    assert all(s.person_id != -1 for split in splits.values() for s in split)  # junk dropped
    assert any(s.person_id == 0 for s in splits["gallery"])  # distractors kept
    assert parse_market1501_name(Path("0002_c1s1_000451_03.jpg")) == (2, 0)
    assert parse_market1501_name(Path("-1_c6s2_000451_03.jpg")) == (-1, 5)


@pytest.mark.parametrize("name", ["2_c1s1_000451_03.jpg", "0002_1s1_000451_03.jpg", "0002_c1s1_000451_03.png.jpg", "Thumbs.jpg"])
def test_bad_file_name_is_named(tmp_path, name):
    for folder in ("bounding_box_train", "bounding_box_test", "query"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "0001_c1s1_000001_01.jpg").write_bytes(b"")
    (tmp_path / "bounding_box_train" / name).write_bytes(b"")
    with pytest.raises(DatasetError, match=rf"{name}: file name does not follow the Market-1501 pattern"):
        load_market1501(tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="bounding_box_train"):
        load_market1501(tmp_path)


def test_manifest_matches_shards(tiny_shards):
    manifest = json.loads((tiny_shards / MANIFEST).read_text())
    assert manifest["num_classes"] == 8
    for split, info in manifest["splits"].items():
        assert sum(s["samples"] for s in info["shards"]) == info["samples"]
        keys = []
        for shard in info["shards"]:
            tar = tiny_shards / shard["file"]
            assert hashlib.sha256(tar.read_bytes()).hexdigest() == shard["sha256"]
            assert tar.stat().st_size == shard["bytes"]
            with tarfile.open(tar) as archive:
                names = archive.getnames()
                metas = [decode_meta(archive.extractfile(n).read()) for n in names if n.endswith(".meta")]
            keys += [n.split(".", 1)[0] for n in names]
            assert all("." not in key for key in keys)
            assert len(metas) == shard["samples"]
        assert len(set(keys)) == info["samples"]
    # training samples are shuffled across shards: the first shard is not the first identities
    first = manifest["splits"]["train"]["shards"][0]
    with tarfile.open(tiny_shards / first["file"]) as archive:
        labels = {decode_meta(archive.extractfile(n).read())["label"] for n in archive.getnames() if n.endswith(".meta")}
    assert len(labels) > 4


def test_changed_shard_is_refused(tiny_shards, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    manifest = read_manifest(copy)
    victim = copy / manifest["splits"]["gallery"]["shards"][0]["file"]
    with victim.open("ab") as handle:
        handle.write(b"\0" * 512)
    with pytest.raises(DatasetError, match=rf"{victim}: .* the shard changed after packing"):
        shard_paths(copy, manifest, "gallery")


def test_pack_refuses_nonempty_output(tiny_market, tiny_shards):
    from reid_platform.data.pack import pack_dataset

    with pytest.raises(DatasetError, match="not empty"):
        pack_dataset(load_market1501(tiny_market), tiny_market, tiny_shards, "market1501", progress=False)


def test_unreadable_image_is_named(tiny_market, tmp_path):
    import shutil

    from reid_platform.data.pack import pack_dataset

    root = tmp_path / "root"
    shutil.copytree(tiny_market, root)
    victim = sorted((root / "query").glob("*.jpg"))[0]
    victim.write_bytes(b"not a jpeg")
    with pytest.raises(DatasetError, match=rf"{victim.name}: unreadable image"):
        pack_dataset(load_market1501(root), root, tmp_path / "out", "market1501", progress=False)
