"""The etcd client under the etcd backend: its transactions hold all or nothing and refuse
what etcd would refuse with a bare "Bad Request"."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tulle.datastore.base import DatastoreError
from tulle.datastore.etcd_client import (
    GRPC_NOT_FOUND,
    MAX_TXN_OPS,
    DeleteOp,
    EtcdClient,
    EtcdRefused,
    PutOp,
    UnchangedOp,
)
from tulle.lab.etcd_server import EtcdServer


@pytest.fixture
def datastore(etcd_server: EtcdServer) -> Iterator[EtcdClient]:
    client = EtcdClient(etcd_server.url, tls=etcd_server.client_tls)
    yield client
    client.close()


def test_commit_writes_all_or_nothing(datastore: EtcdClient, prefix: str) -> None:
    assert datastore.commit([PutOp(f"{prefix}/a", b"1", expected_revision=0), PutOp(f"{prefix}/b", b"2")])
    a = datastore.get(f"{prefix}/a")
    assert a is not None
    # the second op expects "/a" not to exist: nothing is written
    failed = datastore.commit([PutOp(f"{prefix}/c", b"3"), PutOp(f"{prefix}/a", b"x", expected_revision=0)])
    assert failed is None
    assert datastore.get(f"{prefix}/c") is None
    revision = datastore.commit([PutOp(f"{prefix}/a", b"y", expected_revision=a.mod_revision)])
    assert revision is not None
    assert datastore.get(f"{prefix}/a").mod_revision == revision  # type: ignore[union-attr]


def test_commit_prefix_guards_and_deletes(datastore: EtcdClient, prefix: str) -> None:
    _, revision = datastore.list(f"{prefix}/pools/")
    assert datastore.commit([UnchangedOp(f"{prefix}/pools/", revision, prefix=True)]) is not None
    datastore.put(f"{prefix}/pools/x", b"1")
    assert datastore.commit([UnchangedOp(f"{prefix}/pools/", revision, prefix=True)]) is None
    assert datastore.commit([UnchangedOp(f"{prefix}/missing", 0)]) is not None
    datastore.put(f"{prefix}/pools/y", b"1")
    assert datastore.commit([DeleteOp(f"{prefix}/pools/", prefix=True)]) is not None
    assert datastore.list(f"{prefix}/pools/")[0] == []


def test_commit_refuses_what_etcd_would_refuse_with_a_bare_bad_request(datastore: EtcdClient, prefix: str) -> None:
    with pytest.raises(ValueError, match="twice"):
        datastore.commit([PutOp(f"{prefix}/a", b"1"), DeleteOp(f"{prefix}/a")])
    with pytest.raises(DatastoreError, match="at most 128"):
        datastore.commit([PutOp(f"{prefix}/k{i}", b"1") for i in range(MAX_TXN_OPS + 1)])
    assert datastore.list(f"{prefix}/")[0] == []


def test_revoking_a_lease_that_is_gone_is_not_an_error(datastore: EtcdClient) -> None:
    lease = datastore.grant_lease(60)
    datastore.revoke_lease(lease)
    datastore.revoke_lease(lease)  # etcd answers NotFound: revoked is what was asked for
    with pytest.raises(EtcdRefused) as refused:
        datastore._post("kv/lease/revoke", {"ID": lease})
    assert (refused.value.http_status, refused.value.grpc_code) == (404, GRPC_NOT_FOUND)
