"""Shared fixtures: a real etcd server on loopback, over TLS with client certificates (a test CA
of its own), and per-test datastore prefixes."""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator

import pytest

from tests.certlib import start_tls_etcd
from tests.kubelib import ApiServer, missing_binaries, start_apiserver
from tulle.datastore.base import Datastore
from tulle.datastore.factory import kubernetes_url, open_datastore
from tulle.lab import pki
from tulle.lab.etcd_server import EtcdServer, stop_pid

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
def session_ca() -> Iterator[pki.Authority]:
    """The CA of the session's etcd: it signed etcd's certificate and the clients' (tests issue more)."""
    work = tempfile.mkdtemp(prefix="tulle-test-ca-")
    try:
        yield pki.make_authority(os.path.join(work, "pki"), "tulle test CA")
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def etcd_server(session_ca: pki.Authority) -> Iterator[EtcdServer]:
    """One real etcd for the whole session, on loopback, over TLS: it accepts only clients with
    a certificate of the session's CA, so every test that uses it exercises the TLS client
    (`etcd_server.client_tls`). The `tulle` command finds the files in $TULLE_DATASTORE_CA,
    _CERT and _KEY, set for the session as a user would set them. Tests keep apart by key prefix."""
    work = tempfile.mkdtemp(prefix="tulle-test-etcd-")
    client_tls = pki.client_files(session_ca, os.path.join(work, "client"), "/O=tulle/OU=tests")
    server, _ = start_tls_etcd(session_ca, work, "/O=tulle/OU=test etcd", client_tls)
    env = {
        "TULLE_DATASTORE_CA": client_tls.ca,
        "TULLE_DATASTORE_CERT": client_tls.cert,
        "TULLE_DATASTORE_KEY": client_tls.key,
    }
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield server
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        stop_pid(server.pid)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def kube_apiserver(session_ca: pki.Authority, etcd_server: EtcdServer) -> Iterator[ApiServer]:
    """One real kube-apiserver for the session, on loopback, over the session's etcd (a key
    prefix of its own), with Tulle's CRDs installed; `kube_apiserver.kubeconfig` is an admin's.
    Skipped when the upstream binaries are not built (scripts/build-kubernetes)."""
    from tulle.datastore.kubernetes import KubernetesDatastore, install_crds

    reason = missing_binaries()
    if reason:
        pytest.skip(reason)
    work = tempfile.mkdtemp(prefix="tulle-test-kube-")
    server = start_apiserver(session_ca, etcd_server, work)
    try:
        store = open_datastore(kubernetes_url(server.kubeconfig))
        assert isinstance(store, KubernetesDatastore)
        install_crds(store)
        store.close()
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
    ds = open_datastore(etcd_server.url, prefix, tls=etcd_server.client_tls)
    yield ds
    ds.close()
