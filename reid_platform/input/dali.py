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

import itertools
import math
import shutil
import tempfile
import weakref
from collections import deque
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.base_iterator import LastBatchPolicy
from nvidia.dali.plugin.pytorch import DALIGenericIterator

from reid_platform.console import say
from reid_platform.data.manifest import ShardDataset
from reid_platform.data.sample_table import SampleTable
from reid_platform.data.shard_format import (
    IMAGE_EXT,
    META_EXT,
    SAMPLE_INDEX,
    ShardIndex,
    read_index,
    write_index,
)
from reid_platform.errors import DatasetError
from reid_platform.input.bad_samples import BadSample, among, error_summary, is_decode_failure, search
from reid_platform.input.config import InputConfig
from reid_platform.input.identity import identity_source
from reid_platform.input.partition import Partition, checked_labels, steps_per_epoch
from reid_platform.storage import files, location

READER = "Reader"


def _read(tars: tuple[str, ...], indexes: tuple[str, ...], partition: Partition, shuffle: bool, cfg: InputConfig,
          resize: bool):  # fmt: skip
    if cfg.stage_objects:  # in an object store, DALI's reader would make a request per member
        tars = tuple(str(path) for path in files.staged([location.parse(tar) for tar in tars]))
    images, meta = fn.readers.webdataset(
        paths=list(tars),
        index_paths=list(indexes),
        ext=[IMAGE_EXT, META_EXT],
        dtypes=[types.UINT8, types.INT64],
        missing_component_behavior="error",
        shard_id=partition.rank,
        num_shards=partition.world_size,
        random_shuffle=shuffle,
        initial_fill=cfg.shuffle_buffer,
        pad_last_batch=not shuffle,
        name=READER,
    )
    return _decode(images, partition, cfg, resize), meta


def _decode(encoded, partition: Partition, cfg: InputConfig, resize: bool):
    decoder_device = "cpu" if partition.device_id is None else "mixed"
    images = fn.decoders.image(encoded, device=decoder_device, output_type=types.RGB)
    return fn.resize(images, resize_x=cfg.width, resize_y=cfg.height) if resize else images


def packed_at_input_size(dataset: ShardDataset, cfg: InputConfig) -> bool:
    """Whether every image of the shards decodes to the input size already (``reid data pack --resize HxW``).

    Then the pipelines leave out the resize, which on the CPU costs more than the decode itself.
    """
    return dataset.manifest.resize == (cfg.height, cfg.width)


def _normalize(images, cfg: InputConfig, mirror=0):
    """Optional mirror, mean/std normalisation, HWC uint8 -> CHW float."""
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT,
        output_layout="CHW",
        mean=[255 * m for m in cfg.mean],
        std=[255 * s for s in cfg.std],
        mirror=mirror,
    )


def padded_window(images, cfg: InputConfig, start):
    """The (H, W) window at ``start`` (top, left) of the image zero-padded by ``cfg.pad`` on every side,
    ``start`` in [-pad, pad]: torchvision's Pad + RandomCrop in one copy (padding the whole image
    first and cropping it after cost twice as much)."""
    return fn.slice(
        images, start=start, shape=[cfg.height, cfg.width], axis_names="HW", out_of_bounds_policy="pad", fill_values=0
    )


@pipeline_def(enable_conditionals=False)
def _train_graph(tars, indexes, partition: Partition, cfg: InputConfig, resize: bool, batch_source=None):
    if batch_source is None:
        images, meta = _read(tars, indexes, partition, shuffle=True, cfg=cfg, resize=resize)
    else:  # identity-balanced batches (identity.py) instead of the shuffled shard stream
        encoded, meta = fn.external_source(source=batch_source, num_outputs=2, batch=True, dtype=[types.UINT8, types.INT64])
        images = _decode(encoded, partition, cfg, resize)
    if cfg.pad:  # each offset uniform over the 2 pad + 1 positions, as torchvision's RandomCrop
        offsets = fn.random.uniform(values=list(range(-cfg.pad, cfg.pad + 1)), shape=[2], dtype=types.INT32)
        images = padded_window(images, cfg, offsets)
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:
        images = _color_jitter(images, cfg)
    mirror = fn.random.coin_flip(probability=cfg.flip_prob)
    # random erasing follows, on the batch in torch (``TrainLoader``)
    return _normalize(images, cfg, mirror=mirror), meta


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
    """torchvision RandomErasing's rectangles for a batch: (top-left corners, heights and widths), (n, 2) each.

    As torchvision: with probability ``p`` per image, up to ``attempts`` draws of area fraction and
    log aspect ratio; the first rectangle strictly inside the image wins (none: no erasing, a 0 x 0
    box), and its top-left corner is uniform over every position where it fits. Drawn in numpy and
    applied in torch (``erase``): ten attempts as DALI operators cost a third of the pipeline's
    throughput, and DALI's erase copies the whole float image to zero one rectangle of it.
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
        return np.stack([top, left], 1).astype(np.int64), np.stack([height, width], 1).astype(np.int64)


def erase(images: torch.Tensor, anchors: np.ndarray, shapes: np.ndarray) -> torch.Tensor:
    """Zero each image's box (``ErasingBoxes``) in place, across channels: after normalisation, as
    torchvision's RandomErasing(value=0) does."""
    for i in np.flatnonzero(shapes.prod(axis=1)):
        (top, left), (height, width) = anchors[i], shapes[i]
        images[i, :, top : top + height, left : left + width] = 0.0
    return images


@pipeline_def(enable_conditionals=False)
def _eval_graph(tars, indexes, partition: Partition, cfg: InputConfig, resize: bool):
    images, meta = _read(tars, indexes, partition, shuffle=False, cfg=cfg, resize=resize)
    return _normalize(images, cfg), meta


def _pipeline(graph, split: str, dataset: ShardDataset, partition: Partition, cfg: InputConfig, batch_size: int, seed: int,
              indexes: tuple[tuple[str, ...], tuple[str, ...]] | None = None, **extra):  # fmt: skip
    tars, index_paths = indexes or (dataset.split(split).tars, dataset.split(split).indexes)
    pipe = graph(
        tars,
        index_paths,
        partition,
        cfg,
        resize=not packed_at_input_size(dataset, cfg),
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
    """Endless augmented batches; iterate it for one epoch of ``steps`` (images, labels).

    A sample that stops decoding (``bad_samples.py``) ends the run with ``on_bad_sample="fail"``;
    with ``"skip"`` it is named in the job log, added to ``skipped``, and the pipeline is rebuilt
    without it: the shuffled reader from index files that leave it out (DALI then splits one sample
    fewer over the ranks), the identity sampler by never drawing it. Batches keep their size and the epoch its
    number of steps. The identity sampler's failing sample is among its last batches; the shuffled
    reader's is searched for in the shards (``bad_samples.search``).
    """

    def __init__(self, dataset: ShardDataset, partition: Partition, cfg: InputConfig, seed: int, on_bad_sample: str = "fail"):
        self.dataset, self.partition, self.cfg, self.seed, self.on_bad_sample = dataset, partition, cfg, seed, on_bad_sample
        self.steps = steps_per_epoch(dataset.split("train").samples, partition.world_size, cfg.batch_size)
        self.skipped: list[BadSample] = []
        self._table = SampleTable.read(dataset) if cfg.sampler == "identity" else None
        self._scratch: Path | None = None  # index files without the skipped samples
        self._recent: deque = deque(maxlen=4)  # the identity sampler's last batches: DALI's prefetch and one more
        self._batches = self._stream()

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, meta in islice(self._batches, self.steps):
            yield images, checked_labels(meta, self.dataset)

    def _stream(self):
        for rebuilds in itertools.count():
            seed = self.seed + rebuilds  # a rebuilt pipeline does not replay the draws of the last one
            boxes = ErasingBoxes(self.cfg, self.cfg.batch_size, seed) if self.cfg.erasing_prob else None
            try:
                for batch in _endless(self._build(seed)):
                    images = batch[0]["images"]
                    yield (erase(images, *boxes()) if boxes else images), batch[0]["meta"]
            except RuntimeError as error:
                if not is_decode_failure(error):
                    raise
                known = [bad.index for bad in self.skipped]
                in_flight = np.concatenate(list(self._recent)) if self._recent else None
                found = among(self._table, in_flight, known) if in_flight is not None else []
                found = found or search(self.dataset, "train", known)
                if not found:
                    raise DatasetError(f"{self.dataset.root}: decoding the train shards failed: {error_summary(error)}") from None
                if self.on_bad_sample == "fail":
                    raise DatasetError(f"{found[0]}; data.on_bad_sample is fail") from None
                for bad in found:
                    say(f"skipping a bad training sample: {bad}")
                self.skipped += found

    def _build(self, seed: int):
        cfg, extra = self.cfg, {}
        if cfg.sampler == "identity":
            skipped = [bad.index for bad in self.skipped]
            excluded = np.flatnonzero(np.isin(self._table.rows[:, SAMPLE_INDEX], skipped))
            identities = cfg.batch_size // cfg.images_per_identity
            self._recent.clear()
            extra["batch_source"] = identity_source(self._table, identities, cfg.images_per_identity, seed, excluded, self._recent)
        return _pipeline(_train_graph, "train", self.dataset, self.partition, cfg, cfg.batch_size, seed, self._indexes(), **extra)

    def _indexes(self) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
        """The shards and index files the shuffled reader reads: the packed ones until a sample is skipped."""
        if not self.skipped or self.cfg.sampler == "identity":
            return None
        if self._scratch is None:
            self._scratch = Path(tempfile.mkdtemp(prefix="reid-indexes-"))
            weakref.finalize(self, shutil.rmtree, self._scratch, ignore_errors=True)
        keys, indexes = {bad.key for bad in self.skipped}, []
        train = self.dataset.split("train")
        for index in train.indexes:
            packed = read_index(index)
            good = [entry for entry in packed.entries if entry.key not in keys]
            if not good:
                raise DatasetError(f"{index}: every sample of the shard is bad; repack or restore it")
            filtered = self._scratch / Path(index).name
            write_index(filtered, ShardIndex(packed.version, good))
            indexes.append(str(filtered))
        return train.tars, tuple(indexes)


def _endless(pipe):
    yield from DALIGenericIterator(pipe, ["images", "meta"], size=-1)


def eval_batches(dataset: ShardDataset, split: str, partition: Partition, cfg: InputConfig, batch_size: int):
    """This rank's part of ``split``, each sample once: yields (images, meta rows).

    Evaluation never skips: a sample that does not decode fails it, named (``bad_samples.py``).
    """
    pipe = _pipeline(_eval_graph, split, dataset, partition, cfg, batch_size, seed=0)
    try:  # the iterator runs the pipeline as it is made: make it inside the guard
        for batch in DALIGenericIterator(pipe, ["images", "meta"], reader_name=READER, last_batch_policy=LastBatchPolicy.PARTIAL):
            yield batch[0]["images"], batch[0]["meta"]
    except RuntimeError as error:
        if not is_decode_failure(error):
            raise
        found = search(dataset, split)
        if not found:
            raise DatasetError(f"{dataset.root}: decoding the {split} shards failed: {error_summary(error)}") from None
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise DatasetError(f"{found[0]}{more}; evaluation does not skip samples: repack or restore the shard") from None
