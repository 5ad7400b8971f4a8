"""Elastic training across Ray nodes: a job on [1, 2] workers loses a node mid-epoch, goes on with
one worker without waiting for it, and grows back to two when the node returns.

The clusters (tests/services.py) have a head without CPUs and two worker nodes of one CPU each, so
the two training workers of the full group run on different nodes. The node is lost in two ways: all
its processes killed at once, as a machine that dies; or, with the node inside a network namespace,
its link cut, as a partition, which only Ray's health checks can tell.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from reid_platform.cluster.jobs import JobServer
from reid_platform.cluster.local import auth_token
from reid_platform.data.manifest import ShardDataset
from reid_platform.input.partition import steps_per_epoch
from tests.services import (
    BATCH,
    FAST_HEALTH_CHECK,
    LocalCluster,
    MlflowServer,
    NetworkNamespace,
    job_overrides,
    submit,
    wait_for,
)  # fmt: skip

# Growing back takes about a minute from the node's restart (its `ray start`, Ray's resize check, a
# new group of two starting and loading the checkpoint): the one-worker phase must outlast it, so the
# job has many epochs of demo-sized crops (about 5 s each on one worker), where the other Ray tests
# use 64x32.
EPOCHS = 14
# a group of the old size, tried while the lost node still looks alive, gives up after 20 s instead of 60
ELASTIC = ("input.height=128", "input.width=64", "scaling.num_workers=[1,2]", "scaling.resize_interval_s=2", "scaling.start_timeout_s=20", "tracking.experiment=elastic")
# the longest Ray's health checks may take to declare a silent node dead, with FAST_HEALTH_CHECK
DETECTION_LIMIT_S = int(FAST_HEALTH_CHECK["RAY_health_check_failure_threshold"]) * (
    int(FAST_HEALTH_CHECK["RAY_health_check_period_ms"]) + int(FAST_HEALTH_CHECK["RAY_health_check_timeout_ms"])
) / 1000
pytestmark = pytest.mark.ray


def run_through_a_node_loss(
    cluster: LocalCluster, tracking_uri: str, shards: Path, work: Path, lose: Callable[[], None],
    restore: Callable[[], None],
) -> None:
    """Submit an elastic job, lose node b in epoch 2 or 3, restore it once an epoch has been trained
    on one worker; check the job log and the MLflow history it leaves."""
    name = work.name.replace("_", "-")[:40]
    job_id = submit(cluster.job_address, tracking_uri, job_overrides(shards, work, name, EPOCHS, *ELASTIC))
    server = JobServer(cluster.job_address)
    logs = lambda: server.logs(job_id)

    # Epoch 2's line on rank 0 means epoch 1's checkpoint is committed.
    wait_for(lambda: "epoch 2/" in logs(), "epoch 2", timeout=300)
    assert [len(cluster.training_workers_on(node)) for node in ("a", "b")] == [1, 1]  # one worker per node
    lose()
    # The group restarts on the one node left, without waiting for the lost one, and trains on.
    wait_for(lambda: "resized from 2 to 1 workers" in logs(), "an epoch on one worker", timeout=300)
    restore()
    wait_for(lambda: "resized from 1 to 2 workers" in logs(), "the group to grow back", timeout=300)
    wait_for(lambda: server.status(job_id).status.value in ("SUCCEEDED", "FAILED", "STOPPED"), "the job's end", timeout=600)
    output = logs()
    (work / "job.log").write_text(output)
    assert server.status(job_id).status.value == "SUCCEEDED", output[-4000:]

    shrink = re.search(r"resized from 2 to 1 workers from epoch (\d+) \((.+)\)", output)
    grow = re.search(r"resized from 1 to 2 workers from epoch (\d+) \(resources are available again\)", output)
    shrunk_at, grown_at = int(shrink.group(1)), int(grow.group(1))
    assert 2 <= shrunk_at < grown_at <= EPOCHS and re.match(r"rank [01]: \w+", shrink.group(2))
    # (the reason is what the failed ranks raised: the lost one, or the survivor whose collective broke)

    client = MlflowClient(tracking_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("elastic").experiment_id], f"attributes.run_name = '{name}'")
    assert run.info.status == "FINISHED"
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "epoch")) == list(range(1, EPOCHS + 1))
    world_sizes = {m.step: int(m.value) for m in client.get_metric_history(run.info.run_id, "world_size")}
    assert world_sizes == {epoch: 1 if shrunk_at <= epoch < grown_at else 2 for epoch in range(1, EPOCHS + 1)}
    # the step losses go on where they stopped, each epoch with the steps its group ran (global batch kept)
    samples = ShardDataset.open(shards).split("train").samples
    expected = sum(steps_per_epoch(samples, size, BATCH * 2 // size) for size in world_sizes.values())
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "step_loss")) == list(range(1, expected + 1))
    resizes = [(m.step, int(m.value)) for m in client.get_metric_history(run.info.run_id, "resize_to_workers")]
    assert sorted(resizes) == [(shrunk_at, 1), (grown_at, 2)]
    tags = client.get_run(run.info.run_id).data.tags
    assert tags[f"resize.{shrunk_at}"] == f"2 -> 1 workers: {shrink.group(2)}"
    assert tags[f"resize.{grown_at}"] == "1 -> 2 workers: resources are available again"
    assert client.get_model_version_by_alias("ops-test", "champion").run_id == run.info.run_id
    maps = [m.value for m in client.get_metric_history(run.info.run_id, "mAP")]
    print(f"{name}: resized 2 -> 1 at epoch {shrunk_at}, 1 -> 2 at {grown_at}; mAP {maps[0]:.4f} -> {maps[-1]:.4f}")


@pytest.fixture
def cluster(tmp_path):
    cluster = LocalCluster(tmp_path)
    try:
        cluster.start()
        cluster.add_node("a")
        cluster.add_node("b")
        yield cluster
    finally:
        cluster.close()


def test_a_job_loses_a_node_goes_on_with_fewer_workers_and_grows_back(cluster, mlflow_server, tiny_shards, tmp_path):
    def lose():
        cluster.kill_node("b")
        wait_for(lambda: cluster.nodes().get("b") == "DEAD", "the head to declare node b dead", timeout=60)

    run_through_a_node_loss(cluster, mlflow_server.uri, tiny_shards, tmp_path, lose, lambda: cluster.add_node("b"))


@pytest.fixture
def namespace():
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    namespace = NetworkNamespace(os.getpid() % 10000)
    namespace.create()
    yield namespace
    namespace.delete()


def test_a_partitioned_node_is_detected_and_handled_as_a_lost_one(namespace, tiny_shards, tmp_path, monkeypatch):
    # Every address must be routable between the namespace and this side: the head, node a and the
    # tracking server listen on this side's end of the pair, node b inside. Each node's gloo sockets
    # go through its end of the pair (this machine's hostname resolves to an address the namespace lacks).
    monkeypatch.setenv("RAY_AUTH_TOKEN", auth_token() or "")  # the head is not local to the job client now
    cluster = LocalCluster(tmp_path, host=namespace.host_ip)
    tracking = MlflowServer(tmp_path, host=namespace.host_ip)
    try:
        tracking.start()
        cluster.start()
        cluster.add_node("a", env={"GLOO_SOCKET_IFNAME": namespace.host_link})
        join_b = lambda: cluster.add_node("b", netns=namespace, env={"GLOO_SOCKET_IFNAME": namespace.link})
        join_b()

        def lose():
            namespace.cut()
            cut = time.monotonic()
            wait_for(lambda: cluster.nodes().get("b") == "DEAD", "the head to declare node b dead", timeout=60, interval=0.2)
            detected_s = time.monotonic() - cut
            print(f"partition detected after {detected_s:.1f} s (health checks: at most {DETECTION_LIMIT_S:.0f} s)")
            assert detected_s <= DETECTION_LIMIT_S + 2  # + the state API's own delay

        def restore():
            namespace.heal()
            cluster.kill_node("b")  # a node the head declared dead does not come back: it is started anew
            join_b()

        run_through_a_node_loss(cluster, tracking.uri, tiny_shards, tmp_path, lose, restore)
    finally:
        cluster.close()
        tracking.kill()
