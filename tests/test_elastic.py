"""Elastic training across Ray nodes: a job on [1, 2] workers loses a node mid-epoch, goes on with
one worker without waiting for it, and grows back to two when the node returns; then loses it again
in the other way, in the same job.

The clusters (tests/services.py) have a head without CPUs and two worker nodes of one CPU each, so
the two training workers of the full group run on different nodes. The node is lost in two ways: all
its processes killed at once, as a machine that dies; or, with the node inside a network namespace,
its link cut, as a partition, which only Ray's health checks can tell.
"""

from __future__ import annotations

import itertools
import os
import re
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from reid_platform.cluster.jobs import JobServer
from reid_platform.cluster.local import auth_token
from reid_platform.data.manifest import ShardDataset
from reid_platform.input.partition import steps_per_epoch
from tests.services import (
    FAST_HEALTH_CHECK,
    LocalCluster,
    MlflowServer,
    NetworkNamespace,
    job_overrides,
    submit,
    wait_for,
)  # fmt: skip
from tests.tiny_run import BATCH

# Growing back takes 20-60 s from the node's restart (its `ray start`, Ray's resize check, a new group
# of two starting and loading the checkpoint): each one-worker phase must outlast it, so the job has
# epochs of demo-sized crops (about 5 s each on one worker), where the other Ray tests use 64x32: two
# before the first loss, then this many for each loss and its growing back (a growth took 3-6
# one-worker epochs here, on a machine busy with other tests too).
EPOCHS_PER_LOSS = 11
# a group of the old size, tried while the lost node still looks alive, gives up after 20 s instead of 60
ELASTIC = ("input.height=128", "input.width=64", "scaling.num_workers=[1,2]", "scaling.resize_interval_s=2", "scaling.start_timeout_s=20", "tracking.experiment=elastic")
# the longest Ray's health checks may take to declare a silent node dead, with FAST_HEALTH_CHECK
DETECTION_LIMIT_S = int(FAST_HEALTH_CHECK["RAY_health_check_failure_threshold"]) * (
    int(FAST_HEALTH_CHECK["RAY_health_check_period_ms"]) + int(FAST_HEALTH_CHECK["RAY_health_check_timeout_ms"])
) / 1000
pytestmark = pytest.mark.ray

NodeLoss = tuple[Callable[[], None], Callable[[], None]]  # (lose node b, bring it back)


def run_through_node_losses(cluster: LocalCluster, tracking_uri: str, shards: Path, work: Path, losses: list[NodeLoss]) -> None:
    """Submit an elastic job; lose node b in epoch 2 or later, bring it back once an epoch has been
    trained on one worker, and again for each further loss once the group of two has trained an
    epoch; check the job log and the MLflow history it leaves. One job for every kind of loss: each
    job costs minutes, most of them the waits for a group to grow back."""
    name = work.name.replace("_", "-")[:40]
    epochs = 2 + EPOCHS_PER_LOSS * len(losses)
    job_id = submit(cluster.job_address, tracking_uri, job_overrides(shards, work, name, epochs, *ELASTIC))
    server = JobServer(cluster.job_address)
    logs = lambda: server.logs(job_id)

    next_epoch = 2  # its line on rank 0 means the epoch before it is committed
    for number, (lose, restore) in enumerate(losses, start=1):
        wait_for(lambda: f"epoch {next_epoch}/" in logs(), f"epoch {next_epoch}", timeout=300)
        assert [len(cluster.training_workers_on(node)) for node in ("a", "b")] == [1, 1]  # one worker per node
        lose()
        # The group restarts on the one node left, without waiting for the lost one, and trains on.
        wait_for(lambda: logs().count("resized from 2 to 1 workers") == number, "an epoch on one worker", timeout=300)
        restore()
        wait_for(lambda: logs().count("resized from 1 to 2 workers") == number, "the group to grow back", timeout=300)
        grown_at = re.findall(r"resized from 1 to 2 workers from epoch (\d+)", logs())[-1]
        next_epoch = int(grown_at) + 1  # the next loss comes once the grown group has trained an epoch
    wait_for(lambda: server.status(job_id).status.value in ("SUCCEEDED", "FAILED", "STOPPED"), "the job's end", timeout=600)
    output = logs()
    (work / "job.log").write_text(output)
    assert server.status(job_id).status.value == "SUCCEEDED", output[-4000:]

    shrinks = re.findall(r"resized from 2 to 1 workers from epoch (\d+) \((.+)\)", output)
    grows = re.findall(r"resized from 1 to 2 workers from epoch (\d+) \(resources are available again\)", output)
    shrunk_at, grown_at = [int(epoch) for epoch, _ in shrinks], [int(epoch) for epoch in grows]
    assert len(shrunk_at) == len(grown_at) == len(losses)
    assert shrunk_at[0] >= 2 and all(a < b for a, b in itertools.pairwise(sorted(shrunk_at + grown_at)))
    assert max(grown_at) <= epochs and all(s < g for s, g in zip(shrunk_at, grown_at))
    assert all(re.match(r"rank [01]: \w+", reason) for _, reason in shrinks)
    # (the reason is what the failed ranks raised: the lost one, or the survivor whose collective broke)

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("elastic").experiment_id], f"attributes.run_name = '{name}'")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch")) == list(range(1, epochs + 1))
    world_sizes = {m.step: int(m.value) for m in client.get_metric_history(run.info.run_id, "world_size")}
    one_worker = lambda epoch: any(s <= epoch < g for s, g in zip(shrunk_at, grown_at))
    assert world_sizes == {epoch: 1 if one_worker(epoch) else 2 for epoch in range(1, epochs + 1)}
    # the step losses go on where they stopped, each epoch with the steps its group ran (global batch kept)
    samples = ShardDataset.open(shards).split("train").samples
    expected = sum(steps_per_epoch(samples, size, BATCH * 2 // size) for size in world_sizes.values())
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "step_loss")) == list(range(1, expected + 1))
    resizes = [(m.step, int(m.value)) for m in client.get_metric_history(run.info.run_id, "resize_to_workers")]
    assert sorted(resizes) == sorted([(epoch, 1) for epoch in shrunk_at] + [(epoch, 2) for epoch in grown_at])
    tags = client.get_run(run.info.run_id).data.tags
    for epoch, reason in shrinks:
        assert tags[f"resize.{epoch}"] == f"2 -> 1 workers: {reason}"
    for epoch in grown_at:
        assert tags[f"resize.{epoch}"] == "1 -> 2 workers: resources are available again"
    assert client.get_model_version_by_alias("ops-test", "champion").run_id == run.info.run_id
    maps = [m.value for m in client.get_metric_history(run.info.run_id, "mAP")]
    print(f"{name}: resized 2 -> 1 at epochs {shrunk_at}, 1 -> 2 at {grown_at}; mAP {maps[0]:.4f} -> {maps[-1]:.4f}")


@pytest.fixture
def namespace():
    """A network namespace for node b, or None where this process may not make one (not root)."""
    if os.geteuid() != 0:
        yield None
        return
    namespace = NetworkNamespace(os.getpid() % 10000)
    namespace.create()
    yield namespace
    namespace.delete()


def test_a_job_loses_a_node_twice_goes_on_with_fewer_workers_and_grows_back(namespace, tiny_shards, tmp_path, monkeypatch):
    """Node b is lost as a machine that dies (all its processes killed at once) and, where a network
    namespace can be made (root), then as a partition (its link cut), which only Ray's health checks
    can tell."""
    if namespace is None:
        warnings.warn("no network namespace (it needs root): node b is only killed, not partitioned", stacklevel=1)
        cluster, tracking, join_b = LocalCluster(tmp_path), MlflowServer(tmp_path), lambda: cluster.add_node("b")
    else:
        # Every address must be routable between the namespace and this side: the head, node a and the
        # tracking server listen on this side's end of the pair, node b inside. Each node's gloo sockets
        # go through its end of the pair (this machine's hostname resolves to an address the namespace lacks).
        monkeypatch.setenv("RAY_AUTH_TOKEN", auth_token() or "")  # the head is not local to the job client now
        cluster, tracking = LocalCluster(tmp_path, host=namespace.host_ip), MlflowServer(tmp_path, host=namespace.host_ip)
        join_b = lambda: cluster.add_node("b", netns=namespace, env={"GLOO_SOCKET_IFNAME": namespace.link})

    def kill():
        cluster.kill_node("b")
        wait_for(lambda: cluster.nodes().get("b") == "DEAD", "the head to declare node b dead", timeout=60)

    def partition():
        namespace.cut()
        cut = time.monotonic()
        wait_for(lambda: cluster.nodes().get("b") == "DEAD", "the head to declare node b dead", timeout=60, interval=0.2)
        detected_s = time.monotonic() - cut
        print(f"partition detected after {detected_s:.1f} s (health checks: at most {DETECTION_LIMIT_S:.0f} s)")
        assert detected_s <= DETECTION_LIMIT_S + 2  # + the state API's own delay

    def heal_and_rejoin():
        namespace.heal()
        cluster.kill_node("b")  # a node the head declared dead does not come back: it is started anew
        join_b()

    try:
        tracking.start()
        cluster.start()
        cluster.add_node("a", env={"GLOO_SOCKET_IFNAME": namespace.host_link} if namespace else None)
        join_b()
        losses = [(kill, join_b)] + ([(partition, heal_and_rejoin)] if namespace else [])
        run_through_node_losses(cluster, tracking.uri, tiny_shards, tmp_path, losses)
    finally:
        cluster.close()
        tracking.kill()
