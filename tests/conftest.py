"""Shared fixtures: a tiny synthetic Market-1501 tree and its shards, made once per session.

Session fixtures are read-only: a test that changes files or a store works on its own copy. The
suite passes in any order; ``pytest --reverse`` runs it backwards to show it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reid_platform.data.manifest import ShardDataset
from reid_platform.data.pack import PackOptions, pack_dataset
from reid_platform.data.synth import write_synthetic_market1501
from tests.object_store import S3Server
from tests.services import MlflowServer


def pytest_addoption(parser):
    parser.addoption("--reverse", action="store_true", help="run the tests in reverse order")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--reverse"):
        items.reverse()


@pytest.fixture(scope="session")
def tiny_market(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("market")
    write_synthetic_market1501(root, identities=16, cameras=3, seed=3, train_images_per_identity=12, progress=False)
    return root


@pytest.fixture(scope="session")
def tiny_shards(tiny_market, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "tiny"
    pack_dataset([("market1501", tiny_market)], out, PackOptions(samples_per_shard=40, workers=1), progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_dataset(tiny_shards) -> ShardDataset:
    """The tiny shards, opened (read-only: a test that changes files works on its own copy)."""
    return ShardDataset.open(tiny_shards)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory) -> MlflowServer:
    """A real tracking server (`reid mlflow serve`, SQLite and a local artifact store) per module."""
    server = MlflowServer(tmp_path_factory.mktemp("mlflow"))
    try:
        server.start()
        yield server
    finally:
        server.kill()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> S3Server:
    """A real S3 API server (moto's, authentication on) for the whole session."""
    server = S3Server(tmp_path_factory.mktemp("s3")).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket, with this process's AWS environment pointing at the server (and at nothing else
    a developer's machine has configured)."""
    for name in [name for name in os.environ if name.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in s3_server.environment().items():
        monkeypatch.setenv(name, value)
    return s3_server.new_bucket()
