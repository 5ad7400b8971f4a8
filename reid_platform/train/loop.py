"""The per-worker training loop that Ray Train runs on every worker.

Data parallel backbone (DDP via Ray), model-parallel classifier (each rank its own rows), DALI input
reading this rank's part of the shards, a checkpoint every epoch, metrics from world rank 0.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import ray.train
import ray.train.torch
import numpy as np
import torch

from reid_platform.config import RunConfig
from reid_platform.console import say
from reid_platform.data.pack import read_manifest
from reid_platform.evaluation.features import evaluate_model
from reid_platform.evaluation.plots import write_pictures
from reid_platform.input import train_loader
from reid_platform.input.partition import Partition
from reid_platform.model.backbone import ModelSpec, ReIDNet, load_pretrained_trunk
from reid_platform.parallel.comm import broadcast_buffers
from reid_platform.parallel.losses import MarginSpec
from reid_platform.parallel.classifier import ShardedClassifier
from reid_platform.tracking.mlflow_run import RunLogger
from reid_platform.train.checkpoint import load_checkpoint, save_checkpoint
from reid_platform.train.epoch_log import INITIAL, STEP_LOSSES
from reid_platform.train.schedule import lr_factor
from reid_platform.train.step import StepSettings, train_step


def build_model(cfg: RunConfig) -> ReIDNet:
    spec = ModelSpec(cfg.model.arch, cfg.model.embedding_dim, cfg.model.last_stride)
    model = ReIDNet(spec)
    if cfg.model.pretrained_weights is not None:
        load_pretrained_trunk(model, cfg.model.pretrained_weights)
    return model


def _evaluation(
    model, cfg: RunConfig, partition: Partition, device, prefix: str, logger: RunLogger | None = None
) -> dict[str, float]:
    """Metrics of every rank's model; with a logger (rank 0), also the CMC and ranked-list pictures."""
    evaluation = evaluate_model(model, cfg.data.shards, cfg.input, partition, device, cfg.evaluation)
    if logger:
        with tempfile.TemporaryDirectory() as directory:
            for picture in write_pictures(evaluation, cfg.data.shards, Path(directory)):
                logger.log_artifact(picture, "evaluation")
    return {f"{prefix}{key}": value for key, value in evaluation.metrics.summary().items()}


def _progress_line(metrics: dict, epochs: int) -> str:
    line = (
        f"epoch {metrics['epoch']}/{epochs}: loss {metrics['loss']:.3f}, lr {metrics['lr']:.4g}, "
        f"{metrics['images_per_s']:.1f} images/s"
    )
    if "mAP" in metrics:
        line += f", rank-1 {metrics['rank1']:.2%}, mAP {metrics['mAP']:.2%}"
    return line


def _quiet_report_lines() -> None:
    # Ray Train 2.60 logs every report at INFO, its whole metrics dict (our per-step losses included),
    # through a logger named after its file, which its LoggingConfig does not reach.
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = RunConfig.model_validate(loop_config["config"])
    _quiet_report_lines()
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    torch.manual_seed(cfg.train.seed)
    partition = Partition(rank, world_size, device.index if device.type == "cuda" else None)
    # rank 0 logs the pictures of the final evaluation; epoch metrics go through the controller
    logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None

    num_classes = read_manifest(cfg.data.shards)["num_classes"]
    # Wrap first, then build the optimizer and restore into the wrapped module: optimizer state
    # loaded after the move lands on the parameters' device (GPU), and every rank loads the same.
    settings = StepSettings.for_device(device, cfg.train.precision, cfg.train.channels_last)
    model = ray.train.torch.prepare_model(settings.prepare_model(build_model(cfg)))
    network = getattr(model, "module", model)  # the plain module, for evaluation and checkpoints
    classifier = ShardedClassifier(
        num_classes,
        network.spec.feature_dim,
        rank,
        world_size,
        MarginSpec(cfg.loss.name, cfg.loss.scale, cfg.loss.margin),
        sample_rate=cfg.loss.sample_rate,
        momentum=cfg.train.momentum,
        weight_decay=cfg.train.weight_decay,
        seed=cfg.train.seed,
        device=device,
    )
    backbone_optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.train.lr, momentum=cfg.train.momentum, weight_decay=cfg.train.weight_decay
    )
    classifier_lr = cfg.train.classifier_lr or cfg.train.lr
    progress = {"epoch": 0, "step": 0, "carried": {}}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            progress = load_checkpoint(Path(directory), network, backbone_optimizer, classifier)
        if logger:
            say(f"resumed after epoch {progress['epoch']} on {world_size} workers from {checkpoint.path}")

    # Distinct augmentation streams per (seed, rank, epoch of the start), also after a resume.
    input_seed = int(np.random.SeedSequence([cfg.train.seed, rank, progress["epoch"]]).generate_state(1)[0])
    loader = train_loader(cfg.data.shards, partition, cfg.input, seed=input_seed)
    if progress["epoch"] == 0:
        progress["carried"] = _evaluation(network, cfg, partition, device, prefix=INITIAL)
        if logger:
            say(f"before training: mAP {progress['carried']['initial_mAP']:.2%}")

    for epoch in range(progress["epoch"], cfg.train.epochs):
        model.train()
        step_losses, started = [], time.perf_counter()
        for index, (images, labels) in enumerate(loader):
            factor = lr_factor(epoch + index / len(loader), cfg.train.epochs, cfg.train.warmup_epochs)
            for group in backbone_optimizer.param_groups:
                group["lr"] = cfg.train.lr * factor
            loss = train_step(
                model, classifier, backbone_optimizer, images, labels, classifier_lr * factor, settings
            )
            step_losses.append(loss)  # a tensor: reading it every step would wait for the GPU
        first_step = progress["step"] + 1
        losses = list(enumerate(torch.stack(step_losses).tolist(), start=first_step))
        progress["step"] += len(losses)
        elapsed = time.perf_counter() - started
        progress["epoch"] = epoch + 1
        metrics = {
            "epoch": progress["epoch"],
            "loss": sum(value for _, value in losses) / len(losses),
            # the schedule at the epoch boundary: the same whatever the number of workers
            "lr": cfg.train.lr * lr_factor(progress["epoch"], cfg.train.epochs, cfg.train.warmup_epochs),
            "images_per_s": len(losses) * cfg.input.batch_size * world_size / elapsed,
        }
        broadcast_buffers(network)  # one model on every rank: the one evaluated and saved
        last_epoch = progress["epoch"] == cfg.train.epochs
        if last_epoch or (cfg.train.eval_every and progress["epoch"] % cfg.train.eval_every == 0):
            metrics.update(_evaluation(network, cfg, partition, device, "", logger if last_epoch else None))
        if logger:
            say(_progress_line(metrics, cfg.train.epochs))
        with tempfile.TemporaryDirectory() as directory:
            save_checkpoint(Path(directory), rank, network, backbone_optimizer, classifier, progress)
            # MLflow gets these from the controller once the checkpoint is committed (epoch_log.py)
            ray.train.report(
                {**metrics, **progress["carried"], STEP_LOSSES: losses},
                checkpoint=ray.train.Checkpoint.from_directory(directory),
            )
    if logger and (lost := logger.close(cfg.tracking.outage_timeout_s)):
        say(f"warning: {lost}; the evaluation pictures may be missing from MLflow")
