"""What a search is asked to do, checked before anything starts (no Ray here: `reid tune` and
`reid submit --tune` refuse bad options at once), and how many trials a cluster holds at once."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from reid_platform.config import RunConfig
from reid_platform.errors import ConfigError

METRICS = ("mAP", "rank1", "rank5", "mINP")  # what every evaluated epoch reports, to be searched on
DRIVER_MEMORY = 256 * 1024**2  # bytes of Ray's memory resource a trial's driver actor holds (it has no CPU)


@dataclass(frozen=True)
class SearchOptions:
    trials: int = 8  # samples of the space (each grid point is run this many times)
    scheduler: Literal["asha", "none"] = "asha"
    metric: str = "mAP"
    max_concurrent: int | None = None  # None: as many as the cluster holds
    time_budget_s: float | None = None


def check_options(options: SearchOptions) -> None:
    if options.metric not in METRICS:
        raise ConfigError(f"--metric {options.metric}: no run reports it; choose one of {', '.join(METRICS)}")
    if options.trials < 1 or (options.max_concurrent is not None and options.max_concurrent < 1):
        raise ConfigError("--trials and --max-concurrent must be at least 1")
    if options.time_budget_s is not None and options.time_budget_s <= 0:
        raise ConfigError(f"--time-budget {options.time_budget_s:g}: must be a positive number of seconds")


def trial_resources(cfg: RunConfig) -> dict[str, float]:
    """What one trial holds while it trains: its workers, and its driver's memory."""
    workers = cfg.scaling.max_workers
    return {"CPU": workers * cfg.scaling.cpus_per_worker, "GPU": float(workers if cfg.scaling.use_gpu else 0),
            "memory": float(DRIVER_MEMORY)}  # fmt: skip


def concurrent_capacity(needs: dict[str, float], cluster: dict[str, float]) -> int:
    """How many trials that each need ``needs`` the ``cluster``'s resources hold at once."""
    return min(math.floor(cluster.get(name, 0.0) / amount + 1e-9) for name, amount in needs.items() if amount)


def concurrency(cfg: RunConfig, options: SearchOptions, cluster: dict[str, float]) -> int:
    """Trials at once: the cluster's capacity, or ``--max-concurrent`` when it holds that many."""
    needs = trial_resources(cfg)
    capacity = concurrent_capacity(needs, cluster)
    have = ", ".join(f"{cluster.get(name, 0):g} {name}" for name, amount in needs.items() if amount and name != "memory")
    need = ", ".join(f"{amount:g} {name}" for name, amount in needs.items() if amount and name != "memory")
    if capacity < 1:
        raise ConfigError(f"a trial needs {need} (scaling.num_workers x scaling.cpus_per_worker) but the cluster has {have}")
    if options.max_concurrent is not None and options.max_concurrent > capacity:
        raise ConfigError(
            f"--max-concurrent {options.max_concurrent}: the cluster holds {capacity} trial(s) at once "
            f"(each needs {need}; it has {have})"
        )
    return options.max_concurrent or capacity


