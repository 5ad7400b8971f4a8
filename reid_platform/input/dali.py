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

import math
import tarfile
from collections.abc import Iterator
from itertools import islice

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from reid_platform.data.images import decode_problem
from reid_platform.data.manifest import ShardDataset
from reid_platform.errors import DatasetError
from reid_platform.input.config import InputConfig
from reid_platform.input.identity import identity_source
from reid_platform.input.partition import Partition, checked_labels, steps_per_epoch

READER = "Reader"


def _read(tars: tuple[str, ...], indexes: tuple[str, ...], partition: Partition, shuffle: bool, cfg: InputConfig):
    images, meta = fn.readers.webdataset(
        paths=list(tars),
        index_paths=list(indexes),
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
    return _decode(images, partition, cfg), meta


def _decode(encoded, partition: Partition, cfg: InputConfig):
    decoder_device = "cpu" if partition.device_id is None else "mixed"
    images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
    return fn.resize(images, resize_x=cfg.width, resize_y=cfg.height)


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
def _train_graph(tars, indexes, partition: Partition, cfg: InputConfig, erasing_seed: int, batch_source=None):
    if batch_source is None:
        images, meta = _read(tars, indexes, partition, shuffle=True, cfg=cfg)
    else:  # identity-balanced batches (identity.py) instead of the shuffled shard stream
        encoded, meta = fn.external_source(source=batch_source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64])
        images = _decode(encoded, partition, cfg)
    if cfg.pad:  # zero border on every side; the crop below then lands at a random position
        images = fn.crop(
            images,
            crop=(cfg.height + 2 * cfg.pad, cfg.width + 2 * cfg.pad),
            out_of_bounds_policy="pad",
            fill_values=0,
        )
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        images = _color_jitter(images, cfg)
    mirror = fn.random.coin_flip(probability=cfg.flip_prob)
    images = _crop_normalize(images, cfg, random_crop=cfg.pad > 0, mirror=mirror)
    if cfg.erasing_prob:
        images = _random_erasing(images, ErasingBoxes(cfg, cfg.batch_size, erasing_seed))
    return images, meta


def _factor(spread: float):
    return fn.random.uniform(range=(max(0.0, 1.0 - spread), 1.0 + spread))


def _color_jitter(images, cfg: InputConfig):
    """torchvision ColorJitter: brightness and contrast factors exactly as torchvision applies them
    (contrast pivots on the image's mean grey level); saturation and hue through DALI's HSV
    adjustment. The order is fixed here (brightness, contrast, saturation, hue); torchvision
    shuffles it per image."""
    if cfg.brightness:
        images = fn.brightness_contrast(images, brightness=_factor(cfg.brightness))
    if cfg.contrast:
        grey = fn.color_space_conversion(images, image_type=types.RGB, output_type=types.GRAY)
        images = fn.brightness_contrast(images, contrast=_factor(cfg.contrast), contrast_center=fn.reductions.mean(grey))
    if cfg.saturation or cfg.hue:
        images = fn.hsv(
            images,
            saturation=_factor(cfg.saturation),
            hue=fn.random.uniform(range=(-360.0 * cfg.hue, 360.0 * cfg.hue)),  # DALI takes degrees
        )
    return images


class ErasingBoxes:
    """torchvision RandomErasing's rectangles for a batch, drawn in numpy (an external source).

    As torchvision: with probability ``p`` per image, up to ``attempts`` draws of area fraction and
    log aspect ratio; the first rectangle strictly inside the image wins (none: no erasing), and its
    top-left corner is uniform over every position where it fits. Drawn here rather than with DALI
    arithmetic because ten attempts as graph operators cost a third of the pipeline's throughput.
    """

    def __init__(self, cfg: InputConfig, batch_size: int, seed: int, scale=(0.02, 0.33), ratio=(0.3, 3.3), attempts=10):
        self.height, self.width, self.batch_size, self.p = cfg.height, cfg.width, batch_size, cfg.erasing_prob
        self.scale, self.log_ratio, self.attempts = scale, (math.log(ratio[0]), math.log(ratio[1])), attempts
        self.rng = np.random.default_rng(seed)

    def __call__(self) -> tuple[list[np.ndarray], list[np.ndarray]]:
        n, rng = self.batch_size, self.rng
        height, width, found = np.zeros(n), np.zeros(n), np.zeros(n, dtype=bool)
        for _ in range(self.attempts):
            area = self.height * self.width * rng.uniform(*self.scale, n)
            aspect = np.exp(rng.uniform(*self.log_ratio, n))
            h, w = np.round(np.sqrt(area * aspect)), np.round(np.sqrt(area / aspect))
            fits = (h < self.height) & (w < self.width) & ~found
            height[fits], width[fits], found = h[fits], w[fits], found | fits
        erase = (rng.random(n) < self.p) & found
        height, width = height * erase, width * erase
        top, left = rng.integers(0, self.height - height + 1), rng.integers(0, self.width - width + 1)
        anchors = np.stack([top, left], 1).astype(np.float32)
        shapes = np.stack([height, width], 1).astype(np.float32)
        return list(anchors), list(shapes)


def _random_erasing(images, boxes: ErasingBoxes):
    anchor, shape = fn.external_source(source=boxes, num_outputs=2, batch=True, dtype=[types.FLOAT, types.FLOAT])
    return fn.erase(images, anchor=anchor, shape=shape, axis_names="HW", fill_value=0.0)


@pipeline_def(enable_conditionals=False)
def _eval_graph(tars, indexes, partition: Partition, cfg: InputConfig):
    images, meta = _read(tars, indexes, partition, shuffle=False, cfg=cfg)
    return _crop_normalize(images, cfg, random_crop=False), meta


def _pipeline(graph, split: str, dataset: ShardDataset, partition: Partition, cfg: InputConfig, batch_size: int, seed: int, **extra):
    pipe = graph(
        dataset.split(split).tars,
        dataset.split(split).indexes,
        partition,
        cfg,
        **extra,
        batch_size=batch_size,
        num_threads=cfg.num_threads,
        device_id=partition.device_id,
        seed=seed,
        prefetch_queue_depth=2,
    )
    pipe.build()
    return pipe


class TrainLoader:
    """Endless augmented batches; iterate it for one epoch of ``steps`` (images, labels)."""

    def __init__(self, dataset: ShardDataset, partition: Partition, cfg: InputConfig, seed: int):
        extra = {"erasing_seed": seed}
        if cfg.sampler == "identity":
            identities = cfg.batch_size // cfg.images_per_identity
            extra["batch_source"] = identity_source(dataset, identities, cfg.images_per_identity, seed)
        pipe = _pipeline(_train_graph, "train", dataset, partition, cfg, cfg.batch_size, seed, **extra)
        self.steps = steps_per_epoch(dataset.split("train").samples, partition.world_size, cfg.batch_size)
        self.dataset = dataset
        self._batches = _named_failures(_endless(pipe), dataset, "train")

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in islice(self._batches, self.steps):
            yield batch[0]["images"], checked_labels(batch[0]["meta"], self.dataset)


def _endless(pipe):
    yield from DALIGenericIterator(pipe, ["images", "meta"], size=-1)


def eval_batches(dataset: ShardDataset, split: str, partition: Partition, cfg: InputConfig, batch_size: int):
    """This rank's part of ``split``, each sample once: yields (images, meta rows)."""
    pipe = _pipeline(_eval_graph, split, dataset, partition, cfg, batch_size, seed=0)

    def batches():  # the iterator runs the pipeline as it is made: make it inside the guard
        yield from DALIGenericIterator(pipe, ["images", "meta"], reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL)

    for batch in _named_failures(batches(), dataset, split):
        yield batch[0]["images"], batch[0]["meta"]


def _named_failures(batches, dataset: ShardDataset, split: str):
    """DALI's batches; a failure (a sample that no longer decodes) is traced to its shard and key.

    DALI's own error names only the operator, so the split's shards are searched with PIL for the
    first sample that does not decode; that slow search happens only after a failure.
    """
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except RuntimeError as error:
            message = " ".join(line.strip() for line in str(error).splitlines() if line.strip() and not line.startswith("  "))
            if "decoders" not in message:
                raise
            for tar, key, problem in undecodable_samples(dataset.split(split).tars):
                raise DatasetError(f"{tar}: sample {key} does not decode ({problem}); repack or restore the shard") from None
            raise DatasetError(f"{dataset.root}: decoding the {split} shards failed: {message}") from None
        yield batch


def undecodable_samples(tars: tuple[str, ...]):
    """(tar, key, reason) of every JPEG member of ``tars`` that PIL cannot decode."""
    for tar in tars:
        with tarfile.open(tar) as archive:
            found = [
                (member.name.rsplit(".", 1)[0], decode_problem(archive.extractfile(member).read()))
                for member in archive
                if member.name.endswith(".jpg")
            ]
        yield from ((tar, key, reason) for key, reason in found if reason)
