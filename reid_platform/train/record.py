"""What a training epoch reports, as one typed record: from the workers through Ray Train's report
to the controller's MLflow callback (``run/epoch_log.py``) and to the driver's results.

Ray keeps reported metrics in its checkpoint manager's JSON snapshot, so the record travels as a
JSON-compatible dict under one key (``to_report`` / ``from_report``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

REPORT_KEY = "epoch_record"
EVALUATION_DIR = "evaluation"  # in a checkpoint: the final evaluation's pictures


@dataclass(frozen=True)
class EpochRecord:
    epoch: int  # epochs completed, counted from 1
    epochs: int  # the run's total
    world_size: int
    step_losses: list[tuple[int, float]]  # (global step, loss) of every step of this epoch
    lr: float  # the schedule at the end of the epoch, the same whatever the number of workers
    images_per_s: float  # all workers together
    evaluation: dict[str, float] | None  # rank-1/5/10, mAP, mINP, query counts, when evaluated
    before_training: dict[str, float] = field(default_factory=dict)  # the untrained model's evaluation
    pictures: list[str] = field(default_factory=list)  # files under the checkpoint's EVALUATION_DIR
    skipped_samples: int = 0  # training samples skipped so far in this attempt, as they do not decode

    @property
    def loss(self) -> float:
        return sum(value for _, value in self.step_losses) / max(1, len(self.step_losses))

    @property
    def last(self) -> bool:
        return self.epoch == self.epochs

    def to_report(self) -> dict:
        return {REPORT_KEY: asdict(self)}

    @classmethod
    def from_report(cls, metrics: dict) -> EpochRecord | None:
        """The record in one worker's reported metrics (None for a report without one)."""
        fields = metrics.get(REPORT_KEY)
        if fields is None:
            return None
        return cls(**{**fields, "step_losses": [tuple(pair) for pair in fields["step_losses"]]})
