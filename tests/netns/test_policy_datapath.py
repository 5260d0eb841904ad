"""The policy datapath in a real kernel: a node namespace with three pods, real packets.

Every namespace and interface here starts with `tpa` and is removed at the end, even on
failure. Pods are plumbed with tulle.dataplane.podnet; the node's table is exactly
`policy_table(...)` applied by NftReconciler; packets are real TCP and UDP from sockets opened
inside the pod namespaces, and crafted SCTP INITs (the kernel has no SCTP sockets).
"""

from __future__ import annotations

import os
import secrets
import socket
import struct
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from tulle.dataplane import podnet
from tulle.dataplane.conntrack import delete_connections, list_connections
from tulle.dataplane.host import node_addresses
from tulle.dataplane.netns import run_in_netns
from tulle.dataplane.nft import NftReconciler
from tulle.lab.probe import sctp_init_seen
from tulle.policy.compiler import EGRESS, INGRESS, PolicyModel, compile_policies
from tulle.policy.cutting import connections_to_cut
from tulle.policy.datapath import counter_name, policy_table
from tulle.policy.inputs import inputs_from_objects

pytestmark = pytest.mark.root

DENIED_WAIT = 0.4  # seconds to wait for a packet that policy drops
NODE_V4, NODE_V6 = "10.200.0.1", "fd00:200::1"


@dataclass(frozen=True)
class Pod:
    name: str
    namespace: str  # Kubernetes namespace
    netns: str  # /run/netns/...
    v4: str
    v6: str
    labels: dict[str, str]

    def address(self, family: int) -> str:
        return self.v4 if family == 4 else self.v6

    def obj(self) -> dict[str, Any]:
        return {
            "kind": "Pod",
            "metadata": {"name": self.name, "namespace": self.namespace, "labels": self.labels},
            "spec": {"containers": [{"name": "main", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"podIPs": [{"ip": self.v4}, {"ip": self.v6}]},
        }


@dataclass(frozen=True)
class Node:
    netns: str
    pods: dict[str, Pod]

    def local_ips(self) -> list[str]:
        return [a for p in self.pods.values() for a in (p.v4, p.v6)]


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def _sysctl(path: str, value: str) -> None:
    with open(os.path.join("/proc/sys", path), "w") as f:
        f.write(value)


def _node_setup() -> None:
    _sysctl("net/ipv4/ip_forward", "1")
    _sysctl("net/ipv6/conf/all/forwarding", "1")
    _ip("link", "set", "lo", "up")
    _ip("addr", "add", f"{NODE_V4}/32", "dev", "lo")
    _ip("-6", "addr", "add", f"{NODE_V6}/128", "dev", "lo", "nodad")


@pytest.fixture(scope="module")
def node() -> Iterator[Node]:
    tag = secrets.token_hex(3)
    names = [f"tpa{tag}{suffix}" for suffix in ("n", "a", "b", "c")]
    created: list[str] = []
    try:
        for name in names:
            _ip("netns", "add", name)
            created.append(name)
        node_ns = f"/run/netns/{names[0]}"
        run_in_netns(node_ns, _node_setup)
        pods = {}
        for i, (key, ns, labels) in enumerate(
            [("a", "x", {"app": "a"}), ("b", "x", {"app": "b"}), ("c", "y", {"app": "c"})], start=2
        ):
            pod = Pod(key, ns, f"/run/netns/{names[i - 1]}", f"10.244.1.{i}", f"fd00:10:244:1::{i}", labels)
            iface = podnet.PodInterface(
                netns=pod.netns,
                ifname="tpa0",
                host_ifname=f"tpa{tag}{key}",
                addresses=(f"{pod.v4}/32", f"{pod.v6}/128"),
                mtu=1500,
            )
            run_in_netns(node_ns, lambda iface=iface: podnet.create(iface))  # type: ignore[misc]
            pods[key] = pod
        yield Node(node_ns, pods)
    finally:
        for name in reversed(created):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)


# -- helpers -------------------------------------------------------------------------------------


def netpol(ns: str, name: str, **spec: Any) -> dict[str, Any]:
    spec.setdefault("podSelector", {})
    return {"kind": "NetworkPolicy", "metadata": {"name": name, "namespace": ns}, "spec": spec}


def app(value: str) -> dict[str, Any]:
    return {"matchLabels": {"app": value}}


NAMESPACES = [
    {"kind": "Namespace", "metadata": {"name": "x", "labels": {"team": "x"}}},
    {"kind": "Namespace", "metadata": {"name": "y", "labels": {"team": "y"}}},
]


def apply(
    node: Node, policies: list[dict[str, Any]], previous: PolicyModel | None = None
) -> tuple[PolicyModel, list[Any]]:
    pods = [p.obj() for p in node.pods.values()]
    model = compile_policies(inputs_from_objects(NAMESPACES, pods, policies, []), previous)
    table = policy_table(model, node.local_ips())
    commands = run_in_netns(node.netns, lambda: NftReconciler().apply(table))
    return model, commands


def cut_denied(node: Node, model: PolicyModel) -> int:
    """What the agent does after a policy change: list (dataplane), decide (policy), delete (dataplane)."""

    def cut() -> int:
        doomed = connections_to_cut(model, node.local_ips(), list_connections(), node_addresses())
        return delete_connections(doomed) if doomed else 0

    return run_in_netns(node.netns, cut)


def counters(node: Node) -> dict[str, int]:
    return {
        name: packets for name, (packets, _) in run_in_netns(node.netns, lambda: NftReconciler().counters()).items()
    }


def _family(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


def listen(netns: str, family: int, address: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    def make() -> socket.socket:
        s = socket.socket(_family(family), kind)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((address, port))
        if kind == socket.SOCK_STREAM:
            s.listen(8)
        s.settimeout(DENIED_WAIT)
        return s

    return run_in_netns(netns, make)


def connect(netns: str, family: int, address: str, port: int) -> socket.socket | None:
    """A connected TCP socket made inside netns, or None if the SYN got no answer in time."""

    def make() -> socket.socket | None:
        s = socket.socket(_family(family), socket.SOCK_STREAM)
        s.settimeout(DENIED_WAIT)
        try:
            s.connect((address, port))
        except (TimeoutError, OSError):
            s.close()
            return None
        return s

    return run_in_netns(netns, make)


def tcp_ok(src_netns: str, family: int, dst: Pod | str, port: int, dst_netns: str | None = None) -> bool:
    address = dst if isinstance(dst, str) else dst.address(family)
    server = listen(dst_netns or (dst.netns if isinstance(dst, Pod) else ""), family, address, port)
    try:
        client = connect(src_netns, family, address, port)
        if client is None:
            return False
        client.close()
        conn, _ = server.accept()
        conn.close()
        return True
    finally:
        server.close()


def udp_ok(src: Pod, family: int, dst: Pod, port: int) -> bool:
    server = listen(dst.netns, family, dst.address(family), port, socket.SOCK_DGRAM)
    try:

        def send() -> None:
            with socket.socket(_family(family), socket.SOCK_DGRAM) as s:
                s.sendto(b"ping", (dst.address(family), port))

        run_in_netns(src.netns, send)
        try:
            return server.recv(64) == b"ping"
        except TimeoutError:
            return False
    finally:
        server.close()


def exchange(client: socket.socket, server: socket.socket) -> bool:
    """True if a few bytes from the client reach the server over an established connection."""
    try:
        client.sendall(b"data")
        return server.recv(16) == b"data"
    except (TimeoutError, OSError):
        return False


def sctp_init_reaches(src: Pod, family: int, dst: Pod, port: int) -> bool:
    """Send a crafted SCTP INIT from src and look for it on a raw socket at dst."""
    return sctp_init_seen(src.netns, dst.netns, dst.address(family), port, DENIED_WAIT)


# -- tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", [4, 6])
def test_allowed_flows_pass_denied_flows_are_dropped_and_counted(node: Node, family: int) -> None:
    """I9: replies and the node's own traffic pass; denied flows are dropped and counted per endpoint."""
    a, b, c = node.pods["a"], node.pods["b"], node.pods["c"]
    base = 2000 + family * 100
    apply(
        node,
        [
            netpol(
                "x",
                "b-from-a",
                podSelector=app("b"),
                ingress=[
                    {
                        "from": [{"podSelector": app("a")}],
                        "ports": [
                            {"port": "http"},
                            {"port": base, "endPort": base + 9},
                            {"protocol": "UDP", "port": base},
                        ],
                    }
                ],
            ),
            netpol(
                "y",
                "c-out",
                podSelector=app("c"),
                policyTypes=["Egress"],
                egress=[{"ports": [{"protocol": "UDP", "port": base + 1}]}],
            ),
        ],
    )
    before = counters(node)
    b_in, c_out = counter_name(INGRESS, b.address(family)), counter_name(EGRESS, c.address(family))

    assert tcp_ok(a.netns, family, b, 8080)  # named port http
    assert tcp_ok(a.netns, family, b, base + 5)  # endPort range
    assert udp_ok(a, family, b, base)
    assert not tcp_ok(a.netns, family, b, base + 10)
    assert not udp_ok(a, family, b, base + 1)
    assert not tcp_ok(c.netns, family, b, 8080)  # c: wrong peer, and its egress allows only UDP
    assert counters(node)[b_in] == before[b_in] + 2
    assert counters(node)[c_out] == before[c_out] + 1
    # b is not isolated for egress, a not at all; c's egress reaches a only on UDP base+1.
    assert tcp_ok(b.netns, family, a, base + 20)
    assert udp_ok(c, family, a, base + 1)
    assert not tcp_ok(c.netns, family, a, base + 21)
    assert counters(node)[c_out] == before[c_out] + 2
    # Egress applies to pod -> node traffic too (input hook) ...
    node_address = NODE_V4 if family == 4 else NODE_V6
    assert not tcp_ok(c.netns, family, node_address, base + 30, dst_netns=node.netns)
    assert counters(node)[c_out] == before[c_out] + 3
    # ... and the node's own traffic reaches an isolated pod (output hook: Kubernetes allows it).
    assert tcp_ok(node.netns, family, b, base + 31)


@pytest.mark.parametrize("family", [4, 6])
def test_established_connections_survive_allowed_updates_and_are_cut_when_denied(node: Node, family: int) -> None:
    """I8: an update that keeps a connection allowed never cuts it; one that denies it does."""
    a, b = node.pods["a"], node.pods["b"]
    port = 3000 + family
    allow_a = netpol("x", "b-from-a", podSelector=app("b"), ingress=[{"from": [{"podSelector": app("a")}]}])
    model, _ = apply(node, [allow_a])
    server = listen(b.netns, family, b.address(family), port)
    client = connect(a.netns, family, b.address(family), port)
    assert client is not None
    conn, _ = server.accept()
    conn.settimeout(DENIED_WAIT)
    try:
        assert exchange(client, conn)
        # An update that keeps the connection allowed: nothing is cut, data still flows.
        also = netpol("x", "b-web", podSelector=app("b"), ingress=[{"ports": [{"port": 443}]}])
        model, commands = apply(node, [allow_a, also], model)
        assert not [c for c in commands if "rule" in c.get("add", {}) or "chain" in c.get("add", {})]
        assert cut_denied(node, model) == 0
        assert exchange(client, conn)
        # Now deny it: conntrack still carries the established connection until it is cut.
        model, _ = apply(node, [also], model)
        assert exchange(client, conn)
        cut = cut_denied(node, model)
        assert cut >= 1
        assert not exchange(client, conn)
        remaining = run_in_netns(node.netns, list_connections)
        assert not [
            x for x in remaining if x.dst == b.address(family) and x.dport == port and x.src == a.address(family)
        ]
    finally:
        # Reset rather than close: a closing socket would retransmit its FIN or data for seconds
        # (and the other side answer with resets into the denied path), counted against the next test.
        for s in (client, conn):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
        server.close()


@pytest.mark.parametrize("family", [4, 6])
def test_sctp_rules_match_crafted_sctp(node: Node, family: int) -> None:
    a, b, c = node.pods["a"], node.pods["b"], node.pods["c"]
    port = 7000 + family
    apply(
        node,
        [
            netpol(
                "x",
                "b-sctp",
                podSelector=app("b"),
                ingress=[
                    {
                        "from": [{"namespaceSelector": {}, "podSelector": app("a")}],
                        "ports": [{"protocol": "SCTP", "port": port}],
                    }
                ],
            )
        ],
    )
    b_in = counter_name(INGRESS, b.address(family))
    before = counters(node)[b_in]
    assert sctp_init_reaches(a, family, b, port)
    assert not sctp_init_reaches(a, family, b, port + 1)
    assert not sctp_init_reaches(c, family, b, port)
    assert not tcp_ok(a.netns, family, b, port)  # the rule is for SCTP only
    assert counters(node)[b_in] == before + 3


def test_updates_touch_elements_never_chains(node: Node) -> None:
    """I2: once the chains exist, a policy, label or pod change sends only element and counter changes."""
    apply(node, [])
    b_from_a = netpol("x", "b-from-a", podSelector=app("b"), ingress=[{"from": [{"podSelector": app("a")}]}])
    on_port = netpol(
        "x",
        "b-80",
        podSelector=app("b"),
        ingress=[{"from": [{"podSelector": app("c")}], "ports": [{"port": 80}]}],
    )
    c_from_x = netpol(
        "y",
        "c-from-x",
        podSelector=app("c"),
        ingress=[{"from": [{"namespaceSelector": {"matchLabels": {"team": "x"}}}]}],
    )
    model: PolicyModel | None = None
    sent = []
    for policies in ([b_from_a], [b_from_a, on_port], [b_from_a, on_port, c_from_x], [c_from_x], []):
        model, commands = apply(node, policies, model)
        sent.append(commands)
        again = apply(node, policies, model)[1]
        assert again == []  # nothing differs: nothing is sent
    for commands in sent:
        kinds = {next(iter(op[verb])) for op in commands for verb in op}
        assert kinds <= {"element", "counter"}, kinds
