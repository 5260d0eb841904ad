"""The datastore contract, checked on every backend: etcd (the real etcd 3.4), in memory, and
the Kubernetes API (a real kube-apiserver, tests/kubelib.py; skipped when it is not built).

A backend is a Datastore when all of these hold (docs/design/datastore.md).
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.kubelib import SYSTEM_NAMESPACES, ApiServer, remove_test_objects, unreachable_kubeconfig
from tulle.datastore.base import (
    AlreadyExists,
    AtomicWriter,
    Conflict,
    Datastore,
    DatastoreError,
    NotFound,
    Obj,
    WatchEvent,
    WatchExpired,
)
from tulle.datastore.factory import kubernetes_url, open_datastore
from tulle.datastore.memory import forget_server, memory_server
from tulle.lab.etcd_server import EtcdServer, free_port
from tulle.model.endpoints import WorkloadEndpoint
from tulle.model.kinds import NAMESPACE, NETWORK_POLICY, NODE, POD, WORKLOAD_ENDPOINT
from tulle.model.validation import AdmissionErrors, admit_all


@dataclass
class Backend:
    ds: Datastore
    compact: Callable[[], None]  # forget the history: older watches must list again
    cut_off: Callable[[], Datastore]  # a client of this backend that cannot reach it


def _etcd_compact(server: EtcdServer) -> None:
    parts = urlsplit(server.url)
    assert server.client_tls is not None
    context = ssl.create_default_context(cafile=server.client_tls.ca)
    context.load_cert_chain(server.client_tls.cert, server.client_tls.key)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port or 2379, timeout=5, context=context)
    conn.request("POST", "/v3/kv/range", body=json.dumps({"key": "AA==", "limit": 1}))
    revision = int(json.loads(conn.getresponse().read())["header"]["revision"])
    conn.request("POST", "/v3/kv/compaction", body=json.dumps({"revision": revision, "physical": True}))
    conn.getresponse().read()
    conn.close()


def _no_compaction() -> None:
    pytest.skip(
        "the API server's watch cache serves a version after etcd compacted it: "
        "410 Gone is covered by tests/unit/test_kubernetes_datastore.py"
    )


@pytest.fixture(params=["etcd", "memory", "kubernetes"])
def backend(request: pytest.FixtureRequest, prefix: str, tmp_path: Any) -> Iterator[Backend]:
    if request.param == "kubernetes":
        api: ApiServer = request.getfixturevalue("kube_apiserver")
        kube = open_datastore(kubernetes_url(api.kubeconfig))
        remove_test_objects(kube)
        yield Backend(
            kube,
            _no_compaction,
            lambda: open_datastore(kubernetes_url(unreachable_kubeconfig(api, str(tmp_path))), timeout=1),
        )
        remove_test_objects(kube)
        kube.close()
        return
    if request.param == "etcd":
        server: EtcdServer = request.getfixturevalue("etcd_server")
        ds = open_datastore(server.url, prefix, tls=server.client_tls)
        yield Backend(
            ds,
            lambda: _etcd_compact(server),
            lambda: open_datastore(f"https://127.0.0.1:{free_port()}", prefix, timeout=1, tls=server.client_tls),
        )
        ds.close()
        return
    name = f"contract-{uuid.uuid4().hex[:8]}"
    mem = memory_server(name)

    def cut_off() -> Datastore:
        mem.set_reachable(False)
        return open_datastore(f"memory://{name}")

    yield Backend(open_datastore(f"memory://{name}"), mem.compact, cut_off)
    forget_server(name)


def own_labels(obj: Obj | None) -> dict[str, str]:
    """An object's labels without the one the API server puts on every Namespace."""
    assert obj is not None
    labels = dict(obj["metadata"].get("labels") or {})
    labels.pop("kubernetes.io/metadata.name", None)
    return labels


def ns(name: str, labels: dict[str, str] | None = None) -> Obj:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels or {}}}


def pod(name: str, namespace: str = "web", **labels: str) -> Obj:
    meta = {"name": name, "namespace": namespace, "labels": labels}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }


def test_create_fills_in_identity_and_a_second_create_is_already_exists(backend: Backend) -> None:
    ds = backend.ds
    made = ds.create(ns("web"))
    assert made["metadata"]["uid"] and made["metadata"]["creationTimestamp"] and made["metadata"]["resourceVersion"]
    assert ds.get(NAMESPACE, "web") == made
    with pytest.raises(AlreadyExists):
        ds.create(ns("web"))


def test_of_many_concurrent_creates_of_one_name_exactly_one_succeeds(backend: Backend) -> None:
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def racer(i: int) -> None:
        barrier.wait()
        try:
            backend.ds.create(ns("contested", {"racer": str(i)}))
            wins.append(i)
        except AlreadyExists:
            pass

    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert own_labels(backend.ds.get(NAMESPACE, "contested")) == {"racer": str(wins[0])}


def test_update_is_compare_and_swap_on_the_resource_version(backend: Backend) -> None:
    ds = backend.ds
    first = ds.create(ns("web"))
    first["metadata"]["labels"] = {"v": "1"}
    second = ds.update(first)
    assert second["metadata"]["resourceVersion"] != first["metadata"]["resourceVersion"]
    assert second["metadata"]["uid"] == first["metadata"]["uid"]
    first["metadata"]["labels"] = {"v": "stale"}
    with pytest.raises(Conflict):
        ds.update(first)  # written at a version that moved on
    assert own_labels(ds.get(NAMESPACE, "web")) == {"v": "1"}


def test_update_without_a_version_replaces_but_keeps_identity_and_needs_the_object(backend: Backend) -> None:
    ds = backend.ds
    made = ds.create(ns("web"))
    blind = ns("web", {"v": "2"})
    stored = ds.update(blind)
    assert stored["metadata"]["uid"] == made["metadata"]["uid"]
    assert stored["metadata"]["creationTimestamp"] == made["metadata"]["creationTimestamp"]
    assert own_labels(ds.get(NAMESPACE, "web")) == {"v": "2"}
    with pytest.raises(NotFound):
        ds.update(ns("absent"))


def test_delete_with_a_version_is_compare_and_swap_and_a_missing_object_is_false(backend: Backend) -> None:
    ds = backend.ds
    made = ds.create(pod("a"))  # a Pod, not a Namespace: the API server deletes a Pod at once
    made["metadata"]["labels"] = {"v": "1"}
    moved = ds.update(made)
    with pytest.raises(Conflict):
        ds.delete(POD, "a", "web", resource_version=made["metadata"]["resourceVersion"])
    assert ds.delete(POD, "a", "web", resource_version=moved["metadata"]["resourceVersion"])
    assert ds.get(POD, "a", "web") is None
    assert not ds.delete(POD, "a", "web")


def test_list_by_kind_and_namespace(backend: Backend) -> None:
    ds = backend.ds
    for name, where in (("a", "web"), ("b", "web"), ("c", "db")):
        ds.create(pod(name, where))
    ds.create(ns("web"))
    assert sorted(p["metadata"]["name"] for p in ds.list(POD)[0]) == ["a", "b", "c"]
    assert sorted(p["metadata"]["name"] for p in ds.list(POD, "web")[0]) == ["a", "b"]
    assert [n["metadata"]["name"] for n in ds.list(NAMESPACE)[0] if n["metadata"]["name"] not in SYSTEM_NAMESPACES] == [
        "web"
    ]
    assert ds.list(NODE)[0] == []


def _marked_for_deletion(event: WatchEvent) -> bool:
    """The API server may mark a Pod deleted (deletionTimestamp, MODIFIED) before it removes it."""
    return event.type == "MODIFIED" and bool(event.object["metadata"].get("deletionTimestamp"))


def _drain(watch: Any, count: int, timeout: float = 10.0) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    deadline = time.monotonic() + timeout
    while len(out) < count and time.monotonic() < deadline:
        event = watch.get(timeout=0.5)
        if event is not None and not _marked_for_deletion(event):
            out.append(event)
    return out


def test_watch_from_the_listed_version_says_added_modified_deleted_in_order(backend: Backend) -> None:
    ds = backend.ds
    ds.create(pod("before"))
    _, version = ds.list(POD)
    watch = ds.watch(POD, version)
    try:
        made = ds.create(pod("a"))
        made["metadata"]["labels"] = {"v": "1"}
        ds.update(made)
        ds.create(ns("not-a-pod"))
        ds.delete(POD, "a", "web")
        events = _drain(watch, 3)
    finally:
        watch.cancel()
    assert [(e.type, e.object["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("MODIFIED", "a"),
        ("DELETED", "a"),
    ]
    assert events[2].object["metadata"]["labels"] == {"v": "1"}  # a delete says what was deleted
    versions = [int(e.resource_version) for e in events]
    assert versions == sorted(versions) and int(version) < versions[0]


def test_list_then_watch_misses_nothing_while_another_writer_writes(backend: Backend) -> None:
    """The informer's promise: state from a list plus the events after it equals the store."""
    ds = backend.ds
    stop = threading.Event()

    def writer() -> None:
        i = 0
        while not stop.is_set() and i < 300:
            obj = ds.create(pod(f"p{i}", app=str(i)))
            if i % 3 == 0:
                ds.delete(POD, obj["metadata"]["name"], "web")
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    time.sleep(0.05)
    listed, version = ds.list(POD)
    seen = {p["metadata"]["name"]: p for p in listed}
    watch = ds.watch(POD, version)
    try:
        thread.join()
        stop.set()
        final, _ = ds.list(POD)
        while True:
            event = watch.get(timeout=1.0)
            if event is None:
                break
            if event.type == "DELETED":
                seen.pop(event.object["metadata"]["name"], None)
            else:
                seen[event.object["metadata"]["name"]] = event.object
    finally:
        stop.set()
        watch.cancel()
    assert {n: p["metadata"]["resourceVersion"] for n, p in seen.items()} == {
        p["metadata"]["name"]: p["metadata"]["resourceVersion"] for p in final
    }


def test_a_watch_from_a_forgotten_version_is_expired(backend: Backend) -> None:
    ds = backend.ds
    _, version = ds.list(POD)
    for i in range(3):
        ds.create(pod(f"p{i}"))
    backend.compact()
    watch = ds.watch(POD, version)
    try:
        with pytest.raises(WatchExpired):
            for _ in range(20):
                watch.get(timeout=0.5)
    finally:
        watch.cancel()


def test_a_heartbeat_is_live_until_its_ttl_passes_without_renewal(backend: Backend) -> None:
    ds = backend.ds
    beat = ds.heartbeat("node1", ttl=2)
    beat.start()
    assert set(ds.live_nodes()) == {"node1"}
    assert beat.renew() is False
    deadline = time.monotonic() + 10
    while "node1" in ds.live_nodes() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "node1" not in ds.live_nodes()
    assert beat.renew() is True  # expired: begun again
    assert set(ds.live_nodes()) == {"node1"}


def test_a_restarted_agents_heartbeat_replaces_the_earlier_one(backend: Backend) -> None:
    ds = backend.ds
    ds.heartbeat("node1", ttl=30).start()
    later = ds.heartbeat("node1", ttl=30)
    later.start()
    assert list(ds.live_nodes()) == ["node1"]
    assert later.renew() is False


def test_an_unreachable_datastore_raises_datastore_error_and_says_since_when(backend: Backend) -> None:
    away = backend.cut_off()
    assert away.reachability.reachable
    before = time.time()
    with pytest.raises(DatastoreError):
        away.get(NAMESPACE, "web")
    state = away.reachability
    assert not state.reachable and before - 1 <= state.since <= time.time()
    assert "unreachable since" in state.describe()


def test_apply_many_writes_all_or_nothing(backend: Backend) -> None:
    ds = backend.ds
    assert isinstance(ds, AtomicWriter)
    bad = pod("a", "nowhere")  # its namespace does not exist: admission refuses it
    with pytest.raises(AdmissionErrors):
        ds.apply_many([ns("web"), bad], admit=admit_all)
    assert ds.get(NAMESPACE, "web") is None
    applied = ds.apply_many([ns("web"), pod("a")], admit=admit_all)
    assert [verdict for _, verdict in applied] == ["created", "created"]
    again = ds.apply_many([ns("web"), pod("a")], admit=admit_all)
    assert [verdict for _, verdict in again] == ["unchanged", "unchanged"]


def test_delete_namespace_takes_its_pods_policies_and_endpoints_with_it(backend: Backend) -> None:
    ds = backend.ds
    assert isinstance(ds, AtomicWriter)
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p", "namespace": "web"},
        "spec": {"podSelector": {}},
    }
    ds.apply_many([ns("web"), ns("db"), pod("a"), pod("b", "db"), policy], admit=admit_all)
    for namespace in ("web", "db"):  # written by an agent, as the Namespace controller finds them
        ds.create(WorkloadEndpoint(namespace, "a", "node1", "tulle", "c1", "eth0", ("10.0.0.1",)).to_object())
    assert ds.delete_namespace("web")
    assert ds.list(POD, "web")[0] == [] and ds.list(NETWORK_POLICY, "web")[0] == []
    assert ds.list(WORKLOAD_ENDPOINT, "web")[0] == []
    assert [p["metadata"]["name"] for p in ds.list(POD)[0]] == ["b"]
    assert [e["metadata"]["namespace"] for e in ds.list(WORKLOAD_ENDPOINT)[0]] == ["db"]
    assert not ds.delete_namespace("web")
