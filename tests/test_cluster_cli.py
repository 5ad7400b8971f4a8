"""`reid cluster start|join` refuse what Ray would misread, in one line, before running `ray start`
(the real nodes are started by tests/test_elastic.py)."""

from __future__ import annotations

import socket

import pytest

from reid_platform.cli import main
from reid_platform.cluster.local import (
    HeadOptions,
    NodeResources,
    _ephemeral_port_low,
    free_port,
    outward_address,
    parse_cluster_address,
)


@pytest.mark.parametrize(
    "argv, fragment",
    [
        (["cluster", "join", "http://127.0.0.1:8265"], "http://127.0.0.1:8265: a cluster address is the head's HOST:PORT"),
        (["cluster", "join", "10.0.0.5"], "10.0.0.5: a cluster address is the head's HOST:PORT"),
        (["cluster", "join", "10.0.0.5:6379", "--resource", "gpu_a100"], "--resource gpu_a100: expected NAME=QUANTITY"),
        (["cluster", "start", "--resource", "reid_node_b=lots"], "--resource reid_node_b=lots: expected NAME=QUANTITY"),
    ],
)
def test_bad_addresses_and_resources_are_one_line_exit_2(argv, fragment, capsys):
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert fragment in line


def test_a_nodes_resources_become_ray_start_arguments():
    assert parse_cluster_address("10.0.0.5:6380") == ("10.0.0.5", 6380)
    assert NodeResources().arguments() == []
    assert NodeResources(2, 0, {"reid_node_b": 1.0}).arguments() == [
        "--num-cpus=2", "--num-gpus=0", '--resources={"reid_node_b": 1.0}'
    ]  # fmt: skip


def test_a_head_on_every_interface_is_joined_at_this_machines_address():
    head = HeadOptions("0.0.0.0", port=6380)
    assert head.cluster_address == f"{outward_address()}:6380" and head.job_address == "http://127.0.0.1:8265"
    assert HeadOptions("10.0.0.5").cluster_address == "10.0.0.5:6379"


def test_free_ports_are_free_on_every_address_and_below_the_ephemeral_range():
    """Below it, no outgoing connection takes a node's port between choosing and binding it."""
    ports = {free_port() for _ in range(20)}
    assert all(20000 <= port < _ephemeral_port_low() for port in ports)
    for port in ports:
        with socket.socket() as probe:
            probe.bind(("", port))  # on every address: as Ray's servers bind
