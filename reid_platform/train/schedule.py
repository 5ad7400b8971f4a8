"""Learning-rate schedule as a pure function of training progress measured in epochs.

Progress in epochs (not steps) is what a resume with another number of workers keeps: the steps
per epoch change with the world size, the position in the schedule must not.

    warm-up        linear from 1% to 100% over the first warmup_epochs
    hold           100% until decay_start (fast-reid's DELAY_EPOCHS)
    cosine decay   from 100% to 1% at the end of the last epoch (decay_start = epochs: no decay)
"""

from __future__ import annotations

import math


def lr_factor(epochs_done: float, epochs: int, warmup_epochs: int, decay_start: int) -> float:
    """The factor of the base rate after ``epochs_done`` (fractional) epochs: a linear warm-up from 1%,
    the full rate until ``decay_start``, then a cosine to 1% at ``epochs``."""
    if epochs_done < warmup_epochs:
        return 0.01 + 0.99 * epochs_done / warmup_epochs
    start = max(warmup_epochs, decay_start)
    if start >= epochs or epochs_done <= start:
        return 1.0
    progress = (epochs_done - start) / (epochs - start)
    return 0.01 + 0.99 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
