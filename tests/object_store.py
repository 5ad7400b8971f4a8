"""A real S3 API server for the tests (moto's standalone server, the one DALI's own tests use), with
authentication on, and a proxy in front of it that injects the store's faults.

The server enforces signatures: its first requests create an IAM user with a key allowed
everything, and only that key works afterwards, so a wrong key is refused as AWS refuses it
(InvalidAccessKeyId, 403). ``FaultProxy`` forwards every request unchanged until told to answer the
next N with 503 SlowDown (S3's throttling), to cut the connection in the middle of the next upload,
or to refuse every write (403 AccessDenied, a key that may only read).
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from reid_platform.cluster.local import free_port

MOTO = str(Path(sys.executable).parent / "moto_server")
REGION = "us-east-1"
_UNAUTHENTICATED_SETUP_REQUESTS = 3  # create_user, create_access_key, put_user_policy


@dataclass
class S3Server:
    """moto's server on a free port, with one IAM key that may do everything."""

    workdir: Path
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    key_id: str = ""
    secret: str = ""

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> S3Server:
        environment = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_UNAUTHENTICATED_SETUP_REQUESTS)}
        log = open(self.workdir / "moto.log", "wb")  # noqa: SIM115 - lives with the server
        self.process = subprocess.Popen([MOTO, "-H", "127.0.0.1", "-p", str(self.port)], env=environment, stdout=log, stderr=log)
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start: {(self.workdir / 'moto.log').read_text()[-2000:]}") from None
                time.sleep(0.1)
        import boto3

        iam = boto3.client("iam", endpoint_url=self.url, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
        iam.create_user(UserName="reid")
        key = iam.create_access_key(UserName="reid")["AccessKey"]
        everything = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="reid", PolicyName="everything", PolicyDocument=json.dumps(everything))
        self.key_id, self.secret = key["AccessKeyId"], key["SecretAccessKey"]
        return self

    def environment(self, endpoint: str | None = None) -> dict[str, str]:
        """What a process needs to use the store: the key, the region and the endpoint (this server's,
        or a proxy's in front of it)."""
        return {
            "AWS_ACCESS_KEY_ID": self.key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_ENDPOINT_URL": endpoint or self.url,
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-role lookups on a machine without one
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }

    def new_bucket(self) -> str:
        """A bucket of its own for one test."""
        import boto3

        name = f"reid-{uuid.uuid4().hex[:12]}"
        environment = self.environment()
        boto3.client(
            "s3", endpoint_url=self.url, region_name=REGION, aws_access_key_id=environment["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=environment["AWS_SECRET_ACCESS_KEY"],
        ).create_bucket(Bucket=name)  # fmt: skip
        return name

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()


class FaultProxy:
    """An HTTP proxy to ``target`` that forwards requests as they are, except the faults it was told
    to inject. Counts the requests it answered with each fault."""

    def __init__(self, target: str) -> None:
        self.target = target.removeprefix("http://")
        self.lock = threading.Lock()
        self.slow_downs_left = 0
        self.resets_left = 0
        self.writes_denied = False
        self.reset_min_bytes = 0
        self.injected = {"slow_down": 0, "reset": 0, "deny": 0}
        self.requests: list[str] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                fault = proxy._take_fault(self.command, length)
                proxy.requests.append(f"{self.command} {self.path}")
                if fault == "reset":  # half the body read, then the connection torn down (RST)
                    self.rfile.read(length // 2)
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                    self.close_connection = True
                    return
                body = self.rfile.read(length) if length else None
                if fault in ("slow_down", "deny"):
                    code, status = ("SlowDown", 503) if fault == "slow_down" else ("AccessDenied", 403)
                    payload = (
                        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code>'
                        "<Message>Injected by the test's proxy.</Message></Error>"
                    ).encode()
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                upstream = http.client.HTTPConnection(proxy.target, timeout=120)
                headers = {name: value for name, value in self.headers.items() if name.lower() != "connection"}
                upstream.request(self.command, self.path, body=body, headers=headers)
                response = upstream.getresponse()
                data = response.read()
                self.send_response(response.status, response.reason)
                for name, value in response.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def slow_down(self, requests: int) -> None:
        """Answer the next ``requests`` requests with 503 SlowDown."""
        with self.lock:
            self.slow_downs_left = requests

    def reset_upload(self, uploads: int = 1, min_bytes: int = 1) -> None:
        """Cut the connection half-way through the body of each of the next ``uploads`` PUTs of at
        least ``min_bytes``."""
        with self.lock:
            self.resets_left, self.reset_min_bytes = uploads, min_bytes

    def deny_writes(self) -> None:
        """Answer every PUT and POST with 403 AccessDenied, as a store does to a key that may only read."""
        with self.lock:
            self.writes_denied = True

    def _take_fault(self, method: str, length: int) -> str | None:
        with self.lock:
            if self.writes_denied and method in ("PUT", "POST"):
                self.injected["deny"] += 1
                return "deny"
            if self.slow_downs_left:
                self.slow_downs_left -= 1
                self.injected["slow_down"] += 1
                return "slow_down"
            if self.resets_left and method == "PUT" and length >= self.reset_min_bytes:
                self.resets_left -= 1
                self.injected["reset"] += 1
                return "reset"
        return None

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
