"""Dataset parsers: a dataset root on disk -> lists of labelled samples per split.

Every parser returns the same thing, so packing never needs to know where the data came from:
``{"train": [...], "query": [...], "gallery": [...]}`` of ``Sample``. Training labels are
contiguous (0..num_classes-1); evaluation samples keep the raw person id (0 = distractor).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "query", "gallery")


class DatasetError(ValueError):
    """A dataset tree that cannot be parsed; the message names the file or folder."""


@dataclass(frozen=True)
class Sample:
    path: Path
    person_id: int
    camera_id: int
    label: int  # contiguous training label; -1 for query/gallery samples


# 0002_c1s1_000451_03.jpg: person id, camera (and sequence), frame, box. -1 marks junk boxes.
_MARKET_NAME = re.compile(r"^(-1|\d{4})_c(\d)s\d+_\d+_\d+\.jpg$")
_MARKET_FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}


def parse_market1501_name(path: Path) -> tuple[int, int]:
    """(person_id, camera_id) from a Market-1501 file name; camera ids start at 0."""
    match = _MARKET_NAME.match(path.name)
    if match is None:
        raise DatasetError(
            f"{path}: file name does not follow the Market-1501 pattern "
            "'PPPP_cCsS_FFFFFF_BB.jpg' (e.g. 0002_c1s1_000451_03.jpg)"
        )
    return int(match.group(1)), int(match.group(2)) - 1


def load_market1501(root: str | Path) -> dict[str, list[Sample]]:
    """Parse a Market-1501 tree. Junk (id -1) is dropped; distractors (id 0) stay in the gallery."""
    root = Path(root)
    splits: dict[str, list[Sample]] = {}
    for split, folder in _MARKET_FOLDERS.items():
        directory = root / folder
        if not directory.is_dir():
            raise DatasetError(f"{directory}: missing folder '{folder}' of the Market-1501 layout")
        parsed = [(path, *parse_market1501_name(path)) for path in sorted(directory.glob("*.jpg"))]
        if not parsed:
            raise DatasetError(f"{directory}: no .jpg images")
        samples = [(path, pid, cam) for path, pid, cam in parsed if pid != -1]
        if split == "train":
            distractors = [path for path, pid, _ in samples if pid == 0]
            if distractors:
                raise DatasetError(f"{distractors[0]}: distractor id 0 in the training split")
            labels = {pid: label for label, pid in enumerate(sorted({pid for _, pid, _ in samples}))}
            splits[split] = [Sample(path, pid, cam, labels[pid]) for path, pid, cam in samples]
        else:
            splits[split] = [Sample(path, pid, cam, -1) for path, pid, cam in samples]
    return splits


LOADERS = {"market1501": load_market1501}
