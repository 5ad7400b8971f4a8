"""A loopback port nobody listens on (at the moment of asking): for servers to start, or to miss."""

from __future__ import annotations

import socket


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
