"""The training engine: everything one worker does to train, with no Ray in it.

Built from the run config, the opened dataset and this process's device once (for more than one
worker) the default process group is initialised: its rank and world size are the engine's
``Partition`` (``Partition.of_process_group``), which the input and the classifier's shard follow.
It owns the pieces and composes them:

    model        model.backbone.build_model; with several ranks, SyncBatchNorm (model.sync_bn) and DDP
                 are applied from outside it
    criterion    parallel.Criterion: the sharded classifier's margin loss (+ a pair-wise loss), whose
                 gradient contract fits DDP, and the classifier's update (its row-wise twin of
                 train.optimizer, at train.classifier_lr)
    optimizer    train.optimizer on the backbone (trunk and head groups, for the freeze warm-up)
    schedule     train.schedule.lr_factor, a function of epochs done
    epoch loop   train_epoch / run: input -> step -> a record per epoch
    evaluation   evaluation.distributed.evaluate_model, after BatchNorm statistics are averaged
    state        state_dict / load_state_dict, world-size independent (classifier rows by global range)

Whoever runs it (the Ray Train worker, a test on gloo processes, a benchmark) only provides the
process group and decides what to do with each epoch's record and state: ``run/worker.py`` reports
them to Ray Train and checkpoints them.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel

from reid_platform.config import RunConfig
from reid_platform.console import say
from reid_platform.data.manifest import ShardDataset
from reid_platform.evaluation.distributed import Evaluation, evaluate_model
from reid_platform.input.backend import TrainBatches, train_loader
from reid_platform.input.partition import Partition
from reid_platform.model.backbone import build_model
from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.parallel.comm import average_buffers
from reid_platform.parallel.criterion import Criterion
from reid_platform.parallel.sync_batchnorm import convert_sync_batchnorm
from reid_platform.train.optimizers import backbone_optimizer, classifier_optimizer
from reid_platform.train.record import EpochRecord
from reid_platform.train.schedule import lr_factor
from reid_platform.train.step import PhaseTimer, StepSettings, train_step


@dataclass
class Progress:
    epoch: int = 0  # epochs completed
    step: int = 0  # optimisation steps completed (every rank counts the same)
    before_training: dict[str, float] = field(default_factory=dict)  # evaluation of the untrained model


@dataclass(frozen=True)
class EpochOutcome:
    record: EpochRecord
    evaluation: Evaluation | None  # the full evaluation behind record.evaluation (for pictures)


class Engine:
    def __init__(
        self,
        cfg: RunConfig,
        dataset: ShardDataset,
        device: torch.device,
        dtype: torch.dtype = torch.float32,  # float64: the numerical tests' runs (StepSettings)
    ):
        self._created = time.perf_counter()
        self.cfg, self.dataset, self.device = cfg, dataset, device
        self.partition = Partition.of_process_group(device)
        self.settings = StepSettings.for_device(device, cfg.train.precision, cfg.train.channels_last, dtype)
        torch.manual_seed(cfg.train.seed)
        network = build_model(cfg.model, cfg.input)
        if cfg.model.sync_bn:  # also on one rank: the same computation, whatever the world size
            network = convert_sync_batchnorm(network)
        self.network = self.settings.prepare_model(network.to(device))
        self.model = self._data_parallel(self.network)
        self.classifier = ShardedClassifier(
            dataset.num_classes,
            self.network.feature_dim,
            self.partition.rank,
            self.partition.world_size,
            cfg.loss,
            classifier_optimizer(cfg.train),
            seed=cfg.train.seed,
            device=device,
        ).to(dtype)  # drawn in float32 whatever the dtype: the same start in a float64 check
        self.criterion = Criterion(self.classifier, cfg.loss)
        head = {id(p) for p in self.network.head_parameters()}
        self.trunk_parameters = [p for p in self.network.parameters() if id(p) not in head]
        groups = [{"name": "trunk", "params": self.trunk_parameters}, {"name": "head", "params": self.network.head_parameters()}]
        self.optimizer = backbone_optimizer(groups, cfg.train)
        self.progress = Progress()
        self.timer: PhaseTimer | None = None  # set by benchmarks to split each step's time
        self._first_step = 1  # the first optimisation step of this process (after load_state_dict: the next)

    def _data_parallel(self, network: torch.nn.Module) -> torch.nn.Module:
        if self.partition.world_size == 1:
            return network
        # No buffer broadcast before every forward (a collective per step): BatchNorm statistics are
        # averaged over ranks once per epoch instead (average_buffers), before evaluating and saving.
        return DistributedDataParallel(
            network,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            forward_sync_buffers=False,
            gradient_as_bucket_view=True,
        )

    # -- state ---------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """This rank's state. ``classifier`` lists shard states by global row range: the list of every
        rank's states (concatenated) loads into an engine of any world size."""
        return {
            "progress": asdict(self.progress),
            "backbone": self.network.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "classifier": [self.classifier.shard_state()],
        }

    def load_state_dict(self, state: dict) -> None:
        self.network.load_state_dict(state["backbone"])
        self.optimizer.load_state_dict(state["optimizer"])  # lands on the parameters' device
        self.classifier.load_shards(state["classifier"])
        self.progress = Progress(**state["progress"])
        self._first_step = self.progress.step + 1

    # -- training ------------------------------------------------------------------------------

    def lr_factor(self, epochs_done: float) -> float:
        train = self.cfg.train
        return lr_factor(epochs_done, train.epochs, train.warmup_epochs, train.decay_start)

    def step(self, images: torch.Tensor, labels: torch.Tensor, epochs_done: float) -> torch.Tensor:
        """One optimisation step at the schedule's rate for ``epochs_done``; returns the loss of the global
        batch (a tensor: reading it would wait for the GPU).

        In the freeze warm-up (``train.freeze_backbone_epochs``) the trunk's gradients are dropped
        before the update, so that only the neck and the classifier train; the trunk's optimizer state
        stays as it was.
        """
        factor = self.lr_factor(epochs_done)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.train.lr * factor
        frozen = self.trunk_parameters if epochs_done < self.cfg.train.freeze_backbone_epochs else ()
        loss = train_step(
            self.model, self.criterion, self.optimizer, images, labels, factor,
            self.settings, self.timer, frozen,
        )  # fmt: skip
        self.progress.step += 1
        return loss

    def train_epoch(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], steps: int) -> list[tuple[int, float]]:
        """One epoch of ``steps`` batches; returns (global step, loss) of each. BatchNorm statistics are
        averaged over ranks at the end, so that every rank holds the same model."""
        self.model.train()
        epoch, first_step = self.progress.epoch, self.progress.step + 1
        losses = []
        batches = self.timer.batches(batches) if self.timer else batches
        for index, (images, labels) in enumerate(itertools.islice(batches, steps)):
            losses.append(self.step(images, labels, epoch + index / steps))
            if self.progress.step == self._first_step and self.partition.rank == 0:
                # a start-up figure for the job log: at scale, minutes can go before the first step
                say(f"first optimisation step done, {time.perf_counter() - self._created:.1f} s after the engine was made")
        if len(losses) != steps:
            raise RuntimeError(f"epoch {epoch + 1}: the input gave {len(losses)} batches, {steps} expected")
        average_buffers(self.network)
        self.progress.epoch += 1
        return list(enumerate(torch.stack(losses).tolist(), start=first_step))

    def evaluate(self) -> Evaluation:
        """Every rank's model on query and gallery (all ranks must call it together)."""
        return evaluate_model(
            self.network, self.dataset, self.cfg.input, self.partition, self.device, self.cfg.evaluation
        )

    def evaluate_untrained(self) -> bool:
        """Evaluate the model before its first step, once per run: False when the progress (of a
        resumed run) already holds that evaluation."""
        if self.progress.before_training:
            return False
        self.progress.before_training = self.evaluate().metrics.summary()
        return True

    def evaluation_due(self) -> bool:
        epoch, every = self.progress.epoch, self.cfg.train.eval_every
        return epoch == self.cfg.train.epochs or bool(every and epoch % every == 0)

    def steps_per_epoch(self, loader: TrainBatches) -> int:
        return min(len(loader), self.cfg.train.steps_per_epoch or len(loader))

    def input_seed(self) -> int:
        """Distinct augmentation streams per (seed, rank, epoch of the start), also after a resume."""
        entropy = [self.cfg.train.seed, self.partition.rank, self.progress.epoch]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0])

    def run(self, loader: TrainBatches | None = None) -> Iterator[EpochOutcome]:
        """Train from the current progress to the last epoch, yielding after every epoch: the caller
        saves ``state_dict()`` (and reports the record) before asking for the next one.

        The untrained model is evaluated first, unless that evaluation is done already.
        """
        loader = loader or train_loader(
            self.dataset, self.partition, self.cfg.input, self.input_seed(), self.cfg.data.on_bad_sample
        )
        self.evaluate_untrained()
        while self.progress.epoch < self.cfg.train.epochs:
            started = _now(self.device)
            losses = self.train_epoch(loader, self.steps_per_epoch(loader))
            elapsed = _now(self.device) - started
            evaluation = self.evaluate() if self.evaluation_due() else None
            record = EpochRecord(
                epoch=self.progress.epoch,
                epochs=self.cfg.train.epochs,
                world_size=self.partition.world_size,
                step_losses=losses,
                lr=self.cfg.train.lr * self.lr_factor(self.progress.epoch),
                images_per_s=len(losses) * self.cfg.input.batch_size * self.partition.world_size / elapsed,
                evaluation=evaluation.metrics.summary() if evaluation else None,
                before_training=self.progress.before_training,
                skipped_samples=_distinct_over_ranks([bad.index for bad in loader.skipped]),
            )
            yield EpochOutcome(record, evaluation)


def _distinct_over_ranks(indices: list[int]) -> int:
    """How many distinct values all ranks' ``indices`` hold (ranks drawing from the same samples may
    find the same bad one)."""
    if not torch.distributed.is_initialized():
        return len(set(indices))
    gathered: list[list[int]] = [[] for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather_object(gathered, indices)
    return len({index for part in gathered for index in part})


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()
