"""No pod impersonates another or reaches the control plane (docs/design/guard.md).

Attacks from a pod, with real packets in a 2-node VXLAN lab:
- a packet from another pod's address (UDP through a bound socket, a TCP SYN and UDP by raw
  frames; IPv4 and IPv6; the victim on the same node and across nodes) is dropped before policy,
  and counted for the pod with its reason;
- a VXLAN frame sent to a node's port 4789 by a pod, or by the lab's external host, is dropped;
  a pod's own UDP/4789 traffic to the world is masqueraded and policed like any other;
- a flood of new connections stays within the pod's limit, and another pod's flows go on;
- ARP and neighbour advertisements claiming another pod's address change no neighbour entry,
  and the node answers no ARP for its own addresses on a pod's veth;
- an allowed-source annotation lets its prefix through; a malformed one allows nothing and is
  reported on the pod's endpoint;
- a pod cannot open the datastore's port; it still reaches the node's other services.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tulle.dataplane.netns import run_in_netns
from tulle.datastore.base import Datastore
from tulle.lab.cluster import Lab
from tulle.model.endpoints import ALLOWED_SOURCE_PREFIXES, WorkloadEndpoint
from tulle.model.kinds import POD, WORKLOAD_ENDPOINT

from ..lablib import (
    UdpWitness,
    node_ips,
    node_netns,
    pod_ips,
    pod_netns,
    run_in,
    running_lab,
    state,
    udp_echo,
    wait_until,
)

pytestmark = [pytest.mark.root, pytest.mark.slow]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TULLE = os.path.join(REPO, ".venv", "bin", "tulle")
HOST_MAC = "ee:ee:ee:ee:ee:ee"
CONNECTION_LIMIT = 200
ONLY_GOOD = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: only-good, namespace: g}
spec:
  podSelector: {matchLabels: {app: srv}}
  ingress:
  - from: [{podSelector: {matchLabels: {role: good}}}]
    ports: [{protocol: UDP, port: 9999}]
"""


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    with running_lab("gd", nodes=2, mode="vxlan", connection_limit=CONNECTION_LIMIT) as lab:
        lab.add_pod("node1", "g", "srv", {"app": "srv"}, [])
        lab.add_pod("node1", "g", "good", {"role": "good"}, [])
        lab.add_pod("node1", "g", "bad", {}, [])
        lab.add_pod("node1", "g", "open", {}, [])
        lab.add_pod("node2", "g", "far", {}, [])
        lab.add_pod("node2", "g", "srv2", {"app": "srv"}, [])
        path = os.path.join(lab.dir, "only-good.yaml")
        with open(path, "w") as f:
            f.write(ONLY_GOOD)
        done = subprocess.run([TULLE, "apply", "-f", path, "--lab", lab.name], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        yield lab


# -- packets ---------------------------------------------------------------------------------------


def pod_mac(lab: Lab, pod: str) -> str:
    # `ip`, not /sys: nsenter --net keeps the root namespace's /sys
    out = run_in(pod_netns(lab, pod), ["ip", "-j", "link", "show", "eth0"], check=True)
    return str(json.loads(out.stdout)[0]["address"])


def send_frames(netns: str, frames: list[bytes], ifname: str = "eth0") -> None:
    """Raw Ethernet frames out of an interface of a namespace: every header as the test wants."""

    def send() -> None:
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
            s.bind((ifname, 0))
            for frame in frames:
                s.send(frame)

    run_in_netns(netns, send)


def ip_frame(src_mac: str, src: str, dst: str, l4: Any) -> bytes:
    from scapy.layers.inet import IP
    from scapy.layers.inet6 import IPv6
    from scapy.layers.l2 import Ether

    layer = IP(src=src, dst=dst) if ipaddress.ip_address(dst).version == 4 else IPv6(src=src, dst=dst)
    return bytes(Ether(src=src_mac, dst=HOST_MAC) / layer / l4)


class Sniffer:
    """Every frame arriving on a namespace's interface, kept for the test to look through."""

    def __init__(self, netns: str, ifname: str = "eth0") -> None:
        def make() -> socket.socket:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.ntohs(0x0003))
            s.bind((ifname, 0))
            s.settimeout(0.2)
            return s

        self.sock = run_in_netns(netns, make)
        self.frames: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(65535))
            except TimeoutError:
                continue
            except OSError:
                return

    def saw(self, predicate: Any) -> bool:
        from scapy.layers.l2 import Ether

        return any(predicate(Ether(f)) for f in list(self.frames))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def guard_drops(lab: Lab, pod: str) -> dict[str, int]:
    """The guard's drops of one pod by reason, as `tulle status` reports them."""
    out = subprocess.run([TULLE, "status", "--lab", lab.name, "-o", "json"], capture_output=True, text=True, timeout=30)
    drops: dict[str, int] = {}
    for node in json.loads(out.stdout)["nodes"]:
        for d in node.get("drops", []):
            if d.get("pod") == pod and "reason" in d:
                drops[d["reason"]] = drops.get(d["reason"], 0) + int(d["packets"])
    return drops


# -- source verification ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("attacker", ["g/bad", "g/far"])
def test_a_pod_sending_from_another_pods_address_is_dropped_and_counted(lab: Lab, family: int, attacker: str) -> None:
    """The issue's attack: the attacker binds the good pod's address and sends to the server that
    admits only the good pod; also a raw TCP SYN and raw UDP from that address."""
    from scapy.layers.inet import TCP, UDP

    good, srv = pod_ips(lab, "g/good")[family], pod_ips(lab, "g/srv")[family]
    witness = UdpWitness(pod_netns(lab, "g/srv"), family)
    sniffer = Sniffer(pod_netns(lab, "g/open"))
    attacker_ns = pod_netns(lab, attacker)
    before = guard_drops(lab, attacker).get("source address is not the pod's", 0)
    try:
        assert udp_echo(pod_netns(lab, "g/good"), srv)  # the real good pod gets through
        run_in(attacker_ns, ["ip", *(["-6"] if family == 6 else []), "addr", "add", good, "dev", "eth0", "nodad"])
        try:

            def spoof() -> None:
                af = socket.AF_INET if family == 4 else socket.AF_INET6
                with socket.socket(af, socket.SOCK_DGRAM) as s:
                    s.bind((good, 0))
                    s.sendto(b"SPOOFED", (srv, 9999))

            run_in_netns(attacker_ns, spoof)
        finally:
            run_in(attacker_ns, ["ip", *(["-6"] if family == 6 else []), "addr", "del", good, "dev", "eth0"])
        mac = pod_mac(lab, attacker)
        open_ip = pod_ips(lab, "g/open")[family]
        send_frames(
            attacker_ns,
            [
                ip_frame(mac, good, open_ip, TCP(sport=40001, dport=7777, flags="S")),
                ip_frame(mac, good, open_ip, UDP(sport=40002, dport=9999) / b"RAW-SPOOF"),
            ],
        )
        time.sleep(1.0)
        assert good in witness.seen and len([s for s in witness.seen if s == good]) == 1, witness.seen
        assert not sniffer.saw(lambda f: f.haslayer("TCP") and f["TCP"].dport == 7777)
        assert not sniffer.saw(lambda f: f.haslayer("UDP") and f["UDP"].sport == 40002)
    finally:
        witness.close()
        sniffer.close()
    assert wait_until(lambda: guard_drops(lab, attacker).get("source address is not the pod's", 0) >= before + 3, 10)


def test_a_frame_from_another_mac_is_dropped_and_counted(lab: Lab) -> None:
    from scapy.layers.inet import UDP

    sniffer = Sniffer(pod_netns(lab, "g/open"))
    try:
        bad, open_ip = pod_ips(lab, "g/bad")[4], pod_ips(lab, "g/open")[4]
        send_frames(pod_netns(lab, "g/bad"), [ip_frame("02:de:ad:be:ef:01", bad, open_ip, UDP(dport=9998) / b"MAC")])
        time.sleep(0.5)
        assert not sniffer.saw(lambda f: f.haslayer("UDP") and f["UDP"].dport == 9998)
    finally:
        sniffer.close()
    assert wait_until(lambda: guard_drops(lab, "g/bad").get("source MAC is not the pod's", 0) >= 1, 10)


def test_arp_and_neighbour_advertisements_claiming_another_pod_change_nothing(lab: Lab) -> None:
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import ARP, Ether

    node1 = node_netns(lab, "node1")
    good4, good6 = pod_ips(lab, "g/good")[4], pod_ips(lab, "g/good")[6]
    mac = pod_mac(lab, "g/bad")

    def neighbours() -> list[dict[str, Any]]:
        found = run_in(node1, ["ip", "-j", "neigh", "show"], check=True).stdout
        return [n for n in json.loads(found) if n.get("dst") in (good4, good6)]

    before = neighbours()
    gratuitous = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=mac, psrc=good4, hwdst=mac, pdst=good4)
    advert = (
        Ether(src=mac, dst="33:33:00:00:00:01")
        / IPv6(src=good6, dst="ff02::1")
        / ICMPv6ND_NA(tgt=good6, R=0, S=0, O=1)
        / ICMPv6NDOptDstLLAddr(lladdr=mac)
    )
    send_frames(pod_netns(lab, "g/bad"), [bytes(gratuitous), bytes(advert)])
    time.sleep(0.5)
    assert neighbours() == before
    assert all(n["lladdr"] == pod_mac(lab, "g/good") for n in neighbours())
    drops = guard_drops(lab, "g/bad")
    assert drops.get("ARP claiming another address", 0) >= 1, drops
    assert (
        drops.get("router or unsolicited neighbour advertisement", 0) + drops.get("source address is not the pod's", 0)
        >= 1
    ), drops


def test_the_node_answers_no_arp_on_a_pods_veth_for_its_own_addresses(lab: Lab) -> None:
    from scapy.layers.l2 import ARP, Ether

    mac = pod_mac(lab, "g/bad")
    bad = pod_ips(lab, "g/bad")[4]
    sniffer = Sniffer(pod_netns(lab, "g/bad"))
    try:
        who_has = Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(
            op=1, hwsrc=mac, psrc=bad, pdst=node_ips(lab, "node1")[4]
        )
        send_frames(pod_netns(lab, "g/bad"), [bytes(who_has)] * 3)
        time.sleep(0.5)
        assert not sniffer.saw(lambda f: f.haslayer("ARP") and f["ARP"].op == 2)
    finally:
        sniffer.close()


# -- tunnels ------------------------------------------------------------------------------------------


def _vxlan_payload(lab: Lab) -> bytes:
    """A VXLAN header and the frame in it: a packet to g/srv2 (node2) claiming to be g/good's."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.layers.vxlan import VXLAN

    from tulle.routing.compile import vxlan_mac

    inner = (
        Ether(src=vxlan_mac("node1", 4), dst=vxlan_mac("node2", 4))
        / IP(src=pod_ips(lab, "g/good")[4], dst=pod_ips(lab, "g/srv2")[4])
        / UDP(sport=5353, dport=9999)
        / b"VXLAN-INJECT"
    )
    return bytes(VXLAN(vni=4096, flags=0x08) / inner)


def _vxlan_frame(lab: Lab, outer_src_mac: str, outer_src: str, outer_dst: str) -> bytes:
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Ether
    from scapy.packet import Raw

    outer = IP(src=outer_src, dst=outer_dst) / UDP(sport=45000, dport=4789) / Raw(_vxlan_payload(lab))
    return bytes(Ether(src=outer_src_mac, dst=HOST_MAC) / outer)


def test_vxlan_injected_by_a_pod_or_the_external_host_is_dropped(lab: Lab) -> None:
    witness = UdpWitness(pod_netns(lab, "g/srv2"), 4)
    node2 = node_ips(lab, "node2")[4]
    try:
        assert udp_echo(pod_netns(lab, "g/good"), pod_ips(lab, "g/srv2")[4])  # the policy admits good
        # from a pod: its own source (a forged one is dropped as a spoofed source anyway)
        mac = pod_mac(lab, "g/bad")
        send_frames(pod_netns(lab, "g/bad"), [_vxlan_frame(lab, mac, pod_ips(lab, "g/bad")[4], node2)] * 3)
        # from the external host, on the underlay
        external = state(lab)["external"]["netns"]

        payload = _vxlan_payload(lab)

        def from_outside() -> None:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(3):
                    s.sendto(payload, (node2, 4789))

        run_in_netns(f"/run/netns/{external}", from_outside)
        time.sleep(1.0)
        assert witness.seen == [pod_ips(lab, "g/good")[4]], witness.seen
    finally:
        witness.close()


def test_a_pods_own_udp_4789_to_the_world_is_masqueraded_and_policed(lab: Lab) -> None:
    st = state(lab)
    external = f"/run/netns/{st['external']['netns']}"
    target = next(a for a in st["external"]["addresses"] if ":" not in a).split("/")[0]
    witness = UdpWitness(external, 4, port=4789)
    try:
        assert udp_echo(pod_netns(lab, "g/open"), target, port=4789)
        assert witness.seen and witness.seen[-1] == node_ips(lab, "node1")[4], witness.seen  # masqueraded
        deny = {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": "no-egress", "namespace": "g"},
            "spec": {"podSelector": {"matchLabels": {}}, "policyTypes": ["Egress"]},
        }
        path = os.path.join(lab.dir, "no-egress.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(deny, f)
        subprocess.run([TULLE, "apply", "-f", path, "--lab", lab.name], check=True, capture_output=True)
        try:
            assert wait_until(lambda: not udp_echo(pod_netns(lab, "g/open"), target, port=4789), 10)
        finally:
            subprocess.run([TULLE, "delete", "netpol", "no-egress", "-n", "g", "--lab", lab.name], capture_output=True)
    finally:
        witness.close()


# -- connection tracking ------------------------------------------------------------------------------


def test_one_pods_connection_flood_stays_within_its_limit_and_others_go_on(lab: Lab) -> None:
    from scapy.layers.inet import TCP

    bad, mac = pod_ips(lab, "g/bad")[4], pod_mac(lab, "g/bad")
    flood = [
        ip_frame(mac, bad, f"10.244.{200 + i // 250}.{i % 250 + 1}", TCP(sport=20000 + i, dport=80, flags="S"))
        for i in range(5 * CONNECTION_LIMIT)
    ]
    send_frames(pod_netns(lab, "g/bad"), flood)
    tracked = run_in(node_netns(lab, "node1"), ["conntrack", "-L", "-s", bad], timeout=30).stdout
    assert 0 < tracked.count("\n") <= CONNECTION_LIMIT + 10, tracked.count("\n")
    assert guard_drops(lab, "g/bad").get("over the pod's connection limit", 0) >= 3 * CONNECTION_LIMIT
    # another pod's new flows, each its own tracked connection with replies, all get through
    srv = pod_ips(lab, "g/srv")[4]

    def flows() -> int:
        answered = 0
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(1.0)
                s.sendto(b"flow", (srv, 9999))
                try:
                    answered += s.recvfrom(64)[0] == b"flow"
                except TimeoutError:
                    pass
        return answered

    witness = UdpWitness(pod_netns(lab, "g/srv"), 4)
    try:
        assert run_in_netns(pod_netns(lab, "g/good"), flows) == 50
    finally:
        witness.close()


# -- allowed source prefixes ----------------------------------------------------------------------


def _annotate(lab: Lab, pod: str, value: str | None) -> None:
    namespace, name = pod.split("/")

    def write(store: Datastore) -> None:
        obj = store.get(POD, name, namespace)
        assert obj is not None
        annotations = obj["metadata"].setdefault("annotations", {})
        if value is None:
            annotations.pop(ALLOWED_SOURCE_PREFIXES, None)
        else:
            annotations[ALLOWED_SOURCE_PREFIXES] = value
        store.update(obj)

    lab.with_store(state(lab), write)


def _endpoint_problems(lab: Lab, pod: str) -> tuple[str, ...]:
    namespace, name = pod.split("/")
    objects = lab.with_store(state(lab), lambda store: store.list(WORKLOAD_ENDPOINT, namespace)[0])
    return next(WorkloadEndpoint.from_object(o).problems for o in objects if o["spec"]["pod"] == name)


def test_an_allowed_source_annotation_lets_its_prefix_through_and_a_bad_one_nothing(lab: Lab) -> None:
    routed = "192.168.77.5"
    open_ip = pod_ips(lab, "g/open")[4]
    witness = UdpWitness(pod_netns(lab, "g/open"), 4, port=9997)
    sender = pod_netns(lab, "g/good")
    run_in(sender, ["ip", "addr", "add", f"{routed}/32", "dev", "eth0"], check=True)

    def send() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((routed, 0))
            s.sendto(b"routed", (open_ip, 9997))

    try:
        run_in_netns(sender, send)
        time.sleep(0.5)
        assert routed not in witness.seen
        _annotate(lab, "g/good", '["192.168.77.5/24"]')  # host bits set: malformed
        assert wait_until(lambda: bool(_endpoint_problems(lab, "g/good")), 10)
        assert "192.168.77.5/24" in _endpoint_problems(lab, "g/good")[0]
        run_in_netns(sender, send)
        time.sleep(0.5)
        assert routed not in witness.seen
        _annotate(lab, "g/good", '["192.168.77.0/24"]')
        assert wait_until(lambda: not _endpoint_problems(lab, "g/good"), 10)

        def arrives() -> bool:
            run_in_netns(sender, send)
            time.sleep(0.2)
            return routed in witness.seen

        assert wait_until(arrives, 10)
    finally:
        _annotate(lab, "g/good", None)
        run_in(sender, ["ip", "addr", "del", f"{routed}/32", "dev", "eth0"])
        witness.close()


# -- the control plane ---------------------------------------------------------------------------------


def _tcp_open(netns: str, address: str, port: int) -> bool:
    def connect() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect((address, port))
                return True
            except OSError:
                return False

    return bool(run_in_netns(netns, connect))


def test_a_pod_cannot_open_the_datastores_port_but_reaches_the_nodes_other_services(lab: Lab) -> None:
    etcd = state(lab)["etcd"]["url"].split("//")[1].split(":")[0]
    pod = pod_netns(lab, "g/open")
    assert _tcp_open(node_netns(lab, "node1"), etcd, 2379)  # the node itself reaches it
    assert not _tcp_open(pod, etcd, 2379)
    # a service on the node (a kubelet, a node port, ...) stays reachable from pods
    node1 = node_ips(lab, "node1")[4]

    def listen() -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((node1, 18080))
        s.listen(4)
        return s

    server = run_in_netns(node_netns(lab, "node1"), listen)
    try:
        assert _tcp_open(pod, node1, 18080)
    finally:
        server.close()
    assert guard_drops(lab, "g/open").get("to the control plane", 0) >= 1
