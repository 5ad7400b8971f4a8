"""Real services for the operations tests, started the way a user starts them: an MLflow server
(`reid mlflow serve`) and a Ray cluster of several nodes (`reid cluster start` / `join`).

The cluster is laid out on this machine as one of several machines would be. The head has no CPUs:
it serves jobs and runs the driver and the Train controller, and no training worker lands on it.
Each worker node is its own raylet with its own CPU count, a custom resource ``reid_node_<name>``
to find it by, its own Ray folder (--temp-dir) and its own ports: nodes sharing a folder would share
its logs, which every node's log monitor then forwards, and its runtime environments, which any node
may delete. A node runs in the foreground of a process in its own session, so that killing that
process tree takes the whole node down as a dead machine would. What a cluster shares (shards,
run.storage_path, the MLflow server) is shared here anyway.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psutil
import requests

from reid_platform.cluster.local import auth_token, free_port
from tests import REPO
from tests.tiny_run import set_arguments, tiny_run

REID = str(Path(sys.executable).parent / "reid")
# GCS declares a silent node dead after period x threshold: 3 s here instead of Ray's 15 s.
FAST_HEALTH_CHECK = {"RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
                     "RAY_health_check_failure_threshold": "3"}  # fmt: skip


def wait_for(condition, what: str, timeout: float, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := condition():
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def reid(*arguments: str, env: dict | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        [REID, *arguments], cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )


def job_overrides(shards: Path, work: Path, name: str, epochs: int, *extra: str) -> list[str]:
    """--set arguments for a tiny job (``tests/tiny_run.py``) the operations tests submit."""
    ops = ("run.max_failures=2", "tracking.experiment=ops", "tracking.registered_model=ops-test")
    return set_arguments(tiny_run(shards, work, name, epochs, *ops, *extra))


def submit(head: str, tracking_uri: str, overrides: list[str]) -> str:
    submitted = reid("submit", "configs/demo.yaml", "--address", head, *overrides, env={"MLFLOW_TRACKING_URI": tracking_uri})
    assert submitted.returncode == 0, submitted.stderr
    return re.search(r"submitted (\S+) to", submitted.stdout).group(1)


class MlflowServer:
    """`reid mlflow serve` in its own process group, so that it can be killed like a crashed server."""

    def __init__(self, root: Path, host: str = "127.0.0.1", artifacts: str | None = None, env: dict | None = None):
        """``artifacts``: its --artifacts-destination (default: a folder under ``root``); ``env``: added
        to the server's environment only (an object store's credentials)."""
        self.root, self.host, self.port = root, host, free_port()
        self.artifacts, self.env = artifacts or str(root / "artifacts"), env or {}
        self.uri, self.process = f"http://{host}:{self.port}", None

    def start(self) -> None:
        with (self.root / "server.log").open("a") as log:  # the server keeps its own copy of the file
            self.process = subprocess.Popen(
                [REID, "mlflow", "serve", "--host", self.host, "--port", str(self.port), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}", "--artifacts-destination", self.artifacts],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **self.env},
            )  # fmt: skip
        wait_for(self.healthy, f"the MLflow server on port {self.port}", timeout=120)

    def healthy(self) -> bool:
        try:
            return requests.get(self.uri + "/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def kill(self) -> None:
        if self.process is None:  # never started
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()


class LossyProxy:
    """An HTTP proxy to a real server that loses the reply to the first request whose path ends with
    ``lose_reply_to``: the server gets the request and acts on it, the client sees the connection
    closed without an answer (as when a network drops it)."""

    def __init__(self, upstream: str, lose_reply_to: str):
        self.upstream, self.lose_reply_to, self.lost = upstream, lose_reply_to, 0
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def _forward(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                path = self.path.split("?")[0]
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                reply = requests.request(self.command, proxy.upstream + self.path, data=body, headers=headers, timeout=60)
                if path.endswith(proxy.lose_reply_to) and not proxy.lost:
                    proxy.lost += 1
                    self.close_connection = True  # nothing written: the client's read ends without a reply
                    return
                self.send_response(reply.status_code)
                for key, value in reply.headers.items():
                    if key.lower() not in ("content-length", "transfer-encoding", "connection", "content-encoding"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(reply.content)))
                self.end_headers()
                self.wfile.write(reply.content)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _forward

            def log_message(self, *args) -> None:  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.uri = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LossyProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextlib.contextmanager
def silent_server() -> Iterator[str]:
    """http://127.0.0.1:PORT of a socket that accepts connections (the kernel completes them) and
    never answers: a server that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"


def closed_port_uri() -> str:
    """http://127.0.0.1:PORT where nothing listens (a port bound and released): a server that is down."""
    return f"http://127.0.0.1:{free_port()}"


class NetworkNamespace:
    """A network namespace joined to this one by a veth pair, its link cut and healed at will.

    ``host_ip`` is this side's end, ``ip`` the namespace's; a default route through the pair lets
    processes inside reach this machine's other addresses. Only these two addresses are used.
    """

    def __init__(self, tag: int):
        self.name, self.host_link, self.link = f"reid-{tag}", f"rh{tag}", f"rn{tag}"
        self.host_ip, self.ip = f"10.231.{tag % 250}.1", f"10.231.{tag % 250}.2"

    @staticmethod
    def _ip(*arguments: str) -> None:
        done = subprocess.run(["ip", *arguments], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"ip {' '.join(arguments)}: {done.stderr.strip()}")

    def create(self) -> None:
        try:
            self._ip("netns", "add", self.name)
            self._ip("link", "add", self.host_link, "type", "veth", "peer", "name", self.link)
            self._ip("link", "set", self.link, "netns", self.name)
            self._ip("addr", "add", f"{self.host_ip}/30", "dev", self.host_link)
            self._ip("link", "set", self.host_link, "up")
            for command in (("addr", "add", f"{self.ip}/30", "dev", self.link), ("link", "set", self.link, "up"),
                            ("link", "set", "lo", "up"), ("route", "add", "default", "via", self.host_ip)):  # fmt: skip
                self._ip("-n", self.name, *command)
        except RuntimeError:
            self.delete()
            raise

    def run_inside(self, command: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.name, *command]

    def cut(self) -> None:
        self._ip("link", "set", self.host_link, "down")

    def heal(self) -> None:
        self._ip("link", "set", self.host_link, "up")

    def delete(self) -> None:
        """Kill whatever still runs inside, then remove the pair and the namespace (no error if gone)."""
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True, text=True, check=False).stdout
        for pid in pids.split():
            try:
                psutil.Process(int(pid)).kill()
            except psutil.NoSuchProcess:
                pass
        subprocess.run(["ip", "link", "del", self.host_link], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, check=False)


class LocalCluster:
    """Nodes listen on ``host``: loopback, or this side of a NetworkNamespace for a cluster with a
    node inside it (whose addresses must then all be routable: no loopback)."""

    def __init__(self, root: Path, host: str = "127.0.0.1", env: dict[str, str] | None = None):
        self.root, self.host, self.env = root, host, {**os.environ, **FAST_HEALTH_CHECK, **(env or {})}
        # each node's own Ray folder; short, as Ray's socket paths in it must fit in 107 characters
        self.ray_dirs = Path(tempfile.mkdtemp(prefix="reid-ray-"))
        self.port, self.dashboard_port = free_port(), free_port()
        self.address = f"{host}:{self.port}"
        self.job_address = f"http://{host}:{self.dashboard_port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}

    def _launch(self, name: str, command: list[str], env: dict[str, str], up_within_s: float) -> None:
        # A node started again is a new node: its own log and Ray folder (whose old session logs its log
        # monitor would otherwise forward to the job once more).
        self.starts[name] = self.starts.get(name, 0) + 1
        run = name if self.starts[name] == 1 else f"{name}-{self.starts[name]}"
        log = self.root / f"{run}.log"
        with log.open("w") as output:
            self.processes[name] = subprocess.Popen(
                command + ["--block", "--own-ports", "--temp-dir", str(self.ray_dirs / run)],
                cwd=REPO, env={**self.env, **env}, stdout=output, stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        started = self.processes[name]

        def up() -> bool:
            if started.poll() is not None:
                raise AssertionError(f"Ray node {name} exited with {started.returncode}:\n{log.read_text()[-3000:]}")
            return "block forever" in log.read_text()  # `ray start --block` says so once the node is up

        wait_for(up, f"Ray node {name}", timeout=up_within_s)

    def start(self) -> None:
        arguments = ["--host", self.host, "--port", str(self.port), "--dashboard-port", str(self.dashboard_port)]
        self._launch("head", [REID, "cluster", "start", *arguments, "--num-cpus", "0"], {}, up_within_s=120)
        wait_for(lambda: self.nodes().get("head") == "ALIVE", "the head in the node list", timeout=60)

    def add_node(
        self, name: str, num_cpus: int = 1, netns: NetworkNamespace | None = None, env: dict[str, str] | None = None
    ) -> None:
        node_ip = netns.ip if netns else self.host
        command = [REID, "cluster", "join", self.address, "--node-ip-address", node_ip,
                   "--num-cpus", str(num_cpus), "--resource", f"reid_node_{name}=1"]  # fmt: skip
        self._launch(name, netns.run_inside(command) if netns else command, env or {}, up_within_s=120)
        wait_for(lambda: self.nodes().get(name) == "ALIVE", f"node {name} in the node list", timeout=60)

    def nodes(self) -> dict[str, str]:
        """State (ALIVE, DEAD) by node name, the latest node of each name, as the head's state API says."""
        token = auth_token()
        try:
            reply = requests.get(
                f"{self.job_address}/api/v0/nodes", params={"limit": 100, "detail": 1}, timeout=10,
                headers={"Authorization": f"Bearer {token}"} if token else {},
            )  # fmt: skip
            reply.raise_for_status()
        except requests.RequestException:  # the dashboard is starting, or busy: nothing known yet
            return {}
        states: dict[str, tuple[float, str]] = {}
        for node in reply.json()["data"]["result"]["result"]:
            names = [key.removeprefix("reid_node_") for key in node["resources_total"] if key.startswith("reid_node_")]
            name = names[0] if names else ("head" if node["is_head_node"] else node["node_id"])
            started = node.get("start_time_ms") or 0
            if name not in states or started >= states[name][0]:
                states[name] = (started, node["state"])
        return {name: state for name, (_, state) in states.items()}

    def processes_of(self, name: str) -> list[psutil.Process]:
        """The node's processes: its `ray start`, raylet, agents and every worker the raylet started."""
        try:
            root = psutil.Process(self.processes[name].pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def training_workers_on(self, name: str) -> list[psutil.Process]:
        return [p for p in self.processes_of(name) if any("ray::RayTrainWorker" in part for part in _cmdline(p))]

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of the node at once, as a machine that loses power."""
        for process in self.processes_of(name):
            try:
                process.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        node = self.processes.pop(name)
        try:  # and whatever is left of its session (started with start_new_session), if its root is gone
            os.killpg(node.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        node.wait()

    def close(self) -> None:
        """Stop every node this cluster started, head last, and remove their Ray folders."""
        try:
            for name in [*(n for n in self.processes if n != "head"), "head"]:
                if name in self.processes:
                    self.kill_node(name)
        finally:
            shutil.rmtree(self.ray_dirs, ignore_errors=True)


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []


class Serving:
    """`reid models serve REFERENCE` (MLflow's scoring server) on a free port."""

    def __init__(self, uri: str, reference: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.TemporaryFile("w+")  # not a pipe: nobody reads it while the server runs
        self.process = subprocess.Popen(
            [REID, "models", "serve", reference, "--port", str(self.port), "--tracking-uri", uri],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, text=True,
        )  # fmt: skip

    def wait(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                raise AssertionError(f"the server ended: {self.log.read()[-2000:]}")
            try:
                if requests.get(self.url + "/ping", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                time.sleep(0.5)
        raise AssertionError("the server did not answer /ping")

    def invoke(self, payload: dict) -> requests.Response:
        return requests.post(self.url + "/invocations", json=payload, timeout=60)

    def stop(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()
