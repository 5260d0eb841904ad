"""The routing compiler (pure): what each mode installs for other nodes' blocks."""

from __future__ import annotations

from tulle.kernelstate.net import FdbEntry, Neighbour, Route
from tulle.routing.compile import (
    BlockInfo,
    LocalNode,
    NodeInfo,
    VxlanEndpoint,
    compile_routing,
    pod_mtu,
    vxlan_mac,
)

A = NodeInfo("a", ("172.30.1.11", "fd30:1::b"), (VxlanEndpoint(4, vxlan_mac("a", 4), "10.244.0.0"),))
B = NodeInfo(
    "b",
    ("172.30.1.12", "fd30:1::c"),
    (VxlanEndpoint(4, vxlan_mac("b", 4), "10.244.1.0"), VxlanEndpoint(6, vxlan_mac("b", 6), "fd00::100")),
)
C = NodeInfo("c", ("172.30.2.13",), (VxlanEndpoint(4, vxlan_mac("c", 4), "10.244.2.0"),))
BLOCKS = [
    BlockInfo("10.244.0.0/26", "a"),
    BlockInfo("10.244.1.0/26", "b"),
    BlockInfo("fd00::100/122", "b"),
    BlockInfo("10.244.2.0/26", "c"),
    BlockInfo("10.244.3.0/26", "gone"),
]


def local(mode: str) -> LocalNode:
    return LocalNode("a", mode, ("172.30.1.11/24", "fd30:1::b/64"))


def test_host_gw_routes_via_underlay_and_blackholes_own_blocks() -> None:
    out = compile_routing(local("host-gw"), [A, B, C], BLOCKS)
    assert out.routes == {
        Route("10.244.0.0/26", blackhole=True),
        Route("10.244.1.0/26", gateway="172.30.1.12"),
        Route("fd00::100/122", gateway="fd30:1::c"),
    }
    assert not out.neighbours and not out.fdb
    # c is on another subnet: host-gw cannot reach it, and says why.
    assert any("10.244.2.0/26" in r and "host-gw needs" in r for r in out.unreachable)


def test_vxlan_routes_neighbours_and_fdb_per_family() -> None:
    out = compile_routing(local("vxlan"), [A, B, C], BLOCKS)
    assert Route("10.244.1.0/26", gateway="10.244.1.0", dev="tulle-vxlan4", onlink=True) in out.routes
    assert Route("fd00::100/122", gateway="fd00::100", dev="tulle-vxlan6", onlink=True) in out.routes
    assert Route("10.244.2.0/26", gateway="10.244.2.0", dev="tulle-vxlan4", onlink=True) in out.routes
    assert Neighbour("tulle-vxlan4", "10.244.1.0", vxlan_mac("b", 4)) in out.neighbours
    assert FdbEntry("tulle-vxlan4", vxlan_mac("c", 4), "172.30.2.13") in out.fdb
    assert FdbEntry("tulle-vxlan6", vxlan_mac("b", 6), "fd30:1::c") in out.fdb


def test_hybrid_is_direct_on_the_subnet_and_vxlan_across_the_router() -> None:
    out = compile_routing(local("hybrid"), [A, B, C], BLOCKS)
    assert Route("10.244.1.0/26", gateway="172.30.1.12") in out.routes
    assert Route("10.244.2.0/26", gateway="10.244.2.0", dev="tulle-vxlan4", onlink=True) in out.routes
    assert {f.dst for f in out.fdb} == {"172.30.2.13"}


def test_a_gone_node_gets_no_route() -> None:
    out = compile_routing(local("vxlan"), [A, B, C], BLOCKS)
    assert not any(r.dst == "10.244.3.0/26" for r in out.routes)


def test_pod_mtu_leaves_room_for_encapsulation() -> None:
    assert pod_mtu("host-gw", 1500, [4, 6]) == 1500
    assert pod_mtu("vxlan", 1500, [4]) == 1450
    assert pod_mtu("hybrid", 1500, [4, 6]) == 1430


def test_vxlan_mac_is_stable_and_locally_administered() -> None:
    mac = vxlan_mac("node1", 4)
    assert mac == vxlan_mac("node1", 4) != vxlan_mac("node1", 6)
    first = int(mac.split(":")[0], 16)
    assert first & 0x02 and not first & 0x01
