"""DALI input pipelines over the packed WebDataset shards.

The same graph runs on the GPU (``device_id`` set: mixed decode, GPU augmentation) and on the CPU
(``device_id=None``: DALI's CPU operators), so a laptop and a cluster run identical augmentation.

Training: every worker reads its own part of the samples (``shard_id = rank``) with a local shuffle
buffer, and the reader wraps around endlessly; an epoch is a fixed number of steps that is the same on
every rank, so no rank waits in a collective for one that ran out of data.

Evaluation: no augmentation, no shuffling, each sample read once; the ``meta`` output carries the
person id, camera id and original index, so order and identity survive sharding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from reid_platform.config import InputConfig
from reid_platform.data.datasets import DatasetError
from reid_platform.data.pack import read_manifest, shard_paths

READER = "Reader"


@dataclass(frozen=True)
class Partition:
    """Which part of the data this process reads."""

    rank: int = 0
    world_size: int = 1
    device_id: int | None = None  # None: CPU operators only


def _read(tars: list[str], indexes: list[str], partition: Partition, shuffle: bool, cfg: InputConfig):
    images, meta = fn.readers.webdataset(
        paths=tars,
        index_paths=indexes,
        ext=["jpg", "meta"],
        dtypes=[types.UINT8, types.INT64],
        missing_component_behavior="error",
        shard_id=partition.rank,
        num_shards=partition.world_size,
        random_shuffle=shuffle,
        initial_fill=cfg.shuffle_buffer,
        pad_last_batch=not shuffle,
        name=READER,
    )
    decoder_device = "cpu" if partition.device_id is None else "mixed"
    images = fn.decoders.image(images, device=decoder_device, output_type=types.RGB)
    images = fn.resize(images, resize_x=cfg.width, resize_y=cfg.height)
    return images, meta


def _crop_normalize(images, cfg: InputConfig, random_crop: bool, mirror=0):
    """(H, W) crop, optional mirror, mean/std normalisation, HWC uint8 -> CHW float."""
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        crop=(cfg.height, cfg.width),
        crop_pos_x=fn.random.uniform(range=(0.0, 1.0)) if random_crop else 0.5,
        crop_pos_y=fn.random.uniform(range=(0.0, 1.0)) if random_crop else 0.5,
        mean=[255 * m for m in cfg.mean],
        std=[255 * s for s in cfg.std],
        mirror=mirror,
    )


@pipeline_def(enable_conditionals=False)
def _train_graph(tars, indexes, partition: Partition, cfg: InputConfig):
    images, meta = _read(tars, indexes, partition, shuffle=True, cfg=cfg)
    if cfg.pad:  # zero border on every side; the crop below then lands at a random position
        images = fn.crop(
            images,
            crop=(cfg.height + 2 * cfg.pad, cfg.width + 2 * cfg.pad),
            out_of_bounds_policy="pad",
            fill_values=0,
        )
    mirror = fn.random.coin_flip(probability=cfg.flip_prob)
    images = _crop_normalize(images, cfg, random_crop=cfg.pad > 0, mirror=mirror)
    return images, meta


@pipeline_def(enable_conditionals=False)
def _eval_graph(tars, indexes, partition: Partition, cfg: InputConfig):
    images, meta = _read(tars, indexes, partition, shuffle=False, cfg=cfg)
    return _crop_normalize(images, cfg, random_crop=False), meta


def _pipeline(graph, split: str, shards_dir, partition: Partition, cfg: InputConfig, batch_size: int, seed: int):
    manifest = read_manifest(shards_dir)
    tars, indexes = shard_paths(shards_dir, manifest, split)
    pipe = graph(
        tars,
        indexes,
        partition,
        cfg,
        batch_size=batch_size,
        num_threads=cfg.num_threads,
        device_id=partition.device_id,
        seed=seed,
        prefetch_queue_depth=2,
    )
    pipe.build()
    return pipe, manifest


def steps_per_epoch(num_samples: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs per epoch: one pass over the smallest rank's part, whole batches."""
    steps = (num_samples // world_size) // batch_size
    if steps < 1:
        raise ValueError(
            f"{num_samples} training samples cannot fill one batch of {batch_size} on each of "
            f"{world_size} workers; lower input.batch_size or add data"
        )
    return steps


class TrainLoader:
    """Endless augmented batches; iterate it for one epoch of ``steps`` (images, labels)."""

    def __init__(self, shards_dir, partition: Partition, cfg: InputConfig, seed: int):
        pipe, manifest = _pipeline(_train_graph, "train", shards_dir, partition, cfg, cfg.batch_size, seed)
        self.steps = steps_per_epoch(manifest["splits"]["train"]["samples"], partition.world_size, cfg.batch_size)
        self.num_classes = manifest["num_classes"]
        self.shards_dir = shards_dir
        self._batches = DALIGenericIterator(pipe, ["images", "meta"], size=-1)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in islice(self._batches, self.steps):
            images, meta = batch[0]["images"], batch[0]["meta"]
            labels = meta[:, 0].clone()
            bad = (labels < 0) | (labels >= self.num_classes)
            if bad.any():  # no shard owns such a class: the loss would be silently wrong
                raise DatasetError(
                    f"{self.shards_dir}: training sample index {int(meta[bad][0, 3])} has label "
                    f"{int(labels[bad][0])}, outside the manifest's {self.num_classes} classes"
                )
            yield images, labels


def eval_batches(shards_dir, split: str, partition: Partition, cfg: InputConfig, batch_size: int):
    """This rank's part of ``split``, each sample once: yields (images, meta rows)."""
    pipe, _ = _pipeline(_eval_graph, split, shards_dir, partition, cfg, batch_size, seed=0)
    batches = DALIGenericIterator(
        pipe, ["images", "meta"], reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL
    )
    for batch in batches:
        yield batch[0]["images"], batch[0]["meta"]
