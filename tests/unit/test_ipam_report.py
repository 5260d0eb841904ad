"""`tulle ipam show` and `tulle ipam release` on the in-memory datastore: the report's counts, who
holds an address, what is a leak, and a release that frees only a leak, by compare-and-swap.

Invariants guarded here (docs/design/ipam.md):
- 2: a release is a compare-and-swap on the block; an allocation made meanwhile survives it;
- 9: an address a live endpoint (or a node's tunnel) holds is never released, nor one allocated
  within the grace with no endpoint yet (an ADD in progress).
"""

from __future__ import annotations

import ipaddress
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tulle.cli.main import main
from tulle.datastore.base import Datastore, Obj
from tulle.datastore.factory import open_datastore
from tulle.datastore.memory import forget_server, memory_server
from tulle.ipam.allocator import NodeAllocator, list_blocks
from tulle.ipam.release import read_state, release_leaked_address
from tulle.ipam.report import HELD, LEAKED, RECENT, allocations, report
from tulle.model.endpoints import WorkloadEndpoint, handle_for
from tulle.model.kinds import IPAM_BLOCK, NODE
from tulle.model.pools import parse_pool, pool_object

POOLS = [parse_pool(pool_object("v4", "10.244.0.0/24", 26)), parse_pool(pool_object("v6", "fd00:10::/120", 122))]


def an_hour_ago() -> float:
    return time.time() - 3600


@dataclass
class Cluster:
    url: str
    ds: Datastore

    def allocator(self, node: str, clock: Callable[[], float] = time.time) -> NodeAllocator:
        return NodeAllocator(self.ds, node, lambda: POOLS, clock=clock)

    def add_pod(self, node: str, pod: str, container: str) -> list[str]:
        """As an ADD leaves a pod: its addresses allocated, then its endpoint published."""
        namespace, name = pod.split("/")
        handle = handle_for("tulle", container, "eth0")
        ips = self.allocator(node).allocate(handle, [4, 6], {"pod": pod, "node": node})
        wep = WorkloadEndpoint(
            namespace=namespace,
            pod=name,
            node=node,
            network="tulle",
            container_id=container,
            ifname="eth0",
            ips=tuple(str(ip) for ip in ips),
            host_interface=f"tl{container[:11]}",
        )
        self.ds.create(wep.to_object())
        return [str(ip) for ip in ips]

    def leak(self, node: str, container: str, clock: Callable[[], float] = an_hour_ago) -> str:
        """An IPv4 address allocated to a handle no endpoint has (an ADD that died half-way)."""
        handle = handle_for("tulle", container, "eth0")
        [ip] = self.allocator(node, clock).allocate(handle, [4], {"pod": f"default/{container}", "node": node})
        return str(ip)

    def block_of(self, address: str) -> Obj:
        ip = ipaddress.ip_address(address)
        [block] = [b for b in list_blocks(self.ds) if ip in b.cidr]
        obj = self.ds.get(IPAM_BLOCK, block.name)
        assert obj is not None
        return obj


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    name = f"ipam-{uuid.uuid4().hex[:8]}"
    memory_server(name)
    ds = open_datastore(f"memory://{name}")
    for pool in POOLS:
        ds.create(pool_object(pool.name, str(pool.cidr), pool.block_size))
    for node in ("node1", "node2"):
        ds.create({"apiVersion": NODE.api_version, "kind": NODE.kind, "metadata": {"name": node}})
    yield Cluster(f"memory://{name}", ds)
    forget_server(name)


def tulle(cluster: Cluster, capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([*argv, "--datastore", cluster.url])
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def by_name(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: row for row in rows}


# -- the report (pure, on what read_state reads) ---------------------------------------------


def test_report_counts_addresses_used_and_free_per_pool_node_and_block(cluster: Cluster) -> None:
    cluster.add_pod("node1", "shop/web", "c1")
    cluster.add_pod("node1", "shop/db", "c2")
    cluster.add_pod("node2", "shop/api", "c3")
    cluster.allocator("node2").allocate("tulle-tunnel/node2/v4", [4], {"node": "node2"})

    shown = report(read_state(cluster.ds), time.time(), 900).to_json()

    pools = by_name(shown["pools"])
    assert pools["v4"] == {"name": "v4", "cidr": "10.244.0.0/24", "blocks": 2, "total": 256, "used": 4, "free": 252}
    assert pools["v6"]["used"] == 3 and pools["v6"]["blocks"] == 2 and pools["v6"]["total"] == 256
    nodes = by_name(shown["nodes"])
    assert (nodes["node1"]["blocks"], nodes["node1"]["total"], nodes["node1"]["used"]) == (2, 128, 4)
    assert (nodes["node2"]["blocks"], nodes["node2"]["total"], nodes["node2"]["used"]) == (2, 128, 3)
    assert sorted((b["node"], b["used"], b["free"]) for b in shown["blocks"]) == [
        ("node1", 2, 62),
        ("node1", 2, 62),
        ("node2", 1, 63),
        ("node2", 2, 62),
    ]
    assert shown["leaks"] == [] and shown["recent"] == []


def test_invariant_9_an_allocation_without_an_endpoint_is_a_leak_only_after_the_grace(cluster: Cluster) -> None:
    [web4, _] = cluster.add_pod("node1", "shop/web", "c1")
    old = cluster.leak("node1", "died")
    young = cluster.leak("node1", "adding", clock=time.time)  # an ADD that has not published yet
    state = read_state(cluster.ds)

    status = {a.address: a.status for a in allocations(state, time.time(), grace=900)}
    assert (status[web4], status[old], status[young]) == (HELD, LEAKED, RECENT)
    shown = report(state, time.time(), grace=900)
    assert [a.address for a in shown.leaks] == [old]
    assert shown.leaks[0].handle == handle_for("tulle", "died", "eth0")
    assert [a.address for a in shown.recent] == [young]
    # A grace of 0 calls every allocation without an endpoint leaked.
    assert [a.address for a in report(state, time.time(), grace=0).leaks] == sorted(
        [old, young], key=lambda a: int(ipaddress.ip_address(a))
    )


def test_a_tunnel_address_is_its_nodes_while_the_node_exists(cluster: Cluster) -> None:
    [tunnel] = cluster.allocator("node2", an_hour_ago).allocate("tulle-tunnel/node2/v4", [4], {"node": "node2"})
    state = read_state(cluster.ds)
    [held] = allocations(state, time.time(), 900)
    assert held.status == HELD and held.holder is not None
    assert held.holder.describe() == "the VXLAN tunnel of node node2"

    cluster.ds.delete(NODE, "node2")
    [gone] = allocations(read_state(cluster.ds), time.time(), 900)
    assert (gone.address, gone.status) == (str(tunnel), LEAKED)


def test_an_address_an_endpoint_lists_is_held_whatever_handle_ipam_records(cluster: Cluster) -> None:
    [web4, _] = cluster.add_pod("node1", "shop/web", "c1")
    block = cluster.block_of(web4)
    block["spec"]["allocations"][web4]["handle"] = "tulle/someone-else/eth0"
    cluster.ds.update(block)
    [held] = [a for a in allocations(read_state(cluster.ds), time.time(), 0) if a.address == web4]
    assert held.status == HELD and held.holder is not None and held.holder.pod == "shop/web"


# -- tulle ipam show -------------------------------------------------------------------------


def test_show_ip_names_the_pod_its_node_and_interface(cluster: Cluster, capsys: pytest.CaptureFixture[str]) -> None:
    cluster.add_pod("node1", "shop/web", "c1")
    [api4, api6] = cluster.add_pod("node2", "shop/api", "c2")

    code, out, err = tulle(cluster, capsys, "ipam", "show", "--ip", api4)
    assert code == 0, err
    assert "held by pod shop/api on node node2 (interface tlc2, eth0 in the pod)\n" in out
    assert f" {handle_for('tulle', 'c2', 'eth0')}\n" in out

    # An IPv6 address written otherwise is the same address.
    code, out, err = tulle(cluster, capsys, "ipam", "show", "--ip", api6.replace("::", ":0::"), "-o", "json")
    assert code == 0, err
    holder = json.loads(out)["allocation"]["holder"]
    assert (holder["kind"], holder["pod"], holder["node"], holder["interface"]) == ("pod", "shop/api", "node2", "tlc2")

    code, out, _ = tulle(cluster, capsys, "ipam", "show", "--ip", "10.244.0.250")
    assert code == 0 and "not allocated: it lies in IPPool v4 but in no block a node holds\n" in out


def test_show_lists_leaks_and_recent_allocations_and_filters_by_node(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.add_pod("node1", "shop/web", "c1")
    leaked = cluster.leak("node2", "died")
    recent = cluster.leak("node1", "adding", clock=time.time)

    code, out, err = tulle(cluster, capsys, "ipam", "show")
    assert code == 0, err
    leaks_part, recent_part = out.split("Leaks:")[1].split("Allocated less than 900 s ago")
    assert leaked in leaks_part and recent not in leaks_part and "default/died" in leaks_part
    assert recent in recent_part

    code, out, err = tulle(cluster, capsys, "ipam", "show", "--node", "node1", "-o", "json")
    assert code == 0, err
    shown = json.loads(out)
    assert shown["pools"] == [] and [n["name"] for n in shown["nodes"]] == ["node1"]
    assert {b["node"] for b in shown["blocks"]} == {"node1"}
    assert shown["leaks"] == [] and [a["address"] for a in shown["recent"]] == [recent]

    code, out, err = tulle(cluster, capsys, "ipam", "show", "--node", "node9")
    assert (code, out) == (1, "") and err == "error: --node: no node 'node9': it is no Node and holds no block\n"


# -- tulle ipam release ----------------------------------------------------------------------


def test_release_frees_a_leak_and_the_address_is_given_again(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.add_pod("node1", "shop/web", "c1")
    leaked = cluster.leak("node1", "died")
    cluster.add_pod("node1", "shop/db", "c2")

    code, out, err = tulle(cluster, capsys, "ipam", "release", leaked)
    assert code == 0, err
    assert out.startswith(f"released {leaked} (handle tulle/died/eth0, recorded for pod default/died) in block ")
    assert leaked not in cluster.block_of(leaked)["spec"]["allocations"]
    # The lowest free address of the block is the one released: the next pod gets it.
    [again, _] = cluster.add_pod("node1", "shop/new", "c3")
    assert again == leaked


def test_release_refuses_an_address_a_live_endpoint_holds_naming_the_holder(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    [web4, web6] = cluster.add_pod("node1", "shop/web", "c1")
    [tunnel] = cluster.allocator("node1").allocate("tulle-tunnel/node1/v4", [4], {"node": "node1"})
    for address, holder in (
        (web4, "pod shop/web on node node1 (interface tlc1, eth0 in the pod); delete the pod to free it"),
        (web6, "pod shop/web on node node1 (interface tlc1, eth0 in the pod); delete the pod to free it"),
        (str(tunnel), "the VXLAN tunnel of node node1; it goes with the node"),
    ):
        before = cluster.block_of(address)
        code, out, err = tulle(cluster, capsys, "ipam", "release", address, "--leak-grace", "0")
        assert (code, out) == (1, "")
        assert err == f"error: {address} is held by {holder}\n"
        assert cluster.block_of(address) == before  # nothing written


@pytest.mark.parametrize(
    ("address", "says"),
    [
        ("10.244.0.250", "10.244.0.250 is not allocated: it lies in IPPool v4 but in no block a node holds"),
        ("192.0.2.1", "192.0.2.1 is not allocated: it lies in no block and no IPPool"),
    ],
)
def test_release_of_an_address_in_no_block_is_one_line_and_status_1(
    cluster: Cluster, capsys: pytest.CaptureFixture[str], address: str, says: str
) -> None:
    cluster.add_pod("node1", "shop/web", "c1")
    code, out, err = tulle(cluster, capsys, "ipam", "release", address)
    assert (code, out, err) == (1, "", f"error: {says}; nothing to release\n")


def test_release_refuses_an_address_not_allocated_and_one_within_the_grace(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    cluster.add_pod("node1", "shop/web", "c1")
    young = cluster.leak("node1", "adding", clock=time.time)
    free = str(ipaddress.ip_address(young) + 1)
    before = cluster.block_of(young)

    code, out, err = tulle(cluster, capsys, "ipam", "release", free)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {free} is not allocated: it is free in block ") and err.count("\n") == 1

    code, out, err = tulle(cluster, capsys, "ipam", "release", young)
    assert (code, out) == (1, "")
    assert err.startswith(f"error: {young} was allocated to tulle/adding/eth0 ")
    assert "an ADD may be in progress" in err and err.count("\n") == 1
    assert cluster.block_of(young) == before
    # Once the user says the grace is over, it is a leak like any other.
    code, _, err = tulle(cluster, capsys, "ipam", "release", young, "--leak-grace", "0")
    assert code == 0, err


def test_a_bad_address_is_a_usage_error_naming_the_argument(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = tulle(cluster, capsys, "ipam", "release", "10.244.0.300")
    assert (code, out) == (2, "")
    assert err.startswith("error: argument ADDRESS: '10.244.0.300' is not an IPv4 or IPv6 address")


class RacingDatastore:
    """The in-memory datastore, with another writer that allocates in a block just before this
    client's first write of it: the write then meets a block changed since it was read."""

    def __init__(self, ds: Datastore, race: Callable[[], None]) -> None:
        self._ds, self._race = ds, race
        self.block_writes = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._ds, name)

    def update(self, obj: Obj) -> Obj:
        if obj["kind"] == IPAM_BLOCK.kind:
            self.block_writes += 1
            if self.block_writes == 1:
                self._race()
        return self._ds.update(obj)


def test_invariant_2_a_release_racing_an_allocation_keeps_that_allocation(cluster: Cluster) -> None:
    cluster.add_pod("node1", "shop/web", "c1")
    leaked = cluster.leak("node1", "died")
    racing: list[str] = []

    def allocate_meanwhile() -> None:
        racing.extend(cluster.add_pod("node1", "shop/racer", "c9"))

    store = RacingDatastore(cluster.ds, allocate_meanwhile)
    freed = release_leaked_address(store, leaked, grace=900)

    assert freed.address == leaked and store.block_writes == 2  # the first write lost, judged again
    allocations_now = cluster.block_of(leaked)["spec"]["allocations"]
    assert leaked not in allocations_now
    assert racing[0] in allocations_now  # a blind write would have erased it
