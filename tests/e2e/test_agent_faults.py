"""Faults of an agent or of the datastore cost no pod its traffic and no address its owner.

Invariants (docs/design/datastore.md 6, docs/design/ipam.md 5-6):
- A node's routes and blocks belong to the node, not to its agent's heartbeat: an agent dead
  for longer than its lease and the grace period leaves its pods reachable from everywhere and
  its blocks its own; liveness is only reported (`tulle get nodes`, `tulle status`).
- A restarted agent records its pods' addresses in IPAM again and publishes their endpoints
  before it takes an ADD: no address is ever given to a second pod.
- A datastore that comes back after an outage changes nothing in any kernel.
- An outage is reported at once, with its cause, without the report waiting on the datastore.
- A failed ADD leaves no state file behind; a restart revokes the lease of the agent before.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tulle.datastore.base import Datastore
from tulle.datastore.etcd import EtcdDatastore
from tulle.ipam.allocator import list_blocks
from tulle.lab import topology
from tulle.lab.cluster import CNI_PATH, NETWORK, Lab
from tulle.lab.runtime import CniFailure, CniRuntime
from tulle.model.endpoints import handle_for
from tulle.model.kinds import IPAM_BLOCK, NODE, WORKLOAD_ENDPOINT

from ..lablib import node_netns, ping, pod_ips, pod_netns, routes, running_lab, state, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

LEASE_TTL = 2
GRACE = 3.0
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TULLE = os.path.join(REPO, ".venv", "bin", "tulle")


@pytest.fixture
def lab() -> Iterator[Lab]:
    with running_lab("af", nodes=2, mode="vxlan", lease_ttl=LEASE_TTL, node_grace=GRACE) as lab:
        lab.add_pod("node1", "fi", "old", {}, [])
        lab.add_pod("node2", "fi", "peer", {}, [])
        yield lab


def _read(lab: Lab, fn: Any) -> Any:
    return lab.with_store(state(lab), fn)


def _endpoints(lab: Lab) -> list[dict[str, Any]]:
    return list(_read(lab, lambda store: store.list(WORKLOAD_ENDPOINT)[0]))


def _owners(lab: Lab) -> dict[str, str]:
    return dict(_read(lab, lambda store: {str(b.cidr): b.node for b in list_blocks(store)}))


def _kill_agent(lab: Lab, node: str) -> None:
    os.kill(state(lab)["nodes"][node]["pid"], signal.SIGKILL)


def _addresses_held_once(lab: Lab) -> None:
    """Every pod address the lab knows is held by exactly one pod and one endpoint."""
    seen: dict[str, str] = {}
    for pod in lab.status()["pods"]:
        for ip in pod["ips"]:
            assert ip not in seen, f"{ip} is held by {seen[ip]} and {pod['pod']}"
            seen[ip] = pod["pod"]
    holders: dict[str, str] = {}
    for wep in _endpoints(lab):
        for ip in wep["spec"]["ips"]:
            assert ip not in holders, f"{ip} is in the endpoints of {holders[ip]} and {wep['spec']['pod']}"
            holders[ip] = wep["spec"]["pod"]
    assert set(holders) == set(seen)


def test_an_agent_dead_past_its_lease_and_the_grace_keeps_its_node_routed_and_its_blocks(lab: Lab) -> None:
    old = pod_ips(lab, "fi/old")
    owners_before = _owners(lab)
    _kill_agent(lab, "node1")
    try:
        # the heartbeat expires (liveness is reported) ...
        assert wait_until(lambda: "node1" not in _read(lab, lambda s: s.live_nodes()), 10)
        out = subprocess.run([TULLE, "get", "nodes", "--lab", lab.name], capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        assert [line.split()[1] for line in out.stdout.splitlines()[1:]] == ["NotReady", "Ready"], out.stdout
        # ... and past the grace period nothing is withdrawn: the Node stays, its blocks stay its own
        time.sleep(GRACE + 2 * LEASE_TTL)
        assert _read(lab, lambda s: s.get(NODE, "node1")) is not None
        assert _owners(lab) == owners_before
        routed = {r["dst"] for r in routes(node_netns(lab, "node2"))}
        assert any(b in routed for b, n in owners_before.items() if n == "node1" and ":" not in b)
        for family in (4, 6):
            assert ping(pod_netns(lab, "fi/peer"), old[family])
        assert {w["spec"]["pod"] for w in _endpoints(lab)} == {"old", "peer"}
    finally:
        lab.start_agent("node1")
    lab.add_pod("node1", "fi", "new", {}, [])
    assert set(pod_ips(lab, "fi/new").values()).isdisjoint(old.values())
    _addresses_held_once(lab)


def test_a_restarted_agent_records_its_pods_addresses_and_endpoints_again(lab: Lab) -> None:
    """What the issue saw after node2 freed node1's blocks: node1's restarted agent gave fi/old's
    address to a new pod, and fi/old's endpoint was never published again. Here the loss is made
    directly: while node1's agent is down its pod's endpoint and its whole block are deleted."""
    old = pod_ips(lab, "fi/old")
    lab.stop_agent("node1")
    try:

        def lose(store: Datastore) -> None:
            for wep in store.list(WORKLOAD_ENDPOINT)[0]:
                if wep["spec"]["pod"] == "old":
                    store.delete(WORKLOAD_ENDPOINT, wep["metadata"]["name"], "fi")
            for block in list_blocks(store):
                if block.node == "node1":
                    store.delete(IPAM_BLOCK, block.name)

        _read(lab, lose)
    finally:
        lab.start_agent("node1")
    assert {w["spec"]["pod"] for w in _endpoints(lab)} == {"old", "peer"}
    lab.add_pod("node1", "fi", "new", {}, [])
    assert set(pod_ips(lab, "fi/new").values()).isdisjoint(old.values())
    _addresses_held_once(lab)
    assert ping(pod_netns(lab, "fi/peer"), old[4])


class RouteMonitor:
    """`ip monitor route` in a node: every route the kernel adds or removes while it runs."""

    def __init__(self, netns: str) -> None:
        self.proc = subprocess.Popen(
            ["nsenter", f"--net={netns}", "ip", "monitor", "route"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )

    def stop(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=5)
        return out


def _status(lab: Lab) -> tuple[float, subprocess.CompletedProcess[str]]:
    started = time.monotonic()
    out = subprocess.run([TULLE, "status", "--lab", lab.name], capture_output=True, text=True, timeout=30)
    return time.monotonic() - started, out


def test_a_paused_datastore_is_reported_and_resuming_it_changes_no_route(lab: Lab) -> None:
    monitors = {node: RouteMonitor(node_netns(lab, node)) for node in ("node1", "node2")}
    seen: dict[str, str] = {}
    try:
        time.sleep(0.5)
        lab.pause_etcd()
        try:
            reported = []

            def names_the_outage() -> bool:
                took, out = _status(lab)
                reported.append((took, out.stdout))
                return out.stdout.count("datastore unreachable since") == 2

            assert wait_until(names_the_outage, timeout=20, interval=0.5), reported[-1]
            assert all(took < 5 for took, _ in reported), [took for took, _ in reported]
            time.sleep(3 * LEASE_TTL)  # every heartbeat's lease runs out while etcd is paused
        finally:
            lab.resume_etcd()
        for node in ("node1", "node2"):
            lab.wait_agent_ready(state(lab), node, timeout=30)
        # the heartbeats come back; routes never moved
        assert wait_until(lambda: set(_read(lab, lambda s: s.live_nodes())) == {"node1", "node2"}, 10)
        time.sleep(1)
    finally:
        for node, monitor in monitors.items():
            seen[node] = monitor.stop()
    assert seen == {"node1": "", "node2": ""}
    assert ping(pod_netns(lab, "fi/peer"), pod_ips(lab, "fi/old")[4])
    _, out = _status(lab)
    assert out.returncode == 0, out.stdout


def test_a_failed_add_during_an_outage_leaves_no_state_and_its_release_is_replayed(lab: Lab) -> None:
    st = state(lab)
    node_dir = lab.node_dir("node1")
    netns = lab.names.pod("fi", "lost")
    topology.add_netns(netns)
    container = "c0ffee" * 4
    args = "IgnoreUnknown=1;K8S_POD_NAMESPACE=fi;K8S_POD_NAME=lost"
    runtime = CniRuntime(CNI_PATH, f"/run/netns/{st['nodes']['node1']['netns']}")
    with open(os.path.join(node_dir, "cni", "10-tulle.conflist")) as f:
        conf = json.load(f)
    endpoints_dir = os.path.join(node_dir, "state", "endpoints")
    lab.stop_etcd()
    try:
        with pytest.raises(CniFailure) as failed:
            runtime.add(conf, container, f"/run/netns/{netns}", "eth0", args)
        assert failed.value.error["code"] == 11, failed.value.error
        left = []
        for name in os.listdir(endpoints_dir):
            with open(os.path.join(endpoints_dir, name)) as f:
                if container in f.read():
                    left.append(name)
        assert left == []
    finally:
        lab.start_etcd()
    pending = os.path.join(node_dir, "state", "pending-del")
    assert wait_until(lambda: not os.path.isdir(pending) or not os.listdir(pending), timeout=40)
    handle = handle_for(NETWORK, container, "eth0")
    blocks = _read(lab, lambda s: list_blocks(s))
    assert not [a for b in blocks for a, at in b.allocations.items() if at.get("handle") == handle]
    topology.del_netns(netns)


def test_a_restart_revokes_the_lease_of_the_agent_before(lab: Lab) -> None:
    """An etcd detail: the heartbeat's lease (another backend expires heartbeats its own way)."""

    def etcd(store: Datastore) -> EtcdDatastore:
        assert isinstance(store, EtcdDatastore)
        return store

    before = _read(lab, lambda s: etcd(s).heartbeat_lease("node1"))
    assert before
    lab.restart_agent("node1")
    after = _read(lab, lambda s: etcd(s).heartbeat_lease("node1"))
    assert after != before
    assert _read(lab, lambda s: etcd(s).client.lease_ttl(before)) == -1  # revoked, not left to expire
    assert _read(lab, lambda s: etcd(s).client.lease_ttl(after)) > 0
