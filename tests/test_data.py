"""Dataset parsers on fake trees in each layout, packing (quarantine, resize, determinism), verify."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from reid_platform.cli import main
from reid_platform.data.datasets import (
    SPLITS,
    load_csv,
    load_dataset,
    load_market1501,
    parse_market_style_name,
    with_labels,
)
from reid_platform.data.manifest import MANIFEST, Manifest, ShardDataset, files_sha256
from reid_platform.data.pack import PackOptions, pack_dataset, verify_shards
from reid_platform.data.shard_format import (
    LABEL,
    SAMPLE_INDEX,
    decode_meta,
    index_sample_count,
    read_index,
    write_index,
)
from reid_platform.data.synth import write_synthetic_market1501
from reid_platform.errors import ConfigError, DatasetError

ONE_WORKER = PackOptions(samples_per_shard=40, workers=1)


def image(path: Path, colour=(200, 30, 30), size=(32, 64), fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, fmt)
    return path


def market_style_tree(root: Path, names: dict[str, list[str]], fmt="JPEG") -> Path:
    for folder, files in names.items():
        for i, name in enumerate(files):
            image(root / folder / name, colour=(10 * i % 255, 80, 120), fmt=fmt)
    return root


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
    labels = sorted({s.label for s in with_labels(splits["train"])})
    assert labels == list(range(len(labels)))
    assert all(s.person_id != -1 for split in splits.values() for s in split)  # junk dropped
    assert any(s.person_id == 0 for s in splits["gallery"])  # distractors kept
    assert parse_market_style_name(Path("0002_c1s1_000451_03.jpg")) == (2, 0)
    assert parse_market_style_name(Path("-1_c6s2_000451_03.jpg")) == (-1, 5)
    assert parse_market_style_name(Path("0001_c2_f0046182.jpg")) == (1, 1)  # DukeMTMC-reID
    assert parse_market_style_name(Path("1367_c2_4.png")) == (1367, 1)  # CUHK03-NP


@pytest.mark.parametrize("name", ["2c1s1_000451_03.jpg", "0002_1s1_000451_03.jpg", "0002_c1s1_000451_03.png.jpg", "Thumbs.jpg"])
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


def test_dukemtmc_layout(tmp_path):
    root = market_style_tree(
        tmp_path / "DukeMTMC-reID",
        {
            "bounding_box_train": ["0001_c1_f0000001.jpg", "0001_c2_f0000002.jpg", "0005_c8_f0000003.jpg"],
            "query": ["0002_c1_f0000004.jpg"],
            "bounding_box_test": ["0002_c5_f0000005.jpg", "0003_c1_f0000006.jpg", "0000_c2_f0000007.jpg"],
        },
    )
    splits = load_dataset("dukemtmc", root)
    assert [(s.person_id, s.camera_id) for s in splits["train"]] == [(1, 0), (1, 1), (5, 7)]
    assert [s.label for s in with_labels(splits["train"])] == [0, 0, 1]
    assert {s.source for s in splits["gallery"]} == {"dukemtmc"} and len(splits["gallery"]) == 3


@pytest.mark.parametrize("variant", ["detected", "labeled"])
def test_cuhk03_np_layout_packs_png_as_jpeg(tmp_path, variant):
    root = tmp_path / "cuhk03-np"
    names = {
        "bounding_box_train": ["0001_c1_1.png", "0001_c2_2.png", "0003_c1_1.png"],
        "query": ["0010_c1_1.png", "0011_c1_1.png"],
        "bounding_box_test": ["0010_c2_1.png", "0011_c2_2.png", "0012_c2_1.png"],
    }
    market_style_tree(root / variant, names, fmt="PNG")
    manifest = pack_dataset([(f"cuhk03-np-{variant}", root)], tmp_path / "out", ONE_WORKER, progress=False)
    assert manifest.splits["query"].samples == 2 and manifest.num_classes == 2
    with tarfile.open(tmp_path / "out" / manifest.splits["train"].shards[0].file) as archive:
        jpegs = [archive.extractfile(n).read() for n in archive.getnames() if n.endswith(".jpg")]
    assert len(jpegs) == 3 and all(data[:2] == b"\xff\xd8" for data in jpegs)


@pytest.mark.parametrize("version, train_dir, test_dir", [("V1", "train", "test"), ("V2", "mask_train_v2", "mask_test_v2")])
def test_msmt17_lists(tmp_path, version, train_dir, test_dir):
    root = tmp_path / f"MSMT17_{version}"
    lists = {
        "list_train.txt": [(train_dir, "0000/0000_000_01_0303morning_0015_0.jpg", 0), (train_dir, "0001/0001_003_07_0303noon_0031_1.jpg", 1)],
        "list_val.txt": [(train_dir, "0001/0001_009_15_0303afternoon_0044_0.jpg", 1)],
        "list_query.txt": [(test_dir, "0000/0000_000_02_0303morning_0001_0.jpg", 0)],
        "list_gallery.txt": [(test_dir, "0000/0000_001_05_0303noon_0002_0.jpg", 0), (test_dir, "0002/0002_000_03_0303noon_0003_0.jpg", 2)],
    }
    root.mkdir(parents=True)
    for name, rows in lists.items():
        (root / name).write_text("".join(f"{rel} {pid}\n" for _, rel, pid in rows))
        for folder, rel, _ in rows:
            image(root / folder / rel)
    splits = load_dataset("msmt17", root)
    assert [(s.person_id, s.camera_id) for s in splits["train"]] == [(0, 0), (1, 6), (1, 14)]  # val joins train
    assert splits["query"][0].path == root / test_dir / "0000/0000_000_02_0303morning_0001_0.jpg"
    assert [s.camera_id for s in splits["gallery"]] == [4, 2]
    (root / "list_query.txt").write_text("0000/0000_000_02_0303morning_0001_0.jpg 0\nbroken-line\n")
    with pytest.raises(DatasetError, match=r"list_query.txt:2: expected 'PID/PID_INDEX_CAM_..._N.jpg PID'"):
        load_dataset("msmt17", root)


def test_msmt17_without_its_folders_is_named(tmp_path):
    with pytest.raises(DatasetError, match="neither train/ .MSMT17_V1. nor mask_train_v2/"):
        load_dataset("msmt17", tmp_path)


def test_csv_manifest(tmp_path):
    for name in ("a.jpg", "b.jpg", "c.jpg", "d.jpg"):
        image(tmp_path / "imgs" / name)
    manifest = tmp_path / "data.csv"
    manifest.write_text("path,person_id,camera_id,split\nimgs/a.jpg,7,0,train\nimgs/b.jpg,7,,train\nimgs/c.jpg,3,1,query\nimgs/d.jpg,3,2,gallery\n")
    splits = load_csv(manifest)
    assert [(s.path.name, s.person_id, s.camera_id) for s in splits["train"]] == [("a.jpg", 7, 0), ("b.jpg", 7, 0)]
    assert splits["query"][0].path == tmp_path / "imgs/c.jpg" and len(splits["gallery"]) == 1
    three_columns = tmp_path / "three.csv"
    three_columns.write_text("imgs/a.jpg,1,0\nimgs/b.jpg,2,0\n")  # no header, split defaults to train
    assert len(load_csv(three_columns)["train"]) == 2
    # a training-only manifest packs (no query or gallery shards), with paths relative to the CSV
    manifest = pack_dataset([("csv", three_columns)], tmp_path / "out", ONE_WORKER, progress=False)
    assert manifest.splits["query"].model_dump() == {"samples": 0, "identities": 0, "shards": []}
    assert manifest.sources[0]["root"] == str(tmp_path.resolve()) and manifest.num_classes == 2
    with tarfile.open(tmp_path / "out" / manifest.splits["train"].shards[0].file) as archive:
        paths = sorted(json.loads(archive.extractfile(n).read())["path"] for n in archive.getnames() if n.endswith(".json"))
    assert paths == ["imgs/a.jpg", "imgs/b.jpg"]


@pytest.mark.parametrize(
    "row, message",
    [
        ("imgs/a.jpg,seven,0", r"data.csv:2: person_id and camera_id must be integers, got 'seven'"),
        ("imgs/a.jpg,7,0,validation", r"data.csv:2: split must be one of train, query, gallery, got 'validation'"),
        ("imgs/a.jpg,7", r"data.csv:2: expected path,person_id,camera_id,split .split optional., got 2 fields"),
    ],
)
def test_csv_errors_name_file_and_line(tmp_path, row, message):
    (tmp_path / "data.csv").write_text(f"path,person_id,camera_id\n{row}\n")
    with pytest.raises(DatasetError, match=message):
        load_csv(tmp_path / "data.csv")


def test_combined_datasets_have_disjoint_ids_and_record_offsets(tiny_market, tmp_path):
    duke = market_style_tree(
        tmp_path / "duke",
        {
            "bounding_box_train": ["0001_c1_f1.jpg", "0002_c2_f2.jpg"],
            "query": ["0001_c1_f3.jpg"],
            "bounding_box_test": ["0001_c2_f4.jpg"],
        },
    )
    manifest = pack_dataset([("market1501", tiny_market), ("dukemtmc", duke)], tmp_path / "out", ONE_WORKER, progress=False)
    market_only = Manifest.read(tmp_path / "out").sources[0]
    assert market_only["person_id_offset"] == 0 and market_only["camera_id_offset"] == 0
    duke_entry = manifest.sources[1]
    assert duke_entry["dataset"] == "dukemtmc" and duke_entry["person_id_offset"] > 16
    assert duke_entry["camera_id_offset"] == 3  # tiny_market has cameras 0..2
    assert manifest.num_classes == 8 + 2 and manifest.dataset == "market1501+dukemtmc"
    assert manifest.splits["query"].samples == len(load_market1501(tiny_market)["query"]) + 1


def test_manifest_matches_shards(tiny_shards):
    manifest = json.loads((tiny_shards / MANIFEST).read_text())
    assert manifest["num_classes"] == 8 and manifest["quarantine"] == []
    for split, info in manifest["splits"].items():
        assert sum(s["samples"] for s in info["shards"]) == info["samples"]
        keys, indices = [], []
        for shard in info["shards"]:
            tar = tiny_shards / shard["file"]
            for name, digest in (("file", "sha256"), ("index", "index_sha256"), ("table", "table_sha256")):
                assert hashlib.sha256((tiny_shards / shard[name]).read_bytes()).hexdigest() == shard[digest]
            assert tar.stat().st_size == shard["bytes"]
            with tarfile.open(tar) as archive:
                names = archive.getnames()
                metas = [decode_meta(archive.extractfile(n).read()) for n in names if n.endswith(".meta")]
            keys += [n.split(".", 1)[0] for n in names]
            indices += [m[SAMPLE_INDEX] for m in metas]
            assert all("." not in key for key in keys)
            assert len(metas) == shard["samples"]
        assert len(set(keys)) == info["samples"]
        assert sorted(indices) == list(range(info["samples"]))
    # training samples are shuffled across shards: the first shard is not the first identities
    first = manifest["splits"]["train"]["shards"][0]
    with tarfile.open(tiny_shards / first["file"]) as archive:
        metas = [decode_meta(archive.extractfile(n).read()) for n in archive.getnames() if n.endswith(".meta")]
    labels = {meta[LABEL] for meta in metas}
    assert len(labels) > 4


def test_dali_index_is_written_back_as_read_and_a_malformed_line_is_named(tiny_shards, tmp_path):
    packed = tiny_shards / Manifest.read(tiny_shards).splits["train"].shards[0].index
    index = read_index(packed)
    assert index.version == "v1.2" and len(index.entries) == index_sample_count(packed) == 40
    assert set(index.entries[0].members) == {"jpg", "meta", "json"}
    write_index(tmp_path / "copy.idx", index)
    assert (tmp_path / "copy.idx").read_bytes() == packed.read_bytes()
    header, first, second, *rest = packed.read_text().splitlines()
    key, other = index.entries[0].key, index.entries[1].key
    for number, lines, message in [
        (1, ["v1.2", first], "not a DALI index header"),
        (3, [header, first, second.rsplit(" ", 1)[0]], "not a DALI index line"),
        (2, [header, first.replace(f"{key}.meta", f"{other}.meta")], f"member meta .* {other}.meta of sample {key}"),
    ]:
        broken = tmp_path / "broken.idx"
        broken.write_text("\n".join(lines) + "\n")
        with pytest.raises(DatasetError, match=rf"^{re.escape(str(broken))}:{number}: {message}.*; repack the shard$"):
            read_index(broken)


def test_packing_is_deterministic_in_parallel_and_resizes(tiny_market, tmp_path, monkeypatch):
    options = PackOptions(samples_per_shard=30, workers=2, resize=(48, 24))
    first = pack_dataset([("market1501", tiny_market)], tmp_path / "a", options, progress=False)
    # one worker instead of two, and the root given relative to another working directory
    monkeypatch.chdir(tiny_market.parent)
    relative = PackOptions(samples_per_shard=30, workers=1, resize=(48, 24))
    second = pack_dataset([("market1501", tiny_market.name)], tmp_path / "b", relative, progress=False)
    digests = lambda m: [s.sha256 for split in m.splits.values() for s in split.shards]  # noqa: E731
    assert digests(first) == digests(second) and first.resize == (48, 24)
    with tarfile.open(tmp_path / "a" / first.splits["gallery"].shards[0].file) as archive:
        jpeg = next(archive.extractfile(n).read() for n in archive.getnames() if n.endswith(".jpg"))
    assert Image.open(io.BytesIO(jpeg)).size == (24, 48)


def test_bad_files_are_quarantined_with_reasons_and_the_rest_packs(tiny_market, tmp_path):
    root = tmp_path / "root"
    shutil.copytree(tiny_market, root)
    train = sorted((root / "bounding_box_train").glob("*.jpg"))
    gallery = sorted(p for p in (root / "bounding_box_test").glob("*.jpg") if not p.name.startswith("-1"))
    train[0].write_bytes(train[0].read_bytes()[: len(train[0].read_bytes()) // 2])  # truncated
    train[1].write_bytes(b"")  # zero size
    Image.new("RGB", (8, 8)).save(train[2], "GIF")  # wrong format
    gallery[0].write_bytes(b"not an image at all")  # unreadable
    out = tmp_path / "out"
    assert main(["data", "pack", f"market1501={root}", "--out", str(out), "--workers", "2"]) == 0
    manifest = Manifest.read(out)
    reasons = {Path(q.path).name: q.reason for q in manifest.quarantine}
    assert set(reasons) == {train[0].name, train[1].name, train[2].name, gallery[0].name}
    assert reasons[train[0].name].startswith("corrupt or truncated")
    assert reasons[train[1].name] == "empty file (0 bytes)"
    assert reasons[train[2].name] == "unsupported format GIF (JPEG or PNG expected)"
    assert reasons[gallery[0].name] == "not an image file"
    assert {q.split for q in manifest.quarantine} == {"train", "gallery"}
    original = load_market1501(tiny_market)
    assert manifest.splits["train"].samples == len(original["train"]) - 3
    assert manifest.splits["gallery"].samples == len(original["gallery"]) - 1
    assert manifest.num_classes == 8  # labels are kept: no identity lost all its images
    assert verify_shards(out).problems == []


def test_verify_names_every_mismatch(tiny_shards, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    assert main(["data", "verify", str(copy)]) == 0
    manifest = Manifest.read(copy)
    grown = copy / manifest.splits["gallery"].shards[0].file
    with grown.open("ab") as handle:
        handle.write(b"\0" * 512)
    flipped = copy / manifest.splits["query"].shards[0].file
    data = bytearray(flipped.read_bytes())
    data[600] ^= 0xFF  # same size, different content
    flipped.write_bytes(bytes(data))
    index = copy / manifest.splits["train"].shards[0].index
    index.write_text(index.read_text().replace("jpg", "JPG", 1))
    deleted_index, deleted_tar = copy / manifest.splits["train"].shards[1].index, copy / manifest.splits["train"].shards[2].file
    deleted_index.unlink()
    deleted_tar.unlink()
    unreadable_table = copy / manifest.splits["gallery"].shards[1].table
    unreadable_table.unlink()
    unreadable_table.mkdir()  # open() fails on it even for root
    check = verify_shards(copy)
    problems = check.problems
    assert sorted(check.changed) == [("gallery", 0), ("query", 0)]  # the index edit leaves the tar as it was
    assert check.checked == sum(len(split.shards) for split in manifest.splits.values())
    assert any(p.startswith(f"{grown}: ") and "bytes, the manifest says" in p for p in problems)
    assert any(p.startswith(f"{flipped}: sha256") for p in problems)
    assert any(p.startswith(f"{index}: does not match") for p in problems)
    assert f"{deleted_index}: missing DALI index" in problems
    assert f"{deleted_tar}: missing (train shard listed in the manifest)" in problems
    assert f"{unreadable_table}: missing, unreadable or does not match {unreadable_table.name.split('.')[0]}.tar" in problems
    named = (grown, flipped, index, deleted_index, deleted_tar, unreadable_table)
    assert {p.split(": ", 1)[0] for p in problems} == {str(f) for f in named}
    assert main(["data", "verify", str(copy)]) == 1
    assert "problems" in capsys.readouterr().out


def test_shards_as_packed_are_checked_by_their_digests_and_counts_not_rebuilt(tiny_shards, tmp_path, monkeypatch):
    """Tar, index and table with their packed sha256: nothing is rebuilt from the tars (a rebuild
    here fails the test), and the manifest's own counts are still checked."""
    from reid_platform.data import pack

    def rebuilt(*_):
        raise AssertionError("rebuilt a shard whose files all have their packed sha256")

    for name in ("_tar_sample_count", "IndexCreator", "_table_matches"):
        monkeypatch.setattr(pack, name, rebuilt)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    listed = sum(len(split.shards) for split in Manifest.read(copy).splits.values())
    assert verify_shards(copy) == pack.ShardCheck([], listed, [])
    manifest = json.loads((copy / MANIFEST).read_text())
    shard = manifest["splits"]["gallery"]["shards"][0]
    shard["samples"] += 1
    shard["bytes"] += 1
    (copy / MANIFEST).write_text(json.dumps(manifest))
    tar = copy / shard["file"]
    assert verify_shards(copy).problems == [
        f"{tar}: {tar.stat().st_size} bytes, the manifest says {shard['bytes']}",
        f"{tar}: {shard['samples'] - 1} samples, the manifest says {shard['samples']}",
    ]


def test_a_file_that_cannot_be_read_is_named_not_a_pool_traceback(tmp_path):
    readable, unreadable = tmp_path / "a.tar", tmp_path / "b.tar"
    readable.write_bytes(b"x")
    unreadable.mkdir()  # open() fails on it even for root, as on a file gone or unreadable since it was listed
    assert files_sha256([readable]) == [hashlib.sha256(b"x").hexdigest()]
    with pytest.raises(DatasetError, match=rf"^{unreadable}: cannot be read to hash it: Is a directory$"):
        files_sha256([readable, unreadable])


def test_changed_shard_is_refused(tiny_shards, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(tiny_shards, copy)
    manifest = Manifest.read(copy)
    victim = copy / manifest.splits["gallery"].shards[0].file
    with victim.open("ab") as handle:
        handle.write(b"\0" * 512)
    with pytest.raises(DatasetError, match=rf"{victim}: .* the shard changed after packing"):
        ShardDataset.open(copy)


def test_pack_refuses_nonempty_output_and_unknown_dataset(tiny_market, tiny_shards, tmp_path):
    with pytest.raises(DatasetError, match="not empty"):
        pack_dataset([("market1501", tiny_market)], tiny_shards, ONE_WORKER, progress=False)
    with pytest.raises(DatasetError, match="unknown dataset 'viper'; one of: market1501, dukemtmc"):
        pack_dataset([("viper", tiny_market)], tmp_path / "out", ONE_WORKER, progress=False)


@pytest.mark.parametrize(
    "command, flag, value",
    [
        ("pack", "--samples-per-shard", "0"),
        ("pack", "--samples-per-shard", "-5"),
        ("pack", "--shard-mb", "0"),
        ("pack", "--shard-mb", "-1"),
        ("pack", "--shard-mb", "nan"),
        ("pack", "--workers", "0"),
        ("pack", "--workers", "-2"),
        ("pack", "--jpeg-quality", "101"),
        ("synth", "--identities", "0"),
        ("synth", "--cameras", "0"),
        ("synth", "--cameras", "10"),
        ("synth", "--camera-strength", "-1"),
    ],
)
def test_data_flags_out_of_range_are_one_line_and_write_nothing(
    tiny_market, tmp_path, capsys, command, flag, value
):
    out = tmp_path / "out"
    source = [f"market1501={tiny_market}"] if command == "pack" else []
    assert main(["data", command, *source, "--out", str(out), flag, value]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("reid: config error: ")
    assert f'{flag.removeprefix("--").replace("-", "_")} ({flag}) must' in lines[0]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "field, value",
    [("samples_per_shard", 0), ("samples_per_shard", True), ("shard_mb", float("inf")), ("workers", 0),
     ("jpeg_quality", 101), ("resize", (0, 64)), ("resize", (128,))],
)
def test_pack_options_refuse_what_cannot_be_packed(field, value):
    with pytest.raises(ConfigError, match=rf"^{field} \(--{field.replace('_', '-')}\) must be "):
        PackOptions(**{field: value})


def test_a_pack_that_fails_half_way_leaves_no_folder_and_runs_again(tiny_market, tmp_path, capsys):
    """Gallery is packed after the other splits: with every gallery image broken, packing fails once
    train and query are written. Neither the output folder nor the folder it was written in stays."""
    assert SPLITS[-1] == "gallery"
    root, out = tmp_path / "market", tmp_path / "out"
    shutil.copytree(tiny_market, root)
    gallery = sorted((root / "bounding_box_test").glob("*.jpg"))
    for path in gallery:
        path.write_bytes(b"not an image")
    assert main(["data", "pack", f"market1501={root}", "--out", str(out), "--workers", "1"]) == 1
    err = capsys.readouterr().err  # the progress bars, then the error
    assert list(tmp_path.iterdir()) == [root]
    *progress, error = err.splitlines()
    assert "packing train" in err and not any(line.startswith("reid:") for line in progress)
    assert error.startswith("reid: error: every gallery image was quarantined, nothing to pack")
    for path in gallery:  # the input fixed; an empty output folder is accepted, as before
        shutil.copyfile(tiny_market / path.relative_to(root), path)
    out.mkdir()
    assert main(["data", "pack", f"market1501={root}", "--out", str(out), "--workers", "1"]) == 0
    assert sorted(tmp_path.iterdir()) == [root, out] and verify_shards(out).problems == []
    assert Manifest.read(out).splits["gallery"].samples == len(load_market1501(tiny_market)["gallery"])
