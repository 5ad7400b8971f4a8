"""What one training run asks of every worker, as ``reid plan`` sizes it: from a run config
(``Workload.from_config``), or set field by field in tests and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from reid_platform.train.config import TrainConfig, autocast_precision

if TYPE_CHECKING:
    from reid_platform.config import RunConfig

# What a worker holds whatever it trains: on a GPU, the CUDA context, cuBLAS's and NCCL's buffers
# and the caching allocator's slack (about 1 GiB); in a CPU worker, the libraries' own memory
# (torch, DALI, Ray: 1.4 GiB of RSS for a 3,000-class run on this project's 2-core machine).
RUNTIME_BYTES = 1024**3


@dataclass(frozen=True)
class Workload:
    """What one training run asks of every worker. ``batch`` is per worker (``input.batch_size``)."""

    classes: int
    workers: int
    batch: int
    sample_rate: float = 1.0
    arch: str = "resnet50"
    height: int = 256
    width: int = 128
    embedding_dim: int | None = None  # None: the trunk's width, no projection (model.embedding_dim)
    precision: Literal["fp32", "bf16", "fp16"] = "bf16"  # the backbone's autocast; fp16 sizes as bf16
    train: TrainConfig = TrainConfig()  # both halves' optimizers are built from it (train/optimizers.py)
    last_stride: int = 1
    gem: bool = False
    sync_bn: bool = False
    pairwise: bool = False
    runtime_bytes: int = RUNTIME_BYTES

    @classmethod
    def from_config(cls, cfg: RunConfig, classes: int, workers: int) -> Workload:
        """The run ``cfg`` describes, of ``classes`` identities, as a group of ``workers`` runs it."""
        # an elastic run that keeps its global batch gives each worker its share
        cfg = cfg.on_workers(workers)
        model, images, train = cfg.model, cfg.input, cfg.train
        return cls(
            classes=classes, workers=workers, batch=images.batch_size, sample_rate=cfg.loss.sample_rate,
            arch=model.arch, height=images.height, width=images.width, embedding_dim=model.embedding_dim,
            # on the GPUs the config asks for, planned as ones with native bf16
            precision=autocast_precision(train.precision, native_bf16=cfg.scaling.use_gpu),
            train=train, last_stride=model.last_stride, gem=model.pooling == "gem",
            sync_bn=model.sync_bn, pairwise=cfg.loss.pairwise is not None,
        )  # fmt: skip

    @property
    def global_batch(self) -> int:
        return self.batch * self.workers

    @property
    def half_precision(self) -> bool:
        return self.precision in ("bf16", "fp16")
