"""Run a function on W real gloo processes (no Ray) and collect what each rank returns."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _worker(rank: int, world_size: int, init_file: str, out_dir: str, fn, args) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.save(fn(rank, world_size, *args), Path(out_dir) / f"{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_gloo(world_size: int, fn, *args) -> list:
    """``fn(rank, world_size, *args)`` on each rank; returns the list of results, by rank."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(
            _worker, args=(world_size, init_file, tmp, fn, args), nprocs=world_size, start_method="spawn"
        )
        return [torch.load(Path(tmp) / f"{rank}.pt", weights_only=False) for rank in range(world_size)]
