"""Training and evaluation batches from the packed shards, through DALI or the torch baseline.

The config key ``input.backend`` picks the implementation; both produce the same (images, labels) and
(images, meta) batches with the same transforms. Each backend is imported only when used, so the
torch baseline runs where DALI is not installed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Protocol

import torch

from reid_platform.data.manifest import ShardDataset
from reid_platform.input.bad_samples import BadSample
from reid_platform.input.config import InputConfig
from reid_platform.input.partition import Partition


class TrainBatches(Protocol):
    steps: int  # batches per epoch, the same on every rank
    skipped: list[BadSample]  # samples left out because they do not decode, in the order found

    def __len__(self) -> int: ...

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...


def train_loader(
    dataset: ShardDataset, partition: Partition, cfg: InputConfig, seed: int, on_bad_sample: str = "fail"
) -> TrainBatches:
    """Endless augmented batches of this rank's part; iterating yields one epoch (images, labels).

    A sample that does not decode ends the run (``on_bad_sample="fail"``) or is skipped ("skip")."""
    if cfg.backend == "torch":
        from reid_platform.input.torch_loader import TorchTrainLoader

        return TorchTrainLoader(dataset, partition, cfg, seed, on_bad_sample)
    from reid_platform.input.dali import TrainLoader

    return TrainLoader(dataset, partition, cfg, seed, on_bad_sample)


def eval_batches(
    dataset: ShardDataset, split: str, partition: Partition, cfg: InputConfig, batch_size: int
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's part of ``split``, each sample once, unaugmented: (images, meta rows)."""
    if cfg.backend == "torch":
        from reid_platform.input.torch_loader import torch_eval_batches

        return torch_eval_batches(dataset, split, partition, cfg, batch_size)
    from reid_platform.input.dali import eval_batches as dali_eval_batches

    return dali_eval_batches(dataset, split, partition, cfg, batch_size)
