"""Ray nodes on this machine: a head whose dashboard and job server listen on loopback (or every
interface), and worker nodes that join a head, as ``ray start`` would start them."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from reid_platform.errors import ConfigError

# The services every Ray node runs besides its workers. Their defaults are fixed ports, so a second
# node on the same machine (a test's cluster) needs its own.
NODE_SERVICE_PORTS = (
    "node-manager-port", "object-manager-port", "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
    "metrics-export-port", "runtime-env-agent-port",
)  # fmt: skip


def free_port() -> int:
    """A port that no socket on any address holds at the moment of asking (Ray's servers bind every
    address), drawn from below the kernel's ephemeral range where there is room: a port from that
    range can become the local end of any outgoing connection before the server that was given it
    binds it (a test's cluster failed so: "Address already in use"). Ray's own worker ports are
    10002-19999 by default, so the draw starts above them."""
    ephemeral_low = _ephemeral_port_low()
    candidates = random.sample(range(20000, ephemeral_low), min(200, max(0, ephemeral_low - 20000)))
    for port in [*candidates, 0]:  # 0: the kernel's pick, the last resort
        with socket.socket() as probe:
            try:
                probe.bind(("", port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free TCP port on this machine")


def _ephemeral_port_low() -> int:
    """The first port of the kernel's range for the local ends of outgoing connections."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):  # not Linux: IANA's dynamic range, which macOS and Windows use
        return 49152


def outward_address() -> str:
    """This machine's address on its default route; loopback when it has none. (Connecting a UDP
    socket only picks the route: nothing is sent.)"""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect(("10.254.254.254", 1))
            return probe.getsockname()[0]
        except OSError:
            return "127.0.0.1"


@dataclass(frozen=True)
class NodeResources:
    """What a node offers the scheduler; None: what Ray detects."""

    num_cpus: int | None = None
    num_gpus: int | None = None
    custom: dict[str, float] = field(default_factory=dict)  # e.g. {"reid_node_b": 1}: to find or pin a node

    def arguments(self) -> list[str]:
        arguments = [f"--num-cpus={self.num_cpus}"] if self.num_cpus is not None else []
        if self.num_gpus is not None:
            arguments.append(f"--num-gpus={self.num_gpus}")
        if self.custom:
            arguments.append(f"--resources={json.dumps(self.custom)}")
        return arguments


@dataclass(frozen=True)
class HeadOptions:
    host: str = "127.0.0.1"  # where the dashboard and job server listen (0.0.0.0: every interface)
    port: int = 6379
    dashboard_port: int = 8265
    resources: NodeResources = NodeResources()

    @property
    def node_ip(self) -> str:
        """The address the other nodes reach the head at: with every interface open, this machine's
        address on its default route (what Ray would find too)."""
        return outward_address() if self.host == "0.0.0.0" else self.host

    @property
    def job_address(self) -> str:
        return f"http://{'127.0.0.1' if self.host == '0.0.0.0' else self.host}:{self.dashboard_port}"

    @property
    def cluster_address(self) -> str:
        """What `reid cluster join` takes."""
        return f"{self.node_ip}:{self.port}"


def auth_token(default_file: bool = True) -> str | None:
    """The Ray token to present: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else (with
    ``default_file``: for a head on this machine) ~/.ray/auth_token, which a head started here makes.
    None when token auth is disabled or there is no token."""
    if os.environ.get("RAY_AUTH_MODE", "").lower() == "disabled":
        return None
    if token := os.environ.get("RAY_AUTH_TOKEN"):
        return token
    named = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if named is None and not default_file:
        return None
    path = Path(named or Path.home() / ".ray" / "auth_token")
    if not path.is_file():
        return None
    return path.read_text().strip() or None


def _ray_command(*arguments: str) -> tuple[list[str], dict[str, str]]:
    # The head starts job entrypoints with `python`: put this environment's interpreter first on PATH,
    # so jobs run with the packages `reid` itself was installed with.
    bin_dir = str(Path(sys.executable).parent)
    env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""), "RAY_USAGE_STATS_ENABLED": "0"}
    ray = Path(bin_dir) / "ray"
    if not ray.is_file():
        raise RuntimeError(f"{ray}: the ray command is not installed next to this Python")
    return [str(ray), *arguments], env


def _start(arguments: list[str], block: bool, env_updates: dict[str, str] | None = None) -> None:
    """``ray start``; with ``block`` this process becomes the node (it ends when the node does, and
    killing it, with its children, takes the whole node down). Raises RuntimeError with Ray's reason."""
    command, env = _ray_command("start", *arguments, "--disable-usage-stats", *(["--block"] if block else []))
    env.update(env_updates or {})
    if block:
        os.execve(command[0], command, env)
    started = subprocess.run(command, env=env, capture_output=True, text=True)
    if started.returncode != 0:
        lines = [line for line in (started.stderr + started.stdout).splitlines() if line.strip()]
        raise RuntimeError("ray start failed: " + " | ".join(lines[-3:]))


@dataclass(frozen=True)
class Placement:
    """Where a node keeps its things on this machine: Ray's defaults, or (several nodes on one machine,
    as in tests) its own folder and free ports. Nodes that share a folder also share its logs, which
    every node's log monitor then forwards, and its runtime environments, which any node deletes."""

    temp_dir: Path | None = None  # Ray's session folder root; default /tmp/ray
    own_ports: bool = False  # free ports for the node's services instead of Ray's fixed defaults

    def arguments(self) -> list[str]:
        arguments = [f"--temp-dir={self.temp_dir}"] if self.temp_dir is not None else []
        return arguments + ([f"--{name}={free_port()}" for name in NODE_SERVICE_PORTS] if self.own_ports else [])


def start_head(options: HeadOptions, block: bool = False, placement: Placement = Placement()) -> None:
    arguments = [
        "--head", f"--node-ip-address={options.node_ip}", f"--port={options.port}",
        "--include-dashboard=true", f"--dashboard-host={options.host}", f"--dashboard-port={options.dashboard_port}",
        *options.resources.arguments(), *placement.arguments(),
    ]  # fmt: skip
    _start(arguments, block)


def parse_cluster_address(address: str) -> tuple[str, int]:
    """HOST:PORT of a head's Ray (GCS) server; ConfigError for anything else, the job server URL included."""
    host, _, port = address.rpartition(":")
    if "://" in address or not host or not port.isdigit():
        raise ConfigError(
            f"{address}: a cluster address is the head's HOST:PORT (its Ray port, 6379 unless `reid cluster "
            "start --port` chose another), not the job server's URL"
        )
    return host, int(port)


def join_cluster(
    address: str, resources: NodeResources, node_ip: str | None = None, block: bool = False,
    placement: Placement = Placement(),
) -> None:
    """Start a worker node of the head at ``address``. ``node_ip``: the address other nodes reach this
    one at (default: the one Ray finds towards the head)."""
    host, port = parse_cluster_address(address)
    arguments = [f"--address={host}:{port}", *resources.arguments()]
    if node_ip is not None:
        arguments.append(f"--node-ip-address={node_ip}")
    # A head with a token (Ray's default) refuses nodes without it, and `ray start --address` only
    # sends one in token mode: with a token here (the head's, copied, or RAY_AUTH_TOKEN), use it.
    token_mode = {"RAY_AUTH_MODE": "token"} if "RAY_AUTH_MODE" not in os.environ and auth_token() else {}
    _start(arguments + placement.arguments(), block, token_mode)


def stop_all() -> None:
    """Stop every Ray process on this machine (`ray stop`), whoever started it."""
    command, env = _ray_command("stop")
    stopped = subprocess.run(command, env=env, capture_output=True, text=True)
    if stopped.returncode != 0:
        lines = (stopped.stderr + stopped.stdout).strip().splitlines()
        raise RuntimeError("ray stop failed" + (f": {lines[-1]}" if lines else f" with exit status {stopped.returncode}"))
