"""Training checkpoints on disk, in the engine's world-size-independent form.

Layout of one checkpoint directory (every rank writes into its own copy; Ray merges them):

    trainer.pt     rank 0: progress (epochs, steps, the untrained model's metrics), backbone, its optimizer
    classifier/    every rank: rows-START-END.safetensors, its own class rows and their momentum
    evaluation/    rank 0, after the last epoch: the final evaluation's pictures

Loading reads ``trainer.pt`` whole and, of the classifier, only the rows this rank now owns.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from reid_platform.errors import ModelFormatError
from reid_platform.parallel.classifier_files import saved_shards, write_shards

TRAINER_STATE = "trainer.pt"
CLASSIFIER_DIR = "classifier"
TRAINER_KEYS = {"progress", "backbone", "optimizer"}


def save_checkpoint(state: dict, directory: Path, rank: int) -> None:
    """Write one rank's ``Engine.state_dict()``."""
    if rank == 0:
        torch.save({key: value for key, value in state.items() if key != "classifier"}, directory / TRAINER_STATE)
    write_shards(state["classifier"], directory / CLASSIFIER_DIR)


def read_trainer_state(directory: Path) -> dict:
    """Progress, backbone and optimizer state (tensors and plain types only: no code is unpickled)."""
    try:
        state = torch.load(directory / TRAINER_STATE, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ModelFormatError(f"{directory}: not a training checkpoint (no {TRAINER_STATE})") from None
    if set(state) != TRAINER_KEYS:
        raise ModelFormatError(
            f"{directory / TRAINER_STATE}: holds {sorted(state)}, expected {sorted(TRAINER_KEYS)}: written by "
            "another version of reid-platform; continue it with that version, or start a new run.name"
        )
    return state


@contextmanager
def open_checkpoint(directory: Path) -> Iterator[dict]:
    """The ``Engine.state_dict()`` of the whole run saved in ``directory``, every rank's classifier rows
    included, read lazily while the context is open (for ``Engine.load_state_dict``)."""
    trainer = read_trainer_state(directory)
    with saved_shards(directory / CLASSIFIER_DIR) as classifier:
        yield {**trainer, "classifier": classifier}
