"""A Ray cluster on this machine: one head node whose dashboard and job server listen on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class HeadOptions:
    host: str = "127.0.0.1"  # where the dashboard and job server listen (0.0.0.0: every interface)
    port: int = 6379
    dashboard_port: int = 8265
    num_cpus: int | None = None
    num_gpus: int | None = None

    @property
    def job_address(self) -> str:
        host = "127.0.0.1" if self.host == "0.0.0.0" else self.host
        return f"http://{host}:{self.dashboard_port}"


def _ray(*arguments: str) -> subprocess.CompletedProcess:
    # The head starts job entrypoints with `python`: put this environment's interpreter first on PATH,
    # so jobs run with the packages `reid` itself was installed with.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "RAY_USAGE_STATS_ENABLED": "0"}
    ray = Path(bin_dir) / "ray"
    if not ray.is_file():
        raise RuntimeError(f"{ray}: the ray command is not installed next to this Python")
    return subprocess.run([str(ray), *arguments], env=env, capture_output=True, text=True)


def start_head(options: HeadOptions) -> str:
    """Start the head node; returns the job server address. Raises RuntimeError with Ray's own reason."""
    arguments = [
        "start", "--head",
        f"--node-ip-address={options.host if options.host != '0.0.0.0' else '127.0.0.1'}",
        f"--port={options.port}",
        "--include-dashboard=true",
        f"--dashboard-host={options.host}",
        f"--dashboard-port={options.dashboard_port}",
        "--disable-usage-stats",
    ]  # fmt: skip
    if options.num_cpus is not None:
        arguments.append(f"--num-cpus={options.num_cpus}")
    if options.num_gpus is not None:
        arguments.append(f"--num-gpus={options.num_gpus}")
    started = _ray(*arguments)
    if started.returncode != 0:
        lines = [line for line in (started.stderr + started.stdout).splitlines() if line.strip()]
        raise RuntimeError("ray start failed: " + " | ".join(lines[-3:]))
    return options.job_address


def stop_all() -> None:
    """Stop every Ray process on this machine (`ray stop`), whoever started it."""
    stopped = _ray("stop")
    if stopped.returncode != 0:
        lines = (stopped.stderr + stopped.stdout).strip().splitlines()
        raise RuntimeError("ray stop failed" + (f": {lines[-1]}" if lines else f" with exit status {stopped.returncode}"))
