"""Capacity planning: one worker's memory, its network bytes per step and the largest class count
that fits, for a training run, before renting the cluster (`reid plan`).

Each component states what it allocates beside its code (``parallel/classifier.py``,
``parallel/row_optim.py``, ``parallel/losses.py``, ``train/optimizers.py``, the backbones measured in
``model/backbone_memory.py``); this module adds it up. A step's peak is the larger of two moments:
the end of the loss's backward (every activation is still held, and so are the logits and the
active rows' gradient) and the optimizer updates (the activations are gone, the optimizers'
temporaries are there). Under it, a fixed runtime: what the process holds before it allocates a
tensor of its own (``Workload.runtime_bytes``); the two together must fit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from reid_platform.model.backbone_memory import BackboneProfile
from reid_platform.parallel.classifier import active_row_count, largest_shard_rows
from reid_platform.parallel.losses import chunk_bytes, chunk_classes, logit_bytes
from reid_platform.parallel.row_optim import state_bytes_per_row, update_bytes
from reid_platform.planning.workload import Workload
from reid_platform.train.optimizers import (
    backbone_state_copies,
    backbone_update_temporaries,
    classifier_optimizer,
)

FLOAT32, INT64, HALF = torch.float32.itemsize, torch.int64.itemsize, torch.bfloat16.itemsize


# -- classifier -----------------------------------------------------------------------------------


def active_classes(workload: Workload) -> int:
    """Rows one step uses on the largest shard, its positives counted as if every image of the global
    batch were another identity, spread evenly over the classes (a bound)."""
    rows = largest_shard_rows(workload.classes, workload.workers)
    positives = math.ceil(workload.global_batch * rows / workload.classes)
    return active_row_count(rows, workload.sample_rate, positives)


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
    rows, active = largest_shard_rows(workload.classes, workload.workers), active_classes(workload)
    batch = workload.global_batch
    optimizer = classifier_optimizer(workload.train)
    state_per_row = state_bytes_per_row(optimizer, dim)
    sampled = workload.sample_rate < 1.0
    return ClassifierMemory(
        weights=rows * dim * FLOAT32,
        optimizer_state=rows * state_per_row,
        active_rows=active * (dim * FLOAT32 + INT64) if sampled else 0,
        active_gradient=active * dim * FLOAT32,
        logits=logit_bytes(batch, active),
        gathered_batch=batch * (2 * dim * FLOAT32 + INT64),
        chunk_temporaries=chunk_bytes(batch, active, dim),
        update_temporaries=(active * state_per_row if sampled else 0) + update_bytes(optimizer, active, dim),
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
    w, train = workload, workload.train
    return BackboneMemory(
        parameters=parameters * FLOAT32,  # autocast computes in half precision but keeps fp32 weights
        gradients=trainable * FLOAT32,
        optimizer_state=backbone_state_copies(train) * trainable * FLOAT32,
        autocast_weights=parameters * HALF if w.half_precision else 0,
        activations=profile.activation_bytes(w.batch, w.height, w.width, w.last_stride, w.half_precision),
        update_temporaries=backbone_update_temporaries(train) * trainable * FLOAT32,
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
    dim, active = embedding_dim(workload, profile), active_classes(workload)
    return Plan(
        workload=workload,
        dim=dim,
        shard_rows=largest_shard_rows(workload.classes, workload.workers),
        active_classes=active,
        chunk_classes=chunk_classes(workload.global_batch, active, dim),
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
