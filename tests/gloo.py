"""Run a function on W real gloo processes (no Ray) and collect what each rank returns.

Starting W processes that import torch costs seconds, so each world size gets one pool of processes
per test session, whose process group stays initialised: a call sends the function (a module-level
function, pickled by name) to every rank and waits for all of them. A rank that raises breaks the
pool (its peers may be stuck in a collective): the pool is killed, the next call starts a new one,
and the error is raised in the test with the rank's traceback. The benchmarks run the engine on it
too (``benchmarks/common.py``).
"""

from __future__ import annotations

import atexit
import os
import queue
import tempfile
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

CALL_TIMEOUT_S = 300  # a test's call; benchmarks give their own
COLLECTIVE_TIMEOUT_S = 120  # a collective that waits longer fails its rank, with gloo's traceback


def _serve(rank: int, world_size: int, init_file: str, tasks, results, collective_timeout_s: float) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=timedelta(seconds=collective_timeout_s),
    )  # fmt: skip
    while (task := tasks.get()) is not None:
        fn, args = task
        try:
            results.put((rank, True, fn(rank, world_size, *args)))
        except BaseException:  # noqa: BLE001 - reported to the test, which raises it
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class _Pool:
    def __init__(self, world_size: int, collective_timeout_s: float = COLLECTIVE_TIMEOUT_S):
        context = mp.get_context("spawn")
        self.world_size, self.scratch = world_size, tempfile.TemporaryDirectory()
        init_file = os.path.join(self.scratch.name, "init")
        self.tasks = [context.Queue() for _ in range(world_size)]
        self.results = context.Queue()
        self.processes = [
            context.Process(target=_serve, args=(rank, world_size, init_file, self.tasks[rank], self.results, collective_timeout_s), daemon=True)
            for rank in range(world_size)
        ]
        for process in self.processes:
            process.start()

    def run(self, fn, args, timeout_s: float) -> list:
        for tasks in self.tasks:
            tasks.put((fn, args))
        returned: dict[int, object] = {}
        while len(returned) < self.world_size:
            try:
                rank, ok, value = self.results.get(timeout=timeout_s)
            except queue.Empty:
                raise TimeoutError(f"gloo ranks {sorted(set(range(self.world_size)) - set(returned))} did not answer") from None
            if not ok:
                raise RuntimeError(f"rank {rank} of {self.world_size} failed:\n{value}")
            returned[rank] = value
        return [returned[rank] for rank in range(self.world_size)]

    def close(self, kill: bool = False) -> None:
        for process, tasks in zip(self.processes, self.tasks):
            if kill:
                process.kill()
            else:
                tasks.put(None)
        for process in self.processes:
            process.join(timeout=30)
        self.scratch.cleanup()


_pools: dict[int, _Pool] = {}


def run_gloo(world_size: int, fn, *args, timeout_s: float = CALL_TIMEOUT_S, fresh: bool = False) -> list:
    """``fn(rank, world_size, *args)`` on each rank; returns the list of results, by rank.

    ``fresh``: on processes of their own, ended after the call, whose collectives may wait as long as
    the call (a benchmark's: its memory and threads are its own, and one rank may compute long alone).
    """
    if fresh:
        pool = _Pool(world_size, collective_timeout_s=timeout_s)
        try:
            result = pool.run(fn, args, timeout_s)
        except BaseException:
            pool.close(kill=True)  # a rank may be stuck in a collective its failed peer never joins
            raise
        pool.close()
        return result
    pool = _pools.get(world_size) or _pools.setdefault(world_size, _Pool(world_size))
    try:
        return pool.run(fn, args, timeout_s)
    except BaseException:
        _pools.pop(world_size).close(kill=True)
        raise


@atexit.register
def _close_pools() -> None:
    while _pools:
        _pools.popitem()[1].close()
