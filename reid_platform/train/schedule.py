"""Learning-rate schedule as a pure function of training progress measured in epochs.

Progress in epochs (not steps) is what a resume with another number of workers keeps: the steps
per epoch change with the world size, the position in the schedule must not.
"""

from __future__ import annotations

import math


def lr_factor(epochs_done: float, epochs: int, warmup_epochs: int) -> float:
    """Linear warm-up from 1% to 100%, then cosine decay to 1% at the end of the last epoch."""
    if epochs_done < warmup_epochs:
        return 0.01 + 0.99 * epochs_done / warmup_epochs
    progress = (epochs_done - warmup_epochs) / max(1, epochs - warmup_epochs)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
