"""`reid index build`: a gallery listed from packed shards, an image folder or a CSV, embedded by a
Ray Data actor pool on a real local cluster, against ``model/inference.embed_images`` of the same
images (read back from the tars by Python's ``tarfile``); resumption, damaged images, refusals."""

from __future__ import annotations

import math
import shutil
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from reid_platform.cli import main
from reid_platform.data.datasets import parse_market_style_name
from reid_platform.data.images import decode_problem
from reid_platform.data.sample_table import SampleTable
from reid_platform.data.shard_format import CAMERA_ID
from reid_platform.model.artifact import load_model_dir, save_model_dir
from reid_platform.model.backbone import ReIDNet
from reid_platform.model.config import ModelConfig, Preprocessing
from reid_platform.model.inference import embed_images
from reid_platform.search.gallery import PARTS_FOLDER, build_gallery
from reid_platform.search.index import GalleryIndex
from reid_platform.search.model import resolve_model
from reid_platform.search.sources import list_entries, read_crop
from reid_platform.storage import files
from reid_platform.storage.location import parse

PRE = Preprocessing(height=64, width=32)
# float32 unit vectors embedded in batches of other sizes and compositions than the oracle's: the
# kernels sum in another order, about 1e-6 apart; a wrong resize, normalisation or flip moves them by 1e-2
ATOL = 1e-5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = ReIDNet(ModelConfig(arch="resnet18", embedding_dim=16), PRE).eval()
    return save_model_dir(model, PRE, tmp_path_factory.mktemp("model") / "model")


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def tar_members(tars: list[str], folder: Path) -> dict[str, Path]:
    """Every JPEG member of the tars extracted by ``tarfile`` (the oracle's reader), by TAR#MEMBER."""
    found = {}
    for tar in tars:
        with tarfile.open(tar) as archive:
            for member in archive.getmembers():
                if member.name.endswith(".jpg"):
                    target = folder / Path(tar).stem / member.name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.extractfile(member).read())
                    found[f"{tar}#{member.name}"] = target
    return found


def oracle(model_dir: Path, paths: list[Path], flip: bool = False) -> np.ndarray:
    return embed_images(*load_model_dir(model_dir), paths, flip=flip)


def built_embeddings(out: Path) -> tuple[np.ndarray, list[str]]:
    """The embeddings of the good entries, in the listing's order, from the build's parts."""
    table = pa.concat_tables([pq.read_table(p) for p in sorted((out / PARTS_FOLDER).glob("part-*.parquet"))])
    good = np.flatnonzero(table.column("problem").to_numpy(zero_copy_only=False) == "")
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))[good]
    return vectors.astype(np.float32), table.column("problem").to_pylist()


def test_entries_of_shards_folders_and_csvs_and_their_crops(tiny_dataset, tiny_shards, tiny_market, tmp_path, s3_bucket):
    entries = list_entries(str(tiny_shards))
    table = SampleTable.read(tiny_dataset, "gallery")
    assert entries.num_rows == tiny_dataset.split("gallery").samples
    assert entries.column("camera").to_pylist() == table.rows[:, CAMERA_ID].tolist()
    assert set(entries.column("source").to_pylist()) == {"market1501"}
    members = tar_members(list(tiny_dataset.split("gallery").tars), tmp_path / "tar")
    assert sorted(entries.column("path").to_pylist()) == sorted(members)
    for path, extracted in members.items():
        assert read_crop(path) == extracted.read_bytes()
    every = list_entries(str(tiny_shards), "all")
    assert every.num_rows == sum(split.samples for split in tiny_dataset.splits.values())

    folder = list_entries(str(tiny_market / "query"))
    images = sorted((tiny_market / "query").glob("*.jpg"))
    assert folder.column("path").to_pylist() == [str(p) for p in images]
    assert folder.column("camera").to_pylist() == [parse_market_style_name(p)[1] for p in images]
    (tmp_path / "mixed").mkdir()
    shutil.copy(images[0], tmp_path / "mixed" / "street.jpg")  # a name without a camera: no name is trusted
    shutil.copy(images[1], tmp_path / "mixed" / images[1].name)
    assert list_entries(str(tmp_path / "mixed")).column("camera").to_pylist() == [-1, -1]

    # CSV: a header naming its columns (others ignored), relative paths and s3:// URIs, both kinds of time
    files.upload(images[2], parse(f"s3://{s3_bucket}/crops/a.jpg"))
    (tmp_path / "crops.csv").write_text(
        "person_id,path,timestamp,camera_id\n"
        f"7,{images[0].name},2026-05-01T12:00:00,3\n7,s3://{s3_bucket}/crops/a.jpg,1700000000.5,\n"
    )
    shutil.copy(images[0], tmp_path / images[0].name)
    rows = list_entries(str(tmp_path / "crops.csv")).to_pylist()
    assert [row["camera"] for row in rows] == [3, -1]
    assert rows[0]["timestamp"] == datetime(2026, 5, 1, 12, tzinfo=UTC).timestamp() and rows[1]["timestamp"] == 1700000000.5
    assert [read_crop(row["path"]) for row in rows] == [images[0].read_bytes(), images[2].read_bytes()]
    (tmp_path / "plain.csv").write_text(f"{images[0].name}\n{images[1].name},2\n")
    plain = list_entries(str(tmp_path / "plain.csv")).to_pylist()
    assert [row["camera"] for row in plain] == [-1, 2] and all(math.isnan(row["timestamp"]) for row in plain)

    # a packed sample in the store: one ranged read by the table's offset
    files.upload_folder(tiny_shards, parse(f"s3://{s3_bucket}/shards"))
    remote = list_entries(f"s3://{s3_bucket}/shards").column("path").to_pylist()
    assert read_crop(remote[5]) == members[entries.column("path")[5].as_py()].read_bytes()


def test_refusals_come_in_one_line_before_anything_starts(model_dir, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "nothing.csv").write_text("path,camera_id\n")
    (tmp_path / "bad.csv").write_text("path,camera_id,timestamp\nx.jpg,1,yesterday\n")
    cases = [
        (["--data", str(tmp_path / "empty")], 1, f"{tmp_path / 'empty'}: the gallery is empty"),
        (["--data", str(tmp_path / "nothing.csv")], 1, "nothing.csv: the gallery is empty (no rows)"),
        (["--data", str(tmp_path / "missing")], 1, f"{tmp_path / 'missing'}: no such folder or file"),
        (["--data", str(tmp_path / "bad.csv")], 1, "bad.csv:2: timestamp 'yesterday' is neither"),
        (["--data", str(tmp_path), "--out", "s3://bucket/index"], 2, "the index is written to a local folder"),
    ]
    for flags, status, message in cases:
        arguments = ["index", "build", "--model", str(model_dir), "--out", str(tmp_path / "out"), *flags]
        assert main(arguments) == status
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert main(["index", "build", "--model", "nobody@champion", "--data", str(tmp_path), "--out", str(tmp_path / "out"),
                 "--tracking-uri", uri]) == 1  # fmt: skip
    assert "has no registered model 'nobody'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.ray
def test_shards_embed_as_embed_images_and_a_rebuild_embeds_only_missing_parts(ray_cluster, model_dir, tiny_dataset, tiny_shards, tmp_path):
    model = resolve_model(str(model_dir), None)
    out = tmp_path / "index"
    first = build_gallery(model, str(tiny_shards), out, part_rows=16, progress=False)
    samples = tiny_dataset.split("gallery").samples
    assert (first.entries, first.embedded, first.skipped) == (samples, samples, [])
    members = tar_members(list(tiny_dataset.split("gallery").tars), tmp_path / "tar")
    listed = list_entries(str(tiny_shards)).column("path").to_pylist()
    expected = oracle(model_dir, [members[path] for path in listed])
    embedded, _ = built_embeddings(out)
    np.testing.assert_allclose(embedded, expected, atol=ATOL)

    index = GalleryIndex.open(out)
    assert index.size == samples and index.metadata.column("path").to_pylist() == listed
    assert (index.model.reference, index.model.version, index.model.feature_dim, index.model.flip) == (str(model_dir), None, 16, False)
    hits = index.search(expected[:3], top_k=1)
    assert [hit[0].path for hit in hits] == listed[:3]

    parts = sorted((out / PARTS_FOLDER).glob("part-*.parquet"))
    removed, kept = parts[1:3], [parts[0], *parts[3:]]
    before = {p: p.stat().st_mtime_ns for p in kept}
    for part in removed:
        part.unlink()
    again = build_gallery(model, str(tiny_shards), out, part_rows=16, progress=False)
    assert again.embedded == sum(pq.read_metadata(p).num_rows for p in removed) > 0
    assert {p: p.stat().st_mtime_ns for p in kept} == before  # the parts that were there are not rewritten
    np.testing.assert_allclose(built_embeddings(out)[0], expected, atol=ATOL)
    assert build_gallery(model, str(tiny_shards), out, part_rows=16, progress=False).embedded == 0


@pytest.mark.ray
def test_a_damaged_image_is_skipped_and_named_or_fails_the_build(ray_cluster, model_dir, tiny_market, tmp_path, capsys):
    """A registered model whose training evaluated with flip: the stamp names its version and the
    gallery is embedded with flip; a damaged image is left out (named) or stops the build (named)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("gallery", artifact_location=str(tmp_path / "artifacts"))).info.run_id
    client.log_param(run_id, "evaluation.flip", "True")
    client.log_artifacts(run_id, str(model_dir), "model")
    source = f"{client.get_run(run_id).info.artifact_uri}/model"
    client.create_registered_model("gallery-model")
    version = client.create_model_version("gallery-model", source, run_id=run_id).version
    client.set_registered_model_alias("gallery-model", "champion", version)

    gallery = tmp_path / "gallery"
    shutil.copytree(tiny_market / "bounding_box_test", gallery)
    damaged = sorted(gallery.glob("*.jpg"))[4]
    damaged.write_bytes(damaged.read_bytes()[:200])  # cut off: truncated, as a half-copied file
    assert decode_problem(damaged.read_bytes())
    good = [p for p in sorted(gallery.glob("*.jpg")) if p != damaged]
    flags = ["--data", str(gallery), "--tracking-uri", uri]

    assert main(["index", "build", "--model", "gallery-model@champion", "--out", str(tmp_path / "skip"), *flags]) == 0
    captured = capsys.readouterr()
    warning = [line for line in captured.err.splitlines() if "warning" in line]
    assert len(warning) == 1 and f"1 of {len(good) + 1} gallery images skipped" in warning[0] and str(damaged) in warning[0]
    index = GalleryIndex.open(tmp_path / "skip")
    assert index.metadata.column("path").to_pylist() == [str(p) for p in good]
    assert index.metadata.column("camera").to_pylist() == [parse_market_style_name(p)[1] for p in good]
    assert (index.model.name, index.model.version, index.model.run_id, index.model.flip) == ("gallery-model", str(version), run_id, True)
    np.testing.assert_allclose(built_embeddings(tmp_path / "skip")[0], oracle(model_dir, good, flip=True), atol=ATOL)
    assert main(["index", "info", str(tmp_path / "skip")]) == 0
    assert '"gallery-model"' in capsys.readouterr().out

    arguments = ["index", "build", "--model", str(model_dir), "--out", str(tmp_path / "fail"), "--on-bad-sample", "fail"]
    assert main([*arguments, *flags]) == 1
    err = capsys.readouterr().err
    reported = [line for line in err.splitlines() if line.startswith("reid:")]  # Ray Data logs its progress too
    assert len(reported) == 1 and str(damaged) in reported[0] and "do not decode" in reported[0], err
    assert not (tmp_path / "fail" / "gallery.json").exists()
