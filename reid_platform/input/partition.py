"""What every input backend shares: which part of the data a process reads, and how long an epoch is."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from reid_platform.data.manifest import ShardDataset
from reid_platform.data.shard_format import LABEL, SAMPLE_INDEX
from reid_platform.errors import DatasetError
from reid_platform.parallel.comm import world


@dataclass(frozen=True)
class Partition:
    """Which part of the data this process reads."""

    rank: int = 0
    world_size: int = 1
    device_id: int | None = None  # None: CPU only

    @classmethod
    def of_process_group(cls, device: torch.device) -> Partition:
        """This process's part: its rank and world size in the default process group (0 of 1 without
        one), read on ``device`` (a GPU's index, or the CPU)."""
        return cls(*world(), device.index if device.type == "cuda" else None)


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs per epoch: one pass over the smallest rank's part, whole batches.

    The same on every rank, so no rank waits in a collective for one that ran out of data.
    """
    steps = (num_samples // world_size) // batch_size
    if steps < 1:
        raise ValueError(
            f"{num_samples} training samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} workers; lower input.batch_size or add data"
        )
    return steps


def checked_labels(meta: torch.Tensor, dataset: ShardDataset) -> torch.Tensor:
    """The label column of a batch's meta rows, refusing labels no classifier shard owns."""
    labels = meta[:, LABEL].clone()
    bad = (labels < 0) | (labels >= dataset.num_classes)
    if bad.any():  # the loss would be silently wrong
        raise DatasetError(
            f"{dataset.root}: training sample index {int(meta[bad][0, SAMPLE_INDEX])} has label "
            f"{int(labels[bad][0])}, outside the manifest's {dataset.num_classes} classes"
        )
    return labels
