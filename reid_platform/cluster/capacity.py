"""Capacity planning: one worker's memory, its network bytes per step and the largest class count
that fits, for a training run, before renting the cluster (`reid plan`).

The model follows what the code allocates, tensor by tensor:

    classifier  ``parallel/classifier.py``: the rows of the largest shard (rank 0's: C // W, one more
                where C % W), kept in fp32 whatever the backbone's precision, and the row optimizer's
                state of each row (``parallel/row_optim.py``); per step, the active rows (every row,
                or a sample of them: gathered into a copy), their gradient, the (global batch x
                active rows) logit buffer of ``parallel/losses.py``, the gathered batch of
                ``parallel/comm.py`` and one chunk's temporaries; in the update, the state of the
                sampled rows and the optimizer's temporaries
    backbone    fp32 parameters, their gradients (DDP's buckets) and optimizer state; the activations
                saved for backward, measured per architecture (``backbone_memory.json``, written by
                ``benchmarks/backbone_memory.py``); under autocast, the half-precision weight copies

A step's peak is the larger of two moments: the end of the loss's backward (every activation is
still held, and so are the logits and the active rows' gradient) and the optimizer updates (the
activations are gone, the optimizers' temporaries are there). Under it, a fixed runtime: what the
process holds before it allocates a tensor of its own (``Workload.runtime_bytes``); the two
together must fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from reid_platform.parallel.classifier import shard_range
from reid_platform.parallel.losses import default_chunk_size
from reid_platform.parallel.row_optim import UPDATE_BLOCK_ROWS

TABLE_PATH = Path(__file__).with_name("backbone_memory.json")
FLOAT32, INT64, HALF = 4, 8, 2
# What a worker holds whatever it trains: on a GPU, the CUDA context, cuBLAS's and NCCL's buffers
# and the caching allocator's slack (about 1 GiB); in a CPU worker, the libraries' own memory
# (torch, DALI, Ray: 1.4 GiB of RSS for a 3,000-class run on this project's 2-core machine).
RUNTIME_BYTES = 1024**3
HALF_PRECISIONS = ("bf16", "fp16")
# Saved activations of a half-precision forward take half the bytes of the fp32 measurement: an
# assumption (BatchNorm statistics and the fp32 input stay full size), which the GPU benchmark bears
# out for ResNet-50 at 256x128 (0.51x from 128 to 256 images, benchmarks/README.md).
HALF_ACTIVATION_FACTOR = 0.5
# Temporaries of size (global batch x chunk) alive at once in the backward's recomputation of one
# chunk (``_ShardedMarginLoss.backward``): the cosines, Circle's two factors, the margin logits and
# the gradients of two of them. Circle has the most; the other losses fewer.
CHUNK_LOGIT_TEMPORARIES = 6
# ... and of size (chunk x d) and (global batch x d): the chunk's rows' gradient before it is
# stored (the rows are not normalised into a copy: ``losses._cosines``) and the features' gradient.
CHUNK_ROW_TEMPORARIES = 1

Precision = Literal["fp32", "bf16", "fp16"]
OptimizerName = Literal["sgd", "adam", "adamw"]


@dataclass(frozen=True)
class Optimizer:
    """``train.optimizer`` and the settings that change what it allocates."""

    name: OptimizerName = "adam"
    momentum: float = 0.9  # sgd: torch keeps no momentum buffer at 0 (the row optimizer always does)
    weight_decay: float = 5e-4  # sgd and adam add it to a copy of the gradient; adamw decays in place

    @property
    def state_copies(self) -> int:
        """Tensors of a parameter's size the row optimizer keeps per row (RowSGD / RowAdam)."""
        return 1 if self.name == "sgd" else 2

    @property
    def counts_steps_per_row(self) -> bool:
        return self.name != "sgd"  # RowAdam's "steps": one float32 per row

    @property
    def update_temporaries(self) -> int:
        """Tensors of a block of updated rows' size alive at once in one row update (RowSGD / RowAdam)."""
        decay_copy = 1 if self.weight_decay and self.name != "adamw" else 0
        # Adam's denominator, exp_avg / denominator, and that times the step size
        return decay_copy + (0 if self.name == "sgd" else 3)

    @property
    def backbone_temporaries(self) -> int:
        """Parameter-sized tensors alive at once in torch's foreach SGD / Adam: SGD's decayed gradient;
        Adam's decayed gradient, then sqrt(exp_avg_sq), never both (it deletes the first before it
        allocates the second)."""
        if self.name == "sgd":
            return 1 if self.weight_decay else 0
        return 1

    @property
    def backbone_state_copies(self) -> int:
        if self.name == "sgd":
            return 1 if self.momentum else 0
        return 2


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
    precision: Precision = "bf16"
    optimizer: Optimizer = Optimizer()
    last_stride: int = 1
    gem: bool = False
    sync_bn: bool = False
    pairwise: bool = False
    runtime_bytes: int = RUNTIME_BYTES

    @property
    def global_batch(self) -> int:
        return self.batch * self.workers

    @property
    def half_precision(self) -> bool:
        return self.precision in HALF_PRECISIONS


@dataclass(frozen=True)
class BackboneProfile:
    """One architecture's entry of the measured table."""

    arch: str
    trunk_parameters: int
    width: int
    batchnorm_layers: int
    batchnorm_channels: int
    bytes_per_image_pixel: dict[int, float]  # by last stride: saved activations, fp32
    fixed_bytes: dict[int, int]


def load_profiles(path: Path = TABLE_PATH) -> dict[str, BackboneProfile]:
    """The measured backbones, by ``model.arch``."""
    archs = json.loads(path.read_text())["archs"]
    return {arch: _profile(arch, entry) for arch, entry in archs.items()}


def _profile(arch: str, entry: dict) -> BackboneProfile:
    by_stride = {int(key.removeprefix("last_stride_")): fit for key, fit in entry["activations"].items()}
    return BackboneProfile(
        arch=arch,
        trunk_parameters=entry["trunk_parameters"],
        width=entry["width"],
        batchnorm_layers=entry["batchnorm_layers"],
        batchnorm_channels=entry["batchnorm_channels"],
        bytes_per_image_pixel={stride: fit["bytes_per_image_pixel"] for stride, fit in by_stride.items()},
        fixed_bytes={stride: fit["fixed_bytes"] for stride, fit in by_stride.items()},
    )


# -- classifier -----------------------------------------------------------------------------------


def shard_rows(workload: Workload) -> int:
    """Rows of the largest shard, rank 0's: the worker that runs out of memory first."""
    start, end = shard_range(workload.classes, 0, workload.workers)
    return end - start


def active_classes(workload: Workload) -> int:
    """Rows one step uses on the largest shard (``ShardedClassifier.sample_rows``): all of them at
    sample rate 1, else the sampled fraction or, if more, the classes of the global batch it owns,
    counted as if every image were another identity spread evenly over the classes (a bound)."""
    rows = shard_rows(workload)
    if workload.sample_rate >= 1.0:
        return rows
    positives = min(rows, math.ceil(workload.global_batch * rows / workload.classes))
    return min(rows, max(1, int(workload.sample_rate * rows), positives))


def chunk_classes(workload: Workload, dim: int) -> int:
    """Classes the loss visits at a time (``losses.default_chunk_size``), at most the active ones."""
    return min(active_classes(workload), default_chunk_size(workload.global_batch, dim))


@dataclass(frozen=True)
class ClassifierMemory:
    weights: int
    optimizer_state: int
    active_rows: int  # the sampled rows' copy and their indices (none at sample rate 1)
    active_gradient: int
    logits: int
    gathered_batch: int  # the global batch's features, their gradient and the labels
    chunk_temporaries: int
    update_temporaries: int  # the sampled rows' state, gathered, and the optimizer's temporaries

    @property
    def resident(self) -> int:
        return self.weights + self.optimizer_state

    @property
    def at_loss_backward(self) -> int:
        """Held at the end of the loss's backward, beyond ``resident``."""
        transient = self.active_rows + self.active_gradient + self.logits
        return transient + self.gathered_batch + self.chunk_temporaries

    @property
    def at_update(self) -> int:
        """Held in the rows' update, beyond ``resident`` (the active rows' gradient is still there)."""
        return self.active_rows + self.active_gradient + self.update_temporaries

    @property
    def peak(self) -> int:
        """The classifier alone (``benchmarks/classifier.py`` measures it without a backbone)."""
        return self.resident + max(self.at_loss_backward, self.at_update)


def classifier_memory(workload: Workload, dim: int) -> ClassifierMemory:
    rows, active, batch = shard_rows(workload), active_classes(workload), workload.global_batch
    optimizer = workload.optimizer
    sampled = workload.sample_rate < 1.0
    step_count = FLOAT32 if optimizer.counts_steps_per_row else 0
    state_per_row = optimizer.state_copies * dim * FLOAT32 + step_count
    chunk = chunk_classes(workload, dim)
    chunk_temporaries = (
        CHUNK_LOGIT_TEMPORARIES * batch * chunk + CHUNK_ROW_TEMPORARIES * (chunk + batch) * dim
    ) * FLOAT32
    return ClassifierMemory(
        weights=rows * dim * FLOAT32,
        optimizer_state=rows * state_per_row,
        active_rows=active * (dim * FLOAT32 + INT64) if sampled else 0,
        active_gradient=active * dim * FLOAT32,
        logits=batch * active * FLOAT32,  # float32 at least, whatever the backbone's precision
        gathered_batch=batch * (2 * dim * FLOAT32 + INT64),
        chunk_temporaries=chunk_temporaries,
        update_temporaries=(active * state_per_row if sampled else 0)
        + optimizer.update_temporaries * min(active, UPDATE_BLOCK_ROWS) * dim * FLOAT32,  # row_optim.update_rows
    )


# -- backbone -------------------------------------------------------------------------------------


def backbone_parameters(workload: Workload, profile: BackboneProfile) -> int:
    """The trunk, the projection to ``model.embedding_dim`` if any, BNNeck's weight and bias, GeM's p."""
    dim = embedding_dim(workload, profile)
    projection = profile.width * dim if workload.embedding_dim is not None else 0
    return profile.trunk_parameters + projection + 2 * dim + (1 if workload.gem else 0)


def trainable_parameters(workload: Workload, profile: BackboneProfile) -> int:
    frozen = embedding_dim(workload, profile)  # BNNeck's bias
    return backbone_parameters(workload, profile) - frozen


def embedding_dim(workload: Workload, profile: BackboneProfile) -> int:
    return workload.embedding_dim or profile.width


@dataclass(frozen=True)
class BackboneMemory:
    parameters: int
    gradients: int
    optimizer_state: int
    autocast_weights: int  # half-precision copies of the weights, saved for backward under autocast
    activations: int
    update_temporaries: int


def backbone_memory(workload: Workload, profile: BackboneProfile) -> BackboneMemory:
    parameters, trainable = backbone_parameters(workload, profile), trainable_parameters(workload, profile)
    pixels = workload.height * workload.width
    stride = workload.last_stride
    activations = (
        profile.bytes_per_image_pixel[stride] * pixels * workload.batch + profile.fixed_bytes[stride]
    )
    optimizer = workload.optimizer
    return BackboneMemory(
        parameters=parameters * FLOAT32,  # autocast computes in half precision but keeps fp32 weights
        gradients=trainable * FLOAT32,
        optimizer_state=optimizer.backbone_state_copies * trainable * FLOAT32,
        autocast_weights=parameters * HALF if workload.half_precision else 0,
        activations=round(activations * (HALF_ACTIVATION_FACTOR if workload.half_precision else 1.0)),
        update_temporaries=optimizer.backbone_temporaries * trainable * FLOAT32,
    )


# -- network --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transfer:
    name: str
    bytes: int  # sent by one worker


def ring_all_reduce(workers: int, size: int) -> int:
    """Bytes each worker sends in a ring all-reduce of ``size`` bytes: 2 (W - 1) / W of them."""
    return round(2 * (workers - 1) / workers * size)


def all_gather(workers: int, size: int) -> int:
    """Bytes each worker sends in an all-gather of its ``size`` bytes: one copy to every other."""
    return (workers - 1) * size


def step_transfers(workload: Workload, profile: BackboneProfile) -> tuple[Transfer, ...]:
    """Every collective of one training step (none on one worker), in the order they run."""
    workers, batch, dim = workload.workers, workload.batch, embedding_dim(workload, profile)
    if workers == 1:
        return ()
    rows = workload.global_batch
    gradients = trainable_parameters(workload, profile) * FLOAT32
    transfers = [
        Transfer("labels (all-gather, int64)", all_gather(workers, batch * INT64)),
        Transfer("features (all-gather, fp32)", all_gather(workers, batch * dim * FLOAT32)),
        Transfer("row maxima of the logits (all-reduce)", ring_all_reduce(workers, rows * FLOAT32)),
        # sums of exponentials, positive logits, logit sums, class counts: one all-reduce
        Transfer("softmax sums (all-reduce, 4 per row)", ring_all_reduce(workers, 4 * rows * FLOAT32)),
        Transfer("features' gradient (all-reduce, fp32)", ring_all_reduce(workers, rows * dim * FLOAT32)),
        Transfer("backbone gradients (DDP all-reduce, fp32)", ring_all_reduce(workers, gradients)),
    ]
    if workload.sync_bn:
        transfers.extend(_sync_batchnorm_transfers(workload, profile))
    if workload.pairwise:
        transfers.append(Transfer("pair-wise loss value (all-reduce)", ring_all_reduce(workers, FLOAT32)))
    return tuple(transfers)


def _sync_batchnorm_transfers(workload: Workload, profile: BackboneProfile) -> list[Transfer]:
    """``parallel/sync_batchnorm.py`` per layer: forward, an all-gather of the row count and one of
    (count, means, squared deviations) in float64; backward, an all-reduce of two sums per channel
    in the activations' precision. BNNeck is one more layer."""
    workers = workload.workers
    layers = profile.batchnorm_layers + 1
    channels = profile.batchnorm_channels + embedding_dim(workload, profile)
    element = HALF if workload.half_precision else FLOAT32
    statistics = all_gather(workers, layers * INT64) + all_gather(workers, (layers + 2 * channels) * INT64)
    return [
        Transfer("SyncBatchNorm statistics (all-gathers, float64)", statistics),
        Transfer(
            "SyncBatchNorm gradient sums (all-reduce)", ring_all_reduce(workers, 2 * channels * element)
        ),
    ]


# -- the plan -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Plan:
    workload: Workload
    dim: int
    shard_rows: int
    active_classes: int
    chunk_classes: int
    classifier: ClassifierMemory
    backbone: BackboneMemory
    transfers: tuple[Transfer, ...]

    @property
    def resident(self) -> int:
        """What every moment of the step holds: weights and optimizer states of both halves."""
        b = self.backbone
        return self.classifier.resident + b.parameters + b.gradients + b.optimizer_state

    @property
    def loss_backward(self) -> int:
        """The end of the classifier's backward: the backbone's activations are all still held."""
        b = self.backbone
        return self.resident + b.activations + b.autocast_weights + self.classifier.at_loss_backward

    @property
    def optimizer_step(self) -> int:
        """The updates, backbone first, then the classifier's rows (their gradient still held)."""
        c, b = self.classifier, self.backbone
        held = self.resident + c.active_rows + c.active_gradient
        return held + max(b.update_temporaries, c.update_temporaries)

    @property
    def peak(self) -> int:
        """The tensors' peak (what ``torch.cuda.max_memory_allocated`` reports)."""
        return max(self.loss_backward, self.optimizer_step)

    @property
    def total(self) -> int:
        """The peak and the runtime under it: what the worker needs of its GPU (or a CPU worker's RSS)."""
        return self.peak + self.workload.runtime_bytes

    @property
    def network_bytes(self) -> int:
        return sum(transfer.bytes for transfer in self.transfers)

    def network_seconds(self, bits_per_second: float) -> float:
        """The transfers back to back at the link's rate: no latency, no overlap with compute."""
        return self.network_bytes * 8 / bits_per_second


def plan(workload: Workload, profile: BackboneProfile) -> Plan:
    dim = embedding_dim(workload, profile)
    return Plan(
        workload=workload,
        dim=dim,
        shard_rows=shard_rows(workload),
        active_classes=active_classes(workload),
        chunk_classes=chunk_classes(workload, dim),
        classifier=classifier_memory(workload, dim),
        backbone=backbone_memory(workload, profile),
        transfers=step_transfers(workload, profile),
    )


def max_classes(workload: Workload, profile: BackboneProfile, memory_bytes: int) -> int:
    """The most classes whose plan peaks within ``memory_bytes`` per worker, everything else as
    ``workload``; 0 when not even one class per worker fits."""

    def fits(classes: int) -> bool:
        return plan(replace(workload, classes=classes), profile).total <= memory_bytes

    low = workload.workers  # every worker owns a row at least
    if not fits(low):
        return 0
    high = 2 * low
    while fits(high):  # memory grows with the classes, so this ends
        low, high = high, 2 * high
    while high - low > 1:  # fits(low), not fits(high)
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low
