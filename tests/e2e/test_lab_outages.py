"""The lab keeps its books when an agent or the datastore fails (issue 7).

- A pod deleted while etcd is stopped is gone from `lab status` at once (its interface is
  gone: the agent defers the address release); its Pod object is deleted when etcd is back,
  and the address, once the agent replays the DEL, is held by one pod only.
- A pod add that hangs on a stuck agent holds no lab-wide lock: an agent restart and adds of
  other pods go ahead meanwhile, and the hanging pod cannot be added twice.
- `tulle lab etcd stop|start|pause|resume` works, and the agents are ready again after it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tulle.datastore.base import Datastore, DatastoreError
from tulle.ipam.allocator import NodeAllocator
from tulle.lab.cluster import Lab, LabError
from tulle.lab.etcd_server import pid_alive
from tulle.model.kinds import NODE, POD, WORKLOAD_ENDPOINT

from ..lablib import pod_netns, running_lab, state, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]
TULLE = os.path.join(os.path.dirname(sys.executable), "tulle")


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    # Short agent settings: a 2 s resync replays deferred DELs soon after etcd is back.
    with running_lab("lo", nodes=2, mode="host-gw", ipv4_only=True, lease_ttl=3, node_grace=5, resync=2) as lab:
        yield lab


def tulle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TULLE, *args], capture_output=True, text=True, timeout=120)


def _allocations(lab: Lab, node: str) -> dict[str, list[str]]:
    def read(store: Datastore) -> dict[str, list[str]]:
        return NodeAllocator(store, node, lambda: []).allocations()

    return lab.with_store(state(lab), read)


def _endpoint_pods(lab: Lab) -> set[str]:
    weps = lab.with_store(state(lab), lambda store: store.list(WORKLOAD_ENDPOINT)[0])
    return {str(w["spec"]["pod"]) for w in weps}


def _pod_object(lab: Lab, namespace: str, pod: str) -> dict[str, Any] | None:
    return lab.with_store(state(lab), lambda store: store.get(POD, pod, namespace))


def _holders(lab: Lab) -> dict[str, list[str]]:
    """Every address in `lab status`, with the pods that hold it."""
    holders: dict[str, list[str]] = {}
    for p in lab.status()["pods"]:
        for ip in p["ips"]:
            holders.setdefault(ip, []).append(p["pod"])
    return holders


def test_a_pod_deleted_while_etcd_is_stopped_leaves_the_books_and_its_address_is_not_shared(lab: Lab) -> None:
    keep = lab.add_pod("node1", "lo", "keep", {}, [])
    lab.add_pod("node1", "lo", "gone", {}, [])
    container_id = state(lab)["pods"]["lo/gone"]["containerID"]
    netns = pod_netns(lab, "lo/gone")
    lab.stop_etcd()
    try:
        assert lab.status()["etcdServer"]["state"] == "stopped"
        lab.del_pod("lo", "gone")  # the agent defers the address release; the DEL succeeds
        assert "lo/gone" not in [p["pod"] for p in lab.status()["pods"]]
        assert "lo/gone" not in state(lab)["pods"]
        assert not os.path.exists(netns)
        # an add that fails half-way (no datastore) leaves nothing in the books
        with pytest.raises(DatastoreError):
            lab.add_pod("node1", "lo", "early", {}, [])
        assert "lo/early" not in state(lab)["pods"]
        assert not os.path.exists(f"/run/netns/{lab.names.pod('lo', 'early')}")
        assert state(lab)["pendingPodDeletes"] == ["lo/early", "lo/gone"]
    finally:
        lab.start_etcd()
    assert lab.status()["etcdServer"]["state"] == "running"
    assert "pendingPodDeletes" not in state(lab)
    assert _pod_object(lab, "lo", "gone") is None
    assert _pod_object(lab, "lo", "early") is None
    assert _pod_object(lab, "lo", "keep") is not None
    # the agent gives the address back when it replays the deferred DEL; the replay is done
    # when its WorkloadEndpoint is gone too (the address is released first), and its record
    # of the DEL with it
    pending = os.path.join(lab.node_dir("node1"), "state", "pending-del")

    def replayed() -> bool:
        return (
            f"tulle/{container_id}/eth0" not in _allocations(lab, "node1")
            and "gone" not in _endpoint_pods(lab)
            and not [f for f in (os.listdir(pending) if os.path.isdir(pending) else []) if f.endswith(".json")]
        )

    assert wait_until(replayed, timeout=20)
    lab.wait_agent_ready(state(lab), "node1", timeout=20)
    new = lab.add_pod("node1", "lo", "new", {}, [])
    assert new["ips"] and set(new["ips"]).isdisjoint(keep["ips"])
    holders = _holders(lab)
    assert all(len(pods) == 1 for pods in holders.values()), holders
    assert set(new["ips"]) <= set(holders)


def test_restart_agent_and_other_adds_do_not_wait_behind_a_hanging_pod_add(lab: Lab) -> None:
    frozen = state(lab)["nodes"]["node2"]["pid"]
    old_pid = state(lab)["nodes"]["node1"]["pid"]
    box: dict[str, Any] = {}

    def run(name: str, fn: Any) -> threading.Thread:
        def target() -> None:
            try:
                box[name] = fn()
            except BaseException as exc:
                box[f"{name} error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        return thread

    others: list[threading.Thread] = []
    restart: threading.Thread | None = None
    os.kill(frozen, signal.SIGSTOP)  # node2's agent takes the ADD's connection and never answers
    try:
        slow = run("slow", lambda: lab.add_pod("node2", "lo", "slow", {}, []))
        assert wait_until(lambda: os.path.exists(f"/run/netns/{lab.names.pod('lo', 'slow')}"), timeout=10)
        time.sleep(0.5)  # the plugin is waiting on the frozen agent now
        # adds on node1, in parallel (one lab command each, as the CLI would run them)
        started = time.monotonic()
        others = [run(f"p{i}", lambda i=i: lab.add_pod("node1", "lo", f"p{i}", {}, [])) for i in range(4)]
        for thread in others:
            thread.join(timeout=max(0.1, 20 - (time.monotonic() - started)))
        assert not any(t.is_alive() for t in others), "pod adds on node1 waited behind a pod add on node2"
        # then node1's agent restarts (adds to node1 during its restart would rightly be told
        # to try again later)
        restart = run("restart", lambda: lab.restart_agent("node1"))
        restart.join(timeout=20)
        assert not restart.is_alive(), "restart_agent waited behind a pod add"
        assert slow.is_alive(), "the add on node2 should still hang on its frozen agent"
        with pytest.raises(LabError, match="exists already"):
            lab.add_pod("node1", "lo", "slow", {}, [])  # reserved: not addable twice
        assert "lo/slow" not in [p["pod"] for p in lab.status()["pods"]]
    finally:
        os.kill(frozen, signal.SIGCONT)
        for thread in [slow, *others, *([restart] if restart else [])]:
            thread.join(timeout=90)
    assert not [k for k in box if k.endswith("error")], box
    assert box["restart"] != old_pid and pid_alive(box["restart"])
    assert box["slow"]["ips"]
    listed = [p["pod"] for p in lab.status()["pods"]]
    assert {"lo/slow", "lo/p0", "lo/p1", "lo/p2", "lo/p3"} <= set(listed)
    holders = _holders(lab)
    assert all(len(pods) == 1 for pods in holders.values()), holders


def test_cli_stops_and_starts_etcd_and_the_agents_are_ready_again(lab: Lab) -> None:
    old_pid = state(lab)["etcd"]["pid"]
    helptext = tulle("lab", "etcd", "--help").stdout
    assert all(word in helptext for word in ("stop", "start", "pause", "resume"))
    stop = tulle("lab", "etcd", "stop", lab.name)
    assert stop.returncode == 0, stop.stderr
    assert not pid_alive(old_pid)
    assert json.loads(tulle("lab", "status", lab.name, "--json").stdout)["etcdServer"]["state"] == "stopped"
    text = tulle("lab", "status", lab.name)
    assert text.returncode == 0 and "(STOPPED)" in text.stdout.splitlines()[0]
    failed = tulle("lab", "pod", "add", lab.name, "node1", "lo/nope")
    assert failed.returncode == 1 and "error: etcd at" in failed.stderr, failed.stderr  # no traceback
    assert "Traceback" not in failed.stderr
    start = tulle("lab", "etcd", "start", lab.name)
    assert start.returncode == 0, start.stderr
    new_pid = state(lab)["etcd"]["pid"]
    assert new_pid != old_pid and pid_alive(new_pid)
    assert "(running)" in tulle("lab", "status", lab.name).stdout.splitlines()[0]
    # the data is kept: the Node objects are still there
    assert lab.with_store(state(lab), lambda store: store.get(NODE, "node1")) is not None
    for node in state(lab)["nodes"]:
        lab.wait_agent_ready(state(lab), node, timeout=30)
    assert lab.add_pod("node2", "lo", "after", {}, [])["ips"]
    # a paused etcd is shown as such, and `lab status` does not hang on it
    assert tulle("lab", "etcd", "pause", lab.name).returncode == 0
    try:
        began = time.monotonic()
        assert "(PAUSED)" in tulle("lab", "status", lab.name).stdout.splitlines()[0]
        assert time.monotonic() - began < 10
    finally:
        assert tulle("lab", "etcd", "resume", lab.name).returncode == 0
    assert lab.status()["etcdServer"]["state"] == "running"
