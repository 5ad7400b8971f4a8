"""Training checkpoints that load with any number of workers.

Layout of one checkpoint directory (every rank writes into its own copy; Ray merges them):

    trainer.pt           rank 0: epoch, step, backbone and its optimizer, carried-over metrics
    classifier/          every rank: rows-START-END.safetensors, its own rows and their momentum
"""

from __future__ import annotations

from pathlib import Path

import torch

from reid_platform.parallel.classifier import ShardedClassifier

TRAINER_STATE = "trainer.pt"
CLASSIFIER_DIR = "classifier"


def save_checkpoint(
    directory: Path,
    rank: int,
    backbone: torch.nn.Module,
    backbone_optimizer: torch.optim.Optimizer,
    classifier: ShardedClassifier,
    progress: dict,
) -> None:
    if rank == 0:
        state = {
            "backbone": backbone.state_dict(),
            "backbone_optimizer": backbone_optimizer.state_dict(),
            "progress": progress,
        }
        torch.save(state, directory / TRAINER_STATE)
    classifier.save_shard(directory / CLASSIFIER_DIR)


def load_checkpoint(
    directory: Path,
    backbone: torch.nn.Module,
    backbone_optimizer: torch.optim.Optimizer,
    classifier: ShardedClassifier,
) -> dict:
    """Restore everything in place; returns the saved progress (epoch, step, metrics)."""
    state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    backbone.load_state_dict(state["backbone"])
    backbone_optimizer.load_state_dict(state["backbone_optimizer"])
    classifier.load_shards(directory / CLASSIFIER_DIR)
    return state["progress"]
