"""Identity-balanced batches: P identities x K images each, read from the shards by offset.

Pair-wise losses need several images of each identity in a batch, and the few-identities-per-batch
recipe helps Circle loss too. A shuffled stream of shards cannot promise that, so this sampler reads
samples directly: the DALI index of every shard gives each sample's byte offset and size in its tar,
so a batch is P*K seeks into the shards (local disk or a shared filesystem alike), fed to the usual
DALI graph through an external source. Every rank draws with its own seed from the whole training
set; identities with fewer than K images are drawn with replacement.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reid_platform.data.manifest import ShardDataset
from reid_platform.errors import DatasetError


@dataclass(frozen=True)
class SampleTable:
    """Where every sample of a split lies: shard, byte offset and size of its JPEG, and its meta row."""

    tars: tuple[str, ...]
    shard: np.ndarray  # (N,) int64
    offset: np.ndarray  # (N,) int64
    size: np.ndarray  # (N,) int64
    meta: np.ndarray  # (N, 4) int64: label, person id, camera id, index

    @staticmethod
    def read(dataset: ShardDataset, split: str = "train") -> SampleTable:
        tars, indexes = dataset.split(split).tars, dataset.split(split).indexes
        shard, offset, size, meta = [], [], [], []
        for number, (tar, index) in enumerate(zip(tars, indexes)):
            lines = Path(index).read_text().splitlines()[1:]
            with open(tar, "rb") as handle:
                for line in lines:
                    fields = line.split()
                    parts = {fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)}
                    if "jpg" not in parts or "meta" not in parts:
                        raise DatasetError(f"{index}: sample {fields[3]} lacks a jpg or meta member")
                    handle.seek(parts["meta"][0])
                    meta.append(np.frombuffer(handle.read(parts["meta"][1]), "<i8"))
                    shard.append(number)
                    offset.append(parts["jpg"][0])
                    size.append(parts["jpg"][1])
        return SampleTable(tars, np.array(shard), np.array(offset), np.array(size), np.stack(meta))

    def reader(self):
        """A function from sample indices to their JPEG bytes, keeping one open file per shard."""
        handles: dict[int, object] = {}

        def read(indices: np.ndarray) -> list[np.ndarray]:
            out = []
            for i in indices:
                number = int(self.shard[i])
                if number not in handles:
                    handles[number] = open(self.tars[number], "rb")  # noqa: SIM115 - lives with the reader
                handle = handles[number]
                handle.seek(int(self.offset[i]))
                out.append(np.frombuffer(handle.read(int(self.size[i])), np.uint8))
            return out

        return read


def identity_batches(labels: np.ndarray, identities: int, images: int, seed: int) -> Iterator[np.ndarray]:
    """Endless arrays of P*K sample indices: ``identities`` distinct labels, ``images`` samples each."""
    by_label = [np.flatnonzero(labels == label) for label in np.unique(labels)]
    if len(by_label) < identities:
        raise DatasetError(
            f"{len(by_label)} training identities cannot fill batches of {identities} identities; "
            "lower input.batch_size or raise input.images_per_identity"
        )
    rng = np.random.default_rng(seed)
    while True:
        chosen = rng.choice(len(by_label), size=identities, replace=False)
        yield np.concatenate(
            [rng.choice(by_label[c], size=images, replace=len(by_label[c]) < images) for c in chosen]
        )


def identity_source(dataset: ShardDataset, identities: int, images: int, seed: int):
    """A DALI external-source callable: each call returns one P x K batch (JPEG bytes, meta rows)."""
    table = SampleTable.read(dataset)
    batches, read = identity_batches(table.meta[:, 0], identities, images, seed), table.reader()

    def next_batch():
        indices = next(batches)
        return read(indices), [table.meta[i] for i in indices]

    return next_batch
