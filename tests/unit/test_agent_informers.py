"""Informers and the controller work queue, without root, on the in-memory datastore.

Invariants (docs/design/agent.md):
- an informer's values equal the datastore's after any sequence of changes, broken watches,
  expired versions and outages; handlers hear of each difference once;
- a burst of enqueues for one key is one sync; a failing sync is tried again.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lablib import wait_until
from tulle.agent.controller import FULL, Controller
from tulle.agent.informers import Informer
from tulle.datastore.base import Datastore, Obj
from tulle.datastore.factory import open_datastore
from tulle.datastore.memory import MemoryServer, forget_server, memory_server
from tulle.model.kinds import NAMESPACE, POD


@pytest.fixture
def server() -> Iterator[MemoryServer]:
    name = f"inf-{uuid.uuid4().hex[:8]}"
    yield memory_server(name)
    forget_server(name)


@pytest.fixture
def ds(server: MemoryServer) -> Datastore:
    return open_datastore(f"memory://{server.name}")


def pod(name: str, node: str = "n1", namespace: str = "web") -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node},
    }


def node_of(obj: Obj) -> str:
    if obj["metadata"]["name"].startswith("bad"):
        raise ValueError("unreadable")
    return str(obj["spec"]["nodeName"])


class Recorder:
    def __init__(self) -> None:
        self.changes: list[tuple[str, Any, Any]] = []

    def __call__(self, key: str, old: Any, new: Any) -> None:
        self.changes.append((key, old, new))


@pytest.fixture
def pods(ds: Datastore) -> Iterator[Informer[str]]:
    informer: Informer[str] = Informer(ds, POD, node_of)
    informer.add_index("node", lambda node: [node])
    yield informer
    informer.stop()


def test_an_informer_decodes_once_indexes_and_tells_its_handlers(ds: Datastore, pods: Informer[str]) -> None:
    ds.create(pod("a", "n1"))
    seen = Recorder()
    pods.add_handler(seen)
    pods.start()
    assert pods.wait_synced(5)
    assert seen.changes == [("web/a", None, "n1")]
    ds.create(pod("b", "n2"))
    moved = ds.get(POD, "a", "web")
    assert moved is not None
    moved["spec"]["nodeName"] = "n2"
    ds.update(moved)
    ds.delete(POD, "b", "web")
    assert wait_until(lambda: len(seen.changes) == 4)
    assert seen.changes[1:] == [("web/b", None, "n2"), ("web/a", "n1", "n2"), ("web/b", "n2", None)]
    assert pods.by_index("node", "n2") == ["n2"] and pods.by_index("node", "n1") == []


def test_an_update_that_changes_nothing_the_reader_uses_is_not_a_change(ds: Datastore, pods: Informer[str]) -> None:
    ds.create(pod("a"))
    seen = Recorder()
    pods.add_handler(seen)
    pods.start()
    assert pods.wait_synced(5)
    obj = ds.get(POD, "a", "web")
    assert obj is not None
    obj["metadata"]["labels"] = {"x": "y"}  # the decoded value (the node) stays the same
    ds.update(obj)
    ds.create(pod("z"))
    assert wait_until(lambda: len(seen.changes) == 2)
    assert [c[0] for c in seen.changes] == ["web/a", "web/z"]


def test_a_malformed_object_is_absent_and_stops_nothing(ds: Datastore, pods: Informer[str]) -> None:
    ds.create(pod("bad1"))
    pods.start()
    assert pods.wait_synced(5)
    ds.create(pod("good"))
    assert wait_until(lambda: pods.get("web/good") == "n1")
    assert pods.get("web/bad1") is None


@pytest.mark.parametrize("fault", ["cut", "compact", "outage"])
def test_after_a_broken_watch_the_informer_lists_again_and_hears_only_differences(
    ds: Datastore, server: MemoryServer, pods: Informer[str], fault: str
) -> None:
    for name in ("keep", "change", "drop"):
        ds.create(pod(name))
    seen = Recorder()
    pods.add_handler(seen)
    pods.start()
    assert pods.wait_synced(5)
    seen.changes.clear()
    lists = pods.lists
    # changes the watch never delivers: made while it is cut off
    server.set_reachable(False) if fault == "outage" else None
    with server.cond:
        other = open_datastore(f"memory://{server.name}")
        server.reachable = True  # the writer gets through; the informer's watch does not see it
        changed = other.get(POD, "change", "web")
        assert changed is not None
        changed["spec"]["nodeName"] = "n9"
        other.update(changed)
        other.delete(POD, "drop", "web")
        other.create(pod("new"))
        if fault == "cut":
            server.cut_watches()
        elif fault == "compact":
            server.compact()
            server.cut_watches()
        else:
            server.reachable = False
    if fault == "outage":
        time.sleep(0.3)
        server.set_reachable(True)
    assert wait_until(lambda: pods.lists > lists and len(seen.changes) >= 3, timeout=10)
    assert sorted(seen.changes) == [("web/change", "n1", "n9"), ("web/drop", "n1", None), ("web/new", None, "n1")]
    assert dict(pods.items()) == {"web/keep": "n1", "web/change": "n9", "web/new": "n1"}


class Counting(Controller):
    def __init__(self, fail_times: int = 0) -> None:
        super().__init__("counting", resync=0)
        self.synced: list[str] = []
        self.fail_times = fail_times

    def sync(self, key: str) -> None:
        if self.fail_times:
            self.fail_times -= 1
            raise RuntimeError("not yet")
        self.synced.append(key)


def test_a_burst_for_one_key_is_one_sync_and_full_goes_first() -> None:
    c = Counting()
    for key in ("a", "b", "a", FULL, "a"):
        c.enqueue(key)
    c.run_pending()
    assert c.synced == [FULL, "a", "b"]


def test_a_failed_sync_is_tried_again_and_its_error_reported_until_it_works() -> None:
    c = Counting(fail_times=2)
    c.start()
    try:
        c.enqueue("k")
        assert wait_until(lambda: c.synced == ["k"], timeout=5)
        assert c.last_error == ""
    finally:
        c.stop()


def test_namespaces_informer_uses_the_same_machinery(ds: Datastore) -> None:
    ds.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "web"}})
    names: Informer[str] = Informer(ds, NAMESPACE, lambda o: str(o["metadata"]["name"]))
    names.start()
    try:
        assert names.wait_synced(5)
        assert names.values() == ["web"]
    finally:
        names.stop()
