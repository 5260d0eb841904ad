"""The agent restarts without disturbing running pods; nodes join and leave.

- A restart changes no link, address, route or nft rule handle of a running pod, and a TCP
  connection between pods on two nodes survives it.
- A route deleted while the agent was down is back after it starts.
- A node that joins reaches every other node within seconds; a node that leaves is removed
  from every other node's routes, and its blocks are freed after the grace period.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tulle.datastore.base import Datastore
from tulle.ipam.allocator import list_blocks
from tulle.lab.cluster import Lab
from tulle.model.kinds import WORKLOAD_ENDPOINT

from ..lablib import (
    TcpEcho,
    kernel_state,
    node_netns,
    ping,
    pod_ips,
    pod_netns,
    routes,
    run_in,
    running_lab,
    state,
    tcp_connect,
    tcp_roundtrip,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab("al", nodes=2, mode="vxlan", node_grace=3.0, lease_ttl=5) as lab:
        lab.add_pod("node1", "x", "a", {"app": "a"}, [])
        lab.add_pod("node2", "x", "b", {"app": "b"}, [])
        yield lab


@pytest.mark.parametrize("family", [4, 6])
def test_restart_keeps_a_cross_node_tcp_connection_and_changes_nothing(lab: Lab, family: int) -> None:
    server = TcpEcho(pod_netns(lab, "x/b"), family)
    try:
        conn = tcp_connect(pod_netns(lab, "x/a"), pod_ips(lab, "x/b")[family])
        with conn:
            assert tcp_roundtrip(conn, b"before")
            before = {node: kernel_state(node_netns(lab, node)) for node in ("node1", "node2")}
            old_pid = state(lab)["nodes"]["node1"]["pid"]
            lab.restart_agent("node1")
            assert state(lab)["nodes"]["node1"]["pid"] != old_pid
            assert tcp_roundtrip(conn, b"during")
            lab.restart_agent("node2")
            assert tcp_roundtrip(conn, b"after")
            after = {node: kernel_state(node_netns(lab, node)) for node in ("node1", "node2")}
            assert after == before
    finally:
        server.close()


def test_a_route_deleted_while_the_agent_was_down_comes_back(lab: Lab) -> None:
    address = pod_ips(lab, "x/a")[4]
    node1 = node_netns(lab, "node1")
    lab.stop_agent("node1")
    try:
        run_in(node1, ["ip", "route", "del", address], check=True)
        assert not [r for r in routes(node1) if r["dst"] == address]
        assert not ping(pod_netns(lab, "x/b"), address, count=1)
    finally:
        lab.start_agent("node1")
    assert [r for r in routes(node1) if r["dst"] == address]
    assert ping(pod_netns(lab, "x/b"), address)


def _blocks_of(lab: Lab, node: str) -> list[str]:
    def read(store: Datastore) -> list[str]:
        return [str(b.cidr) for b in list_blocks(store) if b.node == node]

    return lab.with_store(state(lab), read)


def _routed_blocks(lab: Lab, node: str) -> set[str]:
    return {
        r["dst"]
        for r in routes(node_netns(lab, node))
        if str(r.get("protocol")) == "211" and r.get("type") != "blackhole"
    }


def test_node_join_and_leave(lab: Lab) -> None:
    lab.add_node("node3")
    lab.add_pod("node3", "x", "c", {"app": "c"}, [])
    blocks3 = _blocks_of(lab, "node3")
    v4_blocks = {b for b in blocks3 if ":" not in b}
    assert v4_blocks
    # every other node routes to the new node's blocks (the watch carries it: seconds at most)
    for node in ("node1", "node2"):
        assert wait_until(lambda node=node: v4_blocks <= _routed_blocks(lab, node), timeout=10)
    assert ping(pod_netns(lab, "x/a"), pod_ips(lab, "x/c")[4])
    assert ping(pod_netns(lab, "x/a"), pod_ips(lab, "x/c")[6])
    lab.del_node("node3")
    for node in ("node1", "node2"):
        assert wait_until(lambda node=node: not (v4_blocks & _routed_blocks(lab, node)), timeout=10)
    # the blocks are freed after the grace period (3 s here)
    assert wait_until(lambda: not _blocks_of(lab, "node3"), timeout=15)
    weps = lab.with_store(state(lab), lambda store: store.list(WORKLOAD_ENDPOINT)[0])
    assert not [w for w in weps if w["spec"]["node"] == "node3"], json.dumps(weps)
