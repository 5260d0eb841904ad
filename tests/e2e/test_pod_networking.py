"""Pods across nodes in every routing mode, IPv4 and IPv6, with real packets through a lab.

Each lab has 3 nodes; outside host-gw mode node3 sits on a second underlay subnet behind a
router, so hybrid mode has one direct pair (node1-node2) and one VXLAN pair (node1-node3).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tulle.lab.cluster import Lab

from ..lablib import (
    TcpEcho,
    UdpWitness,
    link_stats,
    node_ips,
    node_netns,
    ping,
    pod_ips,
    pod_netns,
    routes,
    running_lab,
    tcp_reachable,
    udp_echo,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

PODS = {"x/p1": "node1", "x/p1b": "node1", "x/p2": "node2", "x/p3": "node3"}


@pytest.fixture(scope="module", params=["host-gw", "vxlan", "hybrid"])
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    with running_lab(request.param[:2], nodes=3, mode=request.param) as lab:
        for pod, node in PODS.items():
            ns, name = pod.split("/")
            lab.add_pod(node, ns, name, {"app": name}, [])
        yield lab


@pytest.mark.parametrize("family", [4, 6])
def test_pod_reaches_pods_on_its_node_and_on_other_nodes(lab: Lab, family: int) -> None:
    src = pod_netns(lab, "x/p1")
    for target in ("x/p1b", "x/p2", "x/p3"):
        assert ping(src, pod_ips(lab, target)[family]), f"x/p1 -> {target} (IPv{family})"
    # and back
    assert ping(pod_netns(lab, "x/p3"), pod_ips(lab, "x/p1")[family])


@pytest.mark.parametrize("family", [4, 6])
def test_pod_reaches_its_own_node_and_other_nodes(lab: Lab, family: int) -> None:
    src = pod_netns(lab, "x/p1")
    for node in ("node1", "node2", "node3"):
        assert ping(src, node_ips(lab, node)[family]), f"x/p1 -> {node} (IPv{family})"


@pytest.mark.parametrize("family", [4, 6])
def test_tcp_and_udp_between_pods_on_two_nodes(lab: Lab, family: int) -> None:
    server = TcpEcho(pod_netns(lab, "x/p3"), family)
    witness = UdpWitness(pod_netns(lab, "x/p3"), family)
    try:
        assert tcp_reachable(pod_netns(lab, "x/p1"), pod_ips(lab, "x/p3")[family])
        assert udp_echo(pod_netns(lab, "x/p1"), pod_ips(lab, "x/p3")[family])
        # pod to pod is never translated: the far pod sees the real source
        assert witness.seen == [pod_ips(lab, "x/p1")[family]]
    finally:
        server.close()
        witness.close()


@pytest.mark.parametrize("family", [4, 6])
def test_traffic_to_outside_the_pools_is_masqueraded_to_the_node(lab: Lab, family: int) -> None:
    """The external host has no route back to the pods: it must see the node's address."""
    ext_ns = f"/run/netns/{lab.names.external}"
    ext_address = {4: "172.30.100.2", 6: "fd30:100::2"}[family]
    witness = UdpWitness(ext_ns, family)
    try:
        for pod, node in (("x/p1", "node1"), ("x/p3", "node3")):
            assert udp_echo(pod_netns(lab, pod), ext_address), f"{pod} -> external host (IPv{family})"
            assert witness.seen[-1] == node_ips(lab, node)[family]
            assert witness.seen[-1] != pod_ips(lab, pod)[family]
    finally:
        witness.close()


def test_pod_mtu_fits_the_encapsulation(lab: Lab) -> None:
    mode = lab.status()["mode"]
    expected = 1500 if mode == "host-gw" else 1430  # dual-stack VXLAN: 70 bytes of IPv6 outer header
    src = pod_netns(lab, "x/p1")
    # the biggest packet that fits the pod MTU crosses nodes without fragmentation
    assert ping(src, pod_ips(lab, "x/p3")[4], size=expected - 28, dont_fragment=True)
    assert ping(src, pod_ips(lab, "x/p3")[6], size=expected - 48, dont_fragment=True)
    assert not ping(src, pod_ips(lab, "x/p3")[4], size=expected - 27, dont_fragment=True)


def test_routes_match_the_mode(lab: Lab) -> None:
    """host-gw: via the underlay; vxlan: via the VXLAN device; hybrid: direct on the subnet
    (node1-node2), VXLAN across the router (node1-node3), proven by the VXLAN device's counters."""
    mode = lab.status()["mode"]
    node1 = node_netns(lab, "node1")
    by_gateway = {r["dst"]: r for r in routes(node1, 4) if r.get("protocol") == "211" or r.get("protocol") == 211}
    via_vxlan = {dst for dst, r in by_gateway.items() if r.get("dev") == "tulle-vxlan4"}
    direct = {dst for dst, r in by_gateway.items() if r.get("dev") == lab.names.uplink}
    if mode == "host-gw":
        assert len(direct) == 2 and not via_vxlan
        return
    if mode == "vxlan":
        assert len(via_vxlan) == 2 and not direct
        return
    assert len(direct) == 1 and len(via_vxlan) == 1
    src = pod_netns(lab, "x/p1")
    before = link_stats(node1, "tulle-vxlan4")
    assert ping(src, pod_ips(lab, "x/p2")[4], count=5)
    after_direct = link_stats(node1, "tulle-vxlan4")
    assert after_direct["tx"] == before["tx"], "node1 -> node2 must not use VXLAN"
    assert ping(src, pod_ips(lab, "x/p3")[4], count=5)
    after_vxlan = link_stats(node1, "tulle-vxlan4")
    assert after_vxlan["tx"] >= after_direct["tx"] + 5, "node1 -> node3 must use VXLAN"
