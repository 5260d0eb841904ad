"""Shared fixtures: a real etcd server on loopback, and per-test datastore prefixes."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from tulle.datastore.base import Datastore
from tulle.datastore.factory import open_datastore
from tulle.lab.etcd_server import EtcdServer, free_port, start_etcd, stop_pid

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CNI_BIN_DIR = os.path.join(REPO, "bin", "cni")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, nftables)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def etcd_server() -> Iterator[EtcdServer]:
    """One real etcd for the whole session, on loopback; tests keep apart by key prefix."""
    work = tempfile.mkdtemp(prefix="tulle-test-etcd-")
    server = start_etcd(
        data_dir=os.path.join(work, "data"),
        client_host="127.0.0.1",
        client_port=free_port(),
        peer_port=free_port(),
        log_path=os.path.join(work, "etcd.log"),
    )
    try:
        yield server
    finally:
        stop_pid(server.pid)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing one etcd never see each other's keys."""
    return f"/test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(etcd_server: EtcdServer, prefix: str) -> Iterator[Datastore]:
    """The session's etcd, under this test's own prefix."""
    ds = open_datastore(etcd_server.url, prefix)
    yield ds
    ds.close()
