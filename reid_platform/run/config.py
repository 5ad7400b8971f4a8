"""The sections the run wing reads: ``scaling`` (Ray Train's workers) and ``run`` (names, storage,
checkpoints, restarts). The engine reads neither: it trains on the process group it is given."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from reid_platform.section import Section
from reid_platform.storage.location import Location


class ScalingConfig(Section):
    num_workers: int | tuple[int, int] = Field(
        2, description="N workers, or [MIN, MAX] for an elastic run: it starts with MIN available, goes on with "
        "fewer after losing workers (not below MIN) and grows back up to MAX when resources return.",
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    elastic_batch: Literal["global", "per_worker"] = Field(
        "global",
        description="Elastic runs. global: the global batch (input.batch_size x MAX) is kept and every group "
        "size takes its share, so the optimisation is the same on any size; each size in the range must split "
        "it. per_worker: each worker keeps input.batch_size, so a smaller group takes smaller global batches "
        "and more steps per epoch (learning rates are not rescaled).",
    )
    start_timeout_s: float = Field(
        60.0, gt=0.0,
        description="How long a worker group may take to start (Ray Train's worker-group start timeout). Right "
        "after a node is lost, its resources can still look free: an elastic run first tries the old size and "
        "goes on with fewer workers only after this long.",
    )
    resize_interval_s: float = Field(
        60.0, gt=0.0, description="Elastic runs: how often a healthy worker group looks for resources to grow."
    )

    @field_validator("num_workers", mode="before")
    @classmethod
    def _a_count_or_a_range(cls, value: Any) -> Any:
        # one message for every wrong shape, instead of pydantic's one per member of the union
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
        if is_int(value):
            return value
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(map(is_int, value)):
            return value[0] if value[0] == value[1] else tuple(value)  # [N, N] is N workers
        raise ValueError("give a number of workers N or a range [MIN, MAX] of two integers")

    @field_validator("num_workers")
    @classmethod
    def _a_valid_range(cls, value: int | tuple[int, int]) -> int | tuple[int, int]:
        low, high = (value, value) if isinstance(value, int) else value
        if low < 1 or low > high:
            raise ValueError("the number of workers must be at least 1, and a range [MIN, MAX] must have MIN <= MAX")
        return value

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, tuple)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers


class RunSection(Section):
    name: str = Field("reid", min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    storage_path: Location = Field(
        Path("runs/ray"), description="Ray Train's checkpoints: a folder every node sees, or s3://bucket/prefix."
    )
    output_dir: Path = Path("runs/reid")
    checkpoints_to_keep: int = Field(2, ge=1)
    max_failures: int = Field(
        3, ge=-1, description="Worker-group restarts from the latest checkpoint before the job fails; -1 = no limit."
    )
