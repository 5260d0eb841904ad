"""The Kubernetes API backend beyond the shared contract (tests/unit/test_datastore_contract.py
runs that on it too): the API server's schema refuses malformed objects of Tulle's kinds, block
claims race as on etcd, a watch from a version too old is expired, and a watch whose API server
goes away resumes from where it was without missing a change. A real kube-apiserver each time
(tests/kubelib.py); skipped when the upstream binaries are not built."""

from __future__ import annotations

import multiprocessing
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator

import pytest

from tests.kubelib import ApiServer, remove_test_objects, restart_apiserver, start_apiserver
from tests.unit.test_ipam import _claim
from tulle.agent.informers import Informer
from tulle.cli.main import main
from tulle.datastore.base import Datastore, Obj, WatchEvent, WatchExpired
from tulle.datastore.factory import kubernetes_url, open_datastore
from tulle.datastore.kubernetes import KubernetesWatch, RefusedByApiServer, crd_documents
from tulle.ipam.allocator import list_blocks
from tulle.lab import pki
from tulle.lab.etcd_server import EtcdServer, stop_pid
from tulle.model.kinds import IP_POOL, IPAM_BLOCK, POD, WORKLOAD_ENDPOINT
from tulle.model.pools import pool_object


@pytest.fixture
def kube(kube_apiserver: ApiServer) -> Iterator[Datastore]:
    store = open_datastore(kubernetes_url(kube_apiserver.kubeconfig))
    remove_test_objects(store)
    yield store
    remove_test_objects(store)
    store.close()


def pod(name: str, namespace: str = "web") -> dict[str, object]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }


def test_every_crd_names_a_kind_tulle_stores_with_a_structural_schema() -> None:
    kinds = {(doc["spec"]["names"]["kind"], doc["spec"]["group"]) for doc in crd_documents()}
    assert kinds == {(k.kind, k.api_version.split("/")[0]) for k in (IP_POOL, IPAM_BLOCK, WORKLOAD_ENDPOINT)}
    for doc in crd_documents():
        [version] = doc["spec"]["versions"]
        assert version["schema"]["openAPIV3Schema"]["properties"]["spec"]["type"] == "object"


@pytest.mark.parametrize(
    "spec",
    [{}, {"cidr": 10}, {"cidr": "10.0.0.0/16", "blockSize": "26"}, {"cidr": "10.0.0.0/16", "blockSize": 200}],
    ids=["no-cidr", "cidr-not-a-string", "block-size-not-a-number", "block-size-out-of-range"],
)
def test_a_malformed_ippool_is_refused_by_the_api_servers_schema(kube: Datastore, spec: dict[str, object]) -> None:
    bad = pool_object("bad", "10.0.0.0/16")
    bad["spec"] = spec
    with pytest.raises(RefusedByApiServer, match=r'IPPool\.tulle\.dev "bad" is invalid'):
        kube.create(bad)
    assert kube.get(IP_POOL, "bad") is None
    assert kube.create(pool_object("good", "10.0.0.0/16", 26))["spec"] == {"cidr": "10.0.0.0/16", "blockSize": 26}


def test_an_unknown_field_of_an_ippool_is_dropped_by_the_schema(kube: Datastore) -> None:
    odd = pool_object("odd", "10.1.0.0/16")
    odd["spec"]["natOutgoing"] = True  # not in the schema: pruned, as the API server prunes
    assert kube.create(odd)["spec"] == {"cidr": "10.1.0.0/16"}


def test_n_blocks_and_n_plus_one_agents_behind_a_barrier_on_the_api_server(
    kube: Datastore, kube_apiserver: ApiServer
) -> None:
    """IPAM invariant 1 on the Kubernetes API: 4 blocks, 5 agents claiming at the same moment
    (each its own process and client), compare-and-swap by resourceVersion: exactly 4 win."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(5)
    out = ctx.Queue()
    url = kubernetes_url(kube_apiserver.kubeconfig)
    procs = [ctx.Process(target=_claim, args=(url, None, "/", f"n{i}", barrier, out)) for i in range(5)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    blocks = [v for v in results.values() if not v.startswith("error")]
    failures = [v for v in results.values() if v.startswith("error")]
    assert sorted(blocks) == ["10.15.0.0/26", "10.15.0.128/26", "10.15.0.192/26", "10.15.0.64/26"]
    assert len(failures) == 1 and "all 4 blocks of p" in failures[0]
    assert len({b.node for b in list_blocks(kube)}) == 4


def test_a_cut_watch_stream_resumes_from_the_last_version_it_saw(kube: Datastore) -> None:
    _, version = kube.list(POD)
    watch = kube.watch(POD, version)
    assert isinstance(watch, KubernetesWatch)
    try:
        kube.create(pod("before"))
        assert _names_until(watch, [("ADDED", "before")], 20) == [("ADDED", "before")]
        watch.cut()  # as a proxy or a load balancer that drops the connection would
        kube.create(pod("during"))
        kube.delete(POD, "before", "web")
        expected = [("ADDED", "during"), ("DELETED", "before")]
        assert _names_until(watch, expected, 20) == expected
    finally:
        watch.cancel()


@pytest.fixture
def second_apiserver(
    session_ca: pki.Authority, etcd_server: EtcdServer, kube_apiserver: ApiServer
) -> Iterator[ApiServer]:
    """Another API server on the same objects (the session's etcd prefix), as in an HA cluster:
    this one can be stopped while writes go on through the first."""
    work = tempfile.mkdtemp(prefix="tulle-test-kube2-")
    server = start_apiserver(session_ca, etcd_server, work, etcd_prefix=kube_apiserver.etcd_prefix)
    try:
        yield server
    finally:
        stop_pid(server.pid)
        shutil.rmtree(work, ignore_errors=True)


def _names_until(watch: object, wanted: list[tuple[str, str]], timeout: float) -> list[tuple[str, str]]:
    seen: list[tuple[str, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and seen[-len(wanted) :] != wanted:
        event: WatchEvent | None = watch.get(timeout=0.5)  # type: ignore[attr-defined]
        if event is not None and not (event.type == "MODIFIED" and event.object["metadata"].get("deletionTimestamp")):
            seen.append((event.type, event.object["metadata"]["name"]))
    return seen


def test_a_watch_resumed_before_the_restarted_api_servers_cache_is_expired_410_gone(
    kube: Datastore, second_apiserver: ApiServer
) -> None:
    """A restarted API server's watch cache begins at the version it started at: a watch that
    resumes from before it gets 410 Gone, which the interface says as WatchExpired (list again).
    (A watch from a version older than a cache that never dropped an event is served instead,
    as ADDED events of what is there: only a list is the truth.)"""
    watcher = open_datastore(kubernetes_url(second_apiserver.kubeconfig))
    _, version = watcher.list(POD)
    watch = watcher.watch(POD, version)
    try:
        stop_pid(second_apiserver.pid)
        kube.create(pod("while-it-was-down"))
        restart_apiserver(second_apiserver)
        with pytest.raises(WatchExpired, match="too old resource version"):
            for _ in range(60):
                watch.get(timeout=0.5)
    finally:
        watch.cancel()
        watcher.close()


def test_an_informer_whose_api_server_went_away_misses_no_change_made_meanwhile(
    kube: Datastore, second_apiserver: ApiServer
) -> None:
    """Writes made while the informer's API server is down (through another) are all applied
    once it is back: its watch opens again from the last version it saw, with backoff and
    jitter, and, as the restarted server's watch cache begins after that version (410 Gone),
    the informer lists again and hears exactly the differences."""
    watcher = open_datastore(kubernetes_url(second_apiserver.kubeconfig))
    heard: list[tuple[str, str]] = []
    informer: Informer[Obj] = Informer(watcher, POD, lambda obj: obj)
    informer.add_handler(lambda key, old, new: heard.append(("DELETED" if new is None else "SET", key)))
    informer.start()
    try:
        assert informer.wait_synced(20)
        kube.create(pod("before"))
        kube.create(pod("stays"))
        _wait_for(lambda: informer.get("web/stays") is not None, 20)
        stop_pid(second_apiserver.pid)
        kube.create(pod("during"))
        kube.delete(POD, "before", "web")
        time.sleep(1.0)  # let the watch find its server gone and back off
        assert not watcher.reachability.reachable
        heard.clear()
        restart_apiserver(second_apiserver)
        _wait_for(lambda: informer.get("web/during") is not None and informer.get("web/before") is None, 60)
        assert sorted(heard) == [("DELETED", "web/before"), ("SET", "web/during")]
        assert sorted(informer.items()[i][0] for i in range(len(informer.items()))) == ["web/during", "web/stays"]
        assert watcher.reachability.reachable
    finally:
        informer.stop()
        watcher.close()


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_tulle_get_reads_the_api_server_of_a_kubeconfig(
    kube: Datastore, kube_apiserver: ApiServer, capsys: pytest.CaptureFixture[str]
) -> None:
    kube.create(pool_object("v4", "10.244.0.0/16", 26))
    with pytest.raises(SystemExit) as info:
        main(["get", "ippools", "--kubeconfig", kube_apiserver.kubeconfig])
    out, err = capsys.readouterr()
    assert info.value.code in (0, None), err
    assert "v4" in out and "10.244.0.0/16" in out
