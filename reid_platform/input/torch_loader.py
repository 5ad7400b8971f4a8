"""The baseline input pipeline: webdataset + torchvision + torch DataLoader, DALI's transforms.

For comparison (``benchmarks/input_pipeline.py``) and for machines without DALI. The same steps in
the same order as the DALI graph: resize, zero pad, colour jitter, random crop, flip, normalise,
random erasing. Ranks split the work by shard (``tars[rank::world_size]``); in training each
DataLoader worker resamples its rank's shards endlessly, and an epoch is the same fixed number of
steps as with DALI. Like DALI's, a run is reproducible from ``seed``: the shard draws, the shuffle
buffer and the augmentation are seeded from it, per rank and per DataLoader worker.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from itertools import islice
from pathlib import Path

import torch
import webdataset as wds
from torchvision.transforms import v2

from reid_platform.console import say
from reid_platform.data.images import decode_rgb
from reid_platform.data.manifest import ShardDataset
from reid_platform.data.shard_format import IMAGE_EXT, META_EXT, SAMPLE_INDEX, decode_meta
from reid_platform.errors import DatasetError, ReidError
from reid_platform.input.bad_samples import BadSample
from reid_platform.input.config import InputConfig
from reid_platform.input.partition import Partition, checked_labels, steps_per_epoch
from reid_platform.model.preprocess import eval_transform, to_normalized_tensor
from reid_platform.storage import files, location

# DataLoader workers start from a fresh server process rather than a fork of this one: a fork copies
# the threads of DALI or nvImageCodec (the bad-sample search) in a state their locks do not survive.
WORKER_START = "forkserver"


def train_transform(cfg: InputConfig) -> v2.Compose:
    steps: list = [v2.Resize((cfg.height, cfg.width))]
    if cfg.pad:
        steps += [v2.Pad(cfg.pad, fill=0), v2.RandomCrop((cfg.height, cfg.width))]
    if cfg.brightness or cfg.contrast or cfg.saturation or cfg.hue:  # on the window, as the DALI pipeline
        steps += [v2.ColorJitter(cfg.brightness, cfg.contrast, cfg.saturation, cfg.hue)]
    steps += [v2.RandomHorizontalFlip(cfg.flip_prob), *to_normalized_tensor(cfg)]
    if cfg.erasing_prob:
        steps += [v2.RandomErasing(cfg.erasing_prob, value=0)]
    return v2.Compose(steps)


class _Decode:
    """A picklable sample -> (image tensor, meta row) map for DataLoader workers.

    A sample that does not decode raises a DatasetError naming it or, given ``skip_log``, is named
    in the job log, appended to ``skip_log`` (the loader's ``skipped``) and mapped to None (dropped
    by ``_decoded``).
    """

    def __init__(self, transform: v2.Compose, skip_log: Path | None = None):
        self.transform, self.skip_log = transform, skip_log
        self.skipped: set[int] = set()  # in this worker: the endless stream meets a bad sample again

    def __call__(self, sample: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
        meta = decode_meta(sample[META_EXT])
        image, reason = decode_rgb(sample[IMAGE_EXT])
        if image is None:
            bad = BadSample(sample["__url__"], sample["__key__"], int(meta[SAMPLE_INDEX]), reason)
            if self.skip_log is None:
                raise DatasetError(str(bad))
            if bad.index not in self.skipped:
                self.skipped.add(bad.index)
                say(f"skipping a bad training sample: {bad}")
                with self.skip_log.open("a") as handle:
                    handle.write(json.dumps(dataclasses.asdict(bad)) + "\n")
            return None
        return self.transform(image), torch.from_numpy(meta)


def _decoded(item) -> bool:
    return item is not None


def _rank_shards(dataset: ShardDataset, split: str, partition: Partition) -> list[str]:
    return list(dataset.split(split).tars[partition.rank :: partition.world_size])


def _shard_samples(shards):
    """webdataset's samples of each shard ({"url": ...}), the shard opened through storage: a local
    file, or an object streamed from one GET (webdataset's own opener knows no object store)."""
    streams = ({**shard, "stream": files.open_stream(location.parse(shard["url"]))} for shard in shards)
    return wds.tariterators.group_by_keys(wds.tariterators.tar_file_expander(streams))


def _worker_seed(rank: int) -> int:
    """A seed per (rank, DataLoader worker), called in the worker: the rank is the loader's own, not
    whatever torch.distributed says (benchmarks run ranks in one process)."""
    worker = torch.utils.data.get_worker_info()
    return rank * 1000 + (worker.id if worker else 0)


class _WorkerShuffle:
    """webdataset's shuffle buffer with its generator seeded in the worker, from ``seed`` and the
    worker's own seed: seeded once where the stage is built, every worker would pick from its buffer
    in the same order."""

    def __init__(self, buffer: int, rank: int, seed: int):
        self.buffer, self.rank, self.seed = buffer, rank, seed

    def __call__(self, samples):
        return wds.shuffle(self.buffer, seed=wds.utils.make_seed(_worker_seed(self.rank), self.seed))(samples)


def _train_stream(tars: list[str], decode: _Decode, cfg: InputConfig, rank: int, seed: int) -> wds.DataPipeline:
    return wds.DataPipeline(
        wds.ResampledShards(tars, seed=seed, worker_seed=functools.partial(_worker_seed, rank), deterministic=True),
        _shard_samples,
        _WorkerShuffle(cfg.shuffle_buffer, rank, seed),
        wds.map(decode),
        wds.select(_decoded),
    )


class _StoreEnvironment:
    """The object store's settings (AWS_*) of the process that makes a loader, given to its workers.
    They start from a fork server that lives as long as this process and keeps the environment it
    was started with: a store configured since (``data.s3_endpoint``, another credential) would not
    reach them."""

    def __init__(self) -> None:
        self.settings = {name: value for name, value in os.environ.items() if name.startswith("AWS_")}

    def __call__(self, worker_id: int) -> None:
        for name in [name for name in os.environ if name.startswith("AWS_") and name not in self.settings]:
            del os.environ[name]
        os.environ.update(self.settings)


def _worker_errors_named(batches):
    """DataLoader re-raises a worker's error (a DatasetError, a StoreError) with the worker's whole
    traceback as its message; keep the line the worker raised, which names the shard and sample or
    the object."""
    try:
        yield from batches
    except ReidError as error:
        last = str(error).strip().splitlines()[-1]
        raise type(error)(last.split(f"{type(error).__name__}: ", 1)[-1]) from None


class TorchTrainLoader:
    def __init__(self, dataset: ShardDataset, partition: Partition, cfg: InputConfig, seed: int, on_bad_sample: str = "fail"):
        tars = _rank_shards(dataset, "train", partition)
        if not tars:
            raise DatasetError(
                f"{dataset.root}: {len(dataset.split('train').tars)} training shards cannot feed "
                f"{partition.world_size} workers with input.backend torch; pack smaller shards"
            )
        self.steps = steps_per_epoch(dataset.split("train").samples, partition.world_size, cfg.batch_size)
        self.dataset = dataset
        self._scratch = tempfile.TemporaryDirectory(prefix="reid-skipped-")
        self._skip_log = Path(self._scratch.name) / "skipped.jsonl"
        decode = _Decode(train_transform(cfg), self._skip_log if on_bad_sample == "skip" else None)
        loader = torch.utils.data.DataLoader(
            _train_stream(tars, decode, cfg, partition.rank, seed), batch_size=cfg.batch_size,
            num_workers=cfg.num_threads, drop_last=True, persistent_workers=True, multiprocessing_context=WORKER_START,
            generator=torch.Generator().manual_seed(seed * 1000 + partition.rank),  # the workers' augmentation seeds
            worker_init_fn=_StoreEnvironment(),
        )
        self._batches = _worker_errors_named(loader)

    def __len__(self) -> int:
        return self.steps

    @property
    def skipped(self) -> list[BadSample]:
        if not self._skip_log.is_file():
            return []
        found = [BadSample(**json.loads(line)) for line in self._skip_log.read_text().splitlines()]
        return list({bad.index: bad for bad in reversed(found)}.values())[::-1]  # each once, as first found

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, meta in islice(self._batches, self.steps):
            yield images, checked_labels(meta, self.dataset)


def torch_eval_batches(dataset: ShardDataset, split: str, partition: Partition, cfg: InputConfig, batch_size: int):
    tars = _rank_shards(dataset, split, partition)
    if not tars:  # more ranks than shards: this rank has nothing to read
        return
    workers = min(cfg.num_threads, len(tars))  # a worker without a shard would read nothing
    dataset = wds.DataPipeline(wds.SimpleShardList(tars), wds.split_by_worker, _shard_samples, wds.map(_Decode(eval_transform(cfg))))
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, num_workers=workers, multiprocessing_context=WORKER_START,
        worker_init_fn=_StoreEnvironment(),
    )  # fmt: skip
    yield from _worker_errors_named(loader)
