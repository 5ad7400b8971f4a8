"""Dataset parsers: a dataset root on disk -> lists of samples per split.

Every parser returns the same thing, so packing never needs to know where the data came from:
``{"train": [...], "query": [...], "gallery": [...]}`` of ``Sample``. Parsers keep raw person and
camera ids (camera ids start at 0); ``with_labels`` gives training samples contiguous labels once
packing knows which images survived verification. Junk boxes (id -1) are dropped; Market-1501's
distractors (id 0) stay in the gallery. ``combine`` merges several datasets into one with disjoint
identities and cameras.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from reid_platform.errors import DatasetError

SPLITS = ("train", "query", "gallery")
Splits = dict[str, list["Sample"]]


@dataclass(frozen=True)
class Sample:
    path: Path
    person_id: int
    camera_id: int
    label: int = -1  # contiguous training label (``with_labels``); -1 for query/gallery samples
    source: str = ""  # dataset the sample came from, when several are combined


def with_labels(samples: list[Sample]) -> list[Sample]:
    """Training samples with contiguous labels 0..C-1, in person id order."""
    labels = {pid: label for label, pid in enumerate(sorted({s.person_id for s in samples}))}
    return [replace(s, label=labels[s.person_id]) for s in samples]


# Market-1501 0002_c1s1_000451_03.jpg, DukeMTMC-reID 0001_c2_f0046182.jpg, CUHK03-NP 0001_c1_1.png:
# person id (-1 marks junk), then the camera.
_MARKET_STYLE_NAME = re.compile(r"^(-1|\d+)_c(\d+)[^./]*\.(jpg|png)$")
_MARKET_STYLE_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def parse_market_style_name(path: Path) -> tuple[int, int]:
    """(person_id, camera_id) from a Market-1501 / DukeMTMC-reID / CUHK03-NP file name."""
    match = _MARKET_STYLE_NAME.match(path.name)
    if match is None:
        raise DatasetError(
            f"{path}: file name does not follow the Market-1501 pattern 'PPPP_cC....jpg' "
            "(e.g. 0002_c1s1_000451_03.jpg, 0001_c2_f0046182.jpg or 0001_c1_1.png)"
        )
    return int(match.group(1)), int(match.group(2)) - 1


def _load_market_style(root: Path, layout: str, extension: str) -> Splits:
    splits: Splits = {}
    for split, folder in _MARKET_STYLE_FOLDERS.items():
        directory = root / folder
        if not directory.is_dir():
            raise DatasetError(f"{directory}: missing folder '{folder}' of the {layout} layout")
        paths = sorted(directory.glob(f"*.{extension}"))
        if not paths:
            raise DatasetError(f"{directory}: no .{extension} images")
        samples = [Sample(path, *parse_market_style_name(path)) for path in paths]
        splits[split] = [s for s in samples if s.person_id != -1]
    distractors = [s.path for s in splits["train"] if s.person_id == 0 and layout == "Market-1501"]
    if distractors:
        raise DatasetError(f"{distractors[0]}: distractor id 0 in the training split")
    return splits


def load_market1501(root: str | Path) -> Splits:
    return _load_market_style(Path(root), "Market-1501", "jpg")


def load_dukemtmc(root: str | Path) -> Splits:
    return _load_market_style(Path(root), "DukeMTMC-reID", "jpg")


def load_cuhk03_np(root: str | Path, variant: str) -> Splits:
    """CUHK03-NP (Zhong et al.'s new protocol): ``root/{detected,labeled}/`` in the Market layout, PNG."""
    return _load_market_style(Path(root) / variant, f"CUHK03-NP {variant}", "png")


# MSMT17 lists: "0000/0000_000_01_0303morning_0015_0.jpg 0" -> folder/pid_index_camera_..., label
_MSMT_LISTS = {"train": ("train", ["list_train.txt", "list_val.txt"]), "query": ("test", ["list_query.txt"]), "gallery": ("test", ["list_gallery.txt"])}
_MSMT_FOLDERS = {"V1": {"train": "train", "test": "test"}, "V2": {"train": "mask_train_v2", "test": "mask_test_v2"}}


def load_msmt17(root: str | Path) -> Splits:
    """MSMT17 from its list files, V1 (train/, test/) or V2 (mask_train_v2/, mask_test_v2/) layout.

    Training uses list_train and list_val (as fast-reid and torchreid); cameras come from the file
    name (the third field, 1-15).
    """
    root = Path(root)
    version = next((v for v, folders in _MSMT_FOLDERS.items() if (root / folders["train"]).is_dir()), None)
    if version is None:
        raise DatasetError(f"{root}: neither train/ (MSMT17_V1) nor mask_train_v2/ (MSMT17_V2) is there")
    splits: Splits = {}
    for split, (part, lists) in _MSMT_LISTS.items():
        folder = root / _MSMT_FOLDERS[version][part]
        samples = []
        for name in lists:
            list_path = root / name
            if not list_path.is_file():
                raise DatasetError(f"{list_path}: missing MSMT17 list file")
            for number, line in enumerate(list_path.read_text().splitlines(), 1):
                if not line.strip():
                    continue
                fields = line.split()
                relative = fields[0]
                name_fields = Path(relative).name.split("_")
                if len(fields) != 2 or len(name_fields) < 4 or not fields[1].isdigit() or not name_fields[2].isdigit():
                    raise DatasetError(
                        f"{list_path}:{number}: expected 'PID/PID_INDEX_CAM_..._N.jpg PID', got {line.strip()!r}"
                    )
                samples.append(Sample(folder / relative, int(fields[1]), int(name_fields[2]) - 1))
        splits[split] = samples
    return splits


_CSV_COLUMNS = ("path", "person_id", "camera_id", "split")


def load_csv(path: str | Path) -> Splits:
    """A manifest ``path,person_id,camera_id[,split]`` (header optional; paths relative to the file).

    ``split`` is train (the default), query or gallery. An empty camera_id becomes 0: evaluate such
    data with ``evaluation.protocol: no_camera``.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: CSV manifest not found")
    splits: Splits = {split: [] for split in SPLITS}
    with path.open(newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if not row or (number == 1 and row[:2] == ["path", "person_id"]):
                continue
            if len(row) not in (3, 4):
                raise DatasetError(f"{path}:{number}: expected {','.join(_CSV_COLUMNS)} (split optional), got {len(row)} fields")
            image, person, camera, split = (*row, "train") if len(row) == 3 else row
            split = split.strip() or "train"
            try:
                person_id, camera_id = int(person), int(camera) if camera.strip() else 0
            except ValueError:
                raise DatasetError(f"{path}:{number}: person_id and camera_id must be integers, got {person!r}, {camera!r}") from None
            if split not in SPLITS:
                raise DatasetError(f"{path}:{number}: split must be one of {', '.join(SPLITS)}, got {split!r}")
            splits[split].append(Sample(path.parent / image, person_id, camera_id))
    if not splits["train"]:
        raise DatasetError(f"{path}: no training rows")
    return splits


LOADERS: dict[str, Callable[[Path], Splits]] = {
    "market1501": load_market1501,
    "dukemtmc": load_dukemtmc,
    "msmt17": load_msmt17,
    "cuhk03-np-detected": lambda root: load_cuhk03_np(root, "detected"),
    "cuhk03-np-labeled": lambda root: load_cuhk03_np(root, "labeled"),
    "csv": load_csv,
}


def load_dataset(name: str, root: str | Path) -> Splits:
    if name not in LOADERS:
        raise DatasetError(f"unknown dataset {name!r}; one of: {', '.join(LOADERS)}")
    # an absolute root makes every stored path the same however the root was typed
    splits = LOADERS[name](Path(root).resolve())
    return {split: [replace(s, source=name) for s in samples] for split, samples in splits.items()}


def combine(datasets: list[Splits]) -> tuple[Splits, list[dict[str, int]]]:
    """One dataset from several: person and camera ids are offset so that none is shared.

    Returns the merged splits and, per dataset, its offsets (recorded in the manifest so that an id in
    the shards can be traced back to its dataset).
    """
    merged: Splits = {split: [] for split in SPLITS}
    offsets, person_offset, camera_offset = [], 0, 0
    for splits in datasets:
        every = [s for split in SPLITS for s in splits[split]]
        offsets.append({"person_id_offset": person_offset, "camera_id_offset": camera_offset})
        for split in SPLITS:
            merged[split] += [
                replace(s, person_id=s.person_id + person_offset, camera_id=s.camera_id + camera_offset)
                for s in splits[split]
            ]
        person_offset += max(s.person_id for s in every) + 1
        camera_offset += max(s.camera_id for s in every) + 1
    return merged, offsets
