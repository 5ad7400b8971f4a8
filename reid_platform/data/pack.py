"""Pack a parsed dataset into WebDataset tar shards with DALI index files and a manifest.

Each sample is three tar members sharing a dot-free key:

- ``KEY.jpg``  the original JPEG bytes (decoded by DALI or PIL),
- ``KEY.meta`` four little-endian int64: training label, person id, camera id, sample index.
  Raw integers rather than webdataset's ASCII ``cls``: DALI reads them exactly for any number of
  classes, and the index restores the original order after a sharded evaluation.
- ``KEY.json`` the source path relative to the dataset root, for error messages and pictures.

Training samples are shuffled across shards (DALI's shuffle buffer is local to the reader), so
every shard holds a mix of identities.
"""

from __future__ import annotations

import hashlib
import json
import random
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm
from wds2idx import IndexCreator

from reid_platform.data.datasets import SPLITS, DatasetError, Sample

MANIFEST = "manifest.json"
META_FIELDS = ("label", "person_id", "camera_id", "index")
FORMAT_VERSION = 1


@dataclass(frozen=True)
class PackOptions:
    samples_per_shard: int = 1000
    bytes_per_shard: int = 256 * 1024**2
    seed: int = 0


def encode_meta(sample: Sample, index: int) -> bytes:
    return np.array([sample.label, sample.person_id, sample.camera_id, index], "<i8").tobytes()


def decode_meta(raw: bytes) -> dict[str, int]:
    return dict(zip(META_FIELDS, np.frombuffer(raw, "<i8").tolist()))


def _read_verified_jpeg(path: Path) -> bytes:
    data = path.read_bytes()
    try:
        with Image.open(path) as image:
            if image.format != "JPEG":
                raise DatasetError(f"{path}: not a JPEG (found {image.format})")
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError) as error:
        raise DatasetError(f"{path}: unreadable image: {error}") from None
    return data


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_split(
    split: str, samples: list[Sample], root: Path, out: Path, options: PackOptions, progress: bool
) -> list[dict]:
    order = list(range(len(samples)))
    if split == "train":
        random.Random(options.seed).shuffle(order)
    pattern = str(out / f"{split}-%06d.tar")
    with wds.ShardWriter(
        pattern, maxcount=options.samples_per_shard, maxsize=options.bytes_per_shard, verbose=0, mtime=0.0
    ) as writer:
        for index in tqdm(order, desc=f"packing {split}", unit="img", disable=not progress):
            sample = samples[index]
            writer.write(
                {
                    "__key__": f"{split}_{index:09d}",
                    "jpg": _read_verified_jpeg(sample.path),
                    "meta": encode_meta(sample, index),
                    "json": json.dumps({"path": str(sample.path.relative_to(root))}).encode(),
                }
            )
    shards = []
    for tar in sorted(out.glob(f"{split}-*.tar")):
        index_path = tar.with_suffix(".idx")
        with IndexCreator(str(tar), str(index_path), verbose=False) as creator:
            creator.create_index()
        shards.append(
            {
                "file": tar.name,
                "index": index_path.name,
                "samples": index_sample_count(index_path),
                "bytes": tar.stat().st_size,
                "sha256": _sha256(tar),
            }
        )
    return shards


def index_sample_count(index_path: Path) -> int:
    """Samples in a shard, from the header of its DALI index ("v1.2 COUNT")."""
    with index_path.open() as handle:
        return int(handle.readline().split()[1])


def pack_dataset(
    splits: dict[str, list[Sample]],
    root: str | Path,
    out: str | Path,
    dataset: str,
    options: PackOptions = PackOptions(),
    progress: bool = True,
) -> dict:
    """Write shards for every split into ``out`` and return the manifest (also written there)."""
    root, out = Path(root), Path(out)
    if out.exists() and any(out.iterdir()):
        raise DatasetError(f"{out}: output folder is not empty; choose a new one or remove it")
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format_version": FORMAT_VERSION,
        "dataset": dataset,
        "root": str(root.resolve()),
        "seed": options.seed,
        "meta_fields": list(META_FIELDS),
        "num_classes": max((s.label for s in splits["train"]), default=-1) + 1,
        "splits": {},
    }
    for split in SPLITS:
        samples = splits[split]
        manifest["splits"][split] = {
            "samples": len(samples),
            "identities": len({s.person_id for s in samples}),
            "shards": _write_split(split, samples, root, out, options, progress),
        }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def read_manifest(shards_dir: str | Path) -> dict:
    path = Path(shards_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: no manifest; run `reid data pack` to create the shards") from None
    except json.JSONDecodeError as error:
        raise DatasetError(f"{path}: manifest is not valid JSON: {error}") from None
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DatasetError(
            f"{path}: format_version {manifest.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    return manifest


def shard_paths(shards_dir: str | Path, manifest: dict, split: str) -> tuple[list[str], list[str]]:
    """(tar paths, index paths) of a split; refuses shards whose size differs from the manifest."""
    shards_dir = Path(shards_dir)
    tars, indexes = [], []
    for shard in manifest["splits"][split]["shards"]:
        tar, index = shards_dir / shard["file"], shards_dir / shard["index"]
        for path in (tar, index):
            if not path.is_file():
                raise DatasetError(f"{path}: shard file listed in the manifest is missing")
        if tar.stat().st_size != shard["bytes"]:
            raise DatasetError(
                f"{tar}: {tar.stat().st_size} bytes, the manifest says {shard['bytes']}; "
                "the shard changed after packing"
            )
        tars.append(str(tar))
        indexes.append(str(index))
    return tars, indexes


def read_images(shards_dir: str | Path, split: str, indices: Iterable[int]) -> dict[int, bytes]:
    """JPEG bytes of the samples of ``split`` with the given dataset indices (for pictures)."""
    wanted = {f"{split}_{index:09d}.jpg": index for index in indices}
    found: dict[int, bytes] = {}
    tars, _ = shard_paths(shards_dir, read_manifest(shards_dir), split)
    for tar_path in tars:
        with tarfile.open(tar_path) as tar:
            for member in tar:
                if member.name in wanted:
                    found[wanted[member.name]] = tar.extractfile(member).read()
        if len(found) == len(wanted):
            break
    missing = sorted(set(wanted.values()) - set(found))
    if missing:
        raise DatasetError(f"{shards_dir}: {split} samples {missing[:5]} are not in its shards")
    return found
