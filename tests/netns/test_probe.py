"""probe.py against real namespaces: two pods behind a router, servers in both, an nft drop in one.

Topology (everything lives in namespaces named tpc<id><role>; nothing is created in the root
namespace, so no test traffic can leave them):

    tpc<id>a  tpc-ar 10.250.1.2/24 fd50:1::2/64 --- tpc-ra 10.250.1.1 fd50:1::1  tpc<id>r (router)
    tpc<id>b  tpc-br 10.250.2.2/24 fd50:2::2/64 --- tpc-rb 10.250.2.1 fd50:2::1

Pod b drops TCP and UDP to port 81 arriving on its veth (not on lo, so b still reaches itself, as a
pod always does under NetworkPolicy).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tulle.lab.probe import ServerSet, probe, probe_matrix

pytestmark = pytest.mark.root

TIMEOUT = 0.5
ADDRESSES = {
    4: {"a": "10.250.1.2", "b": "10.250.2.2"},
    6: {"a": "fd50:1::2", "b": "fd50:2::2"},
}
DROP_81_ON_VETH = """
table inet tpc_probe_test {
    chain input {
        type filter hook input priority 0; policy accept;
        iifname "tpc-br" tcp dport 81 drop
        iifname "tpc-br" udp dport 81 drop
    }
}
"""


@dataclass(frozen=True)
class Pods:
    a: str  # netns path
    b: str
    router: str

    def path(self, pod: str) -> str:
        return {"a": self.a, "b": self.b}[pod]


def _run(*argv: str, stdin: str | None = None) -> None:
    subprocess.run(argv, check=True, input=stdin, text=True, capture_output=True)


def _build(prefix: str) -> None:
    router, a, b = f"{prefix}r", f"{prefix}a", f"{prefix}b"
    for ns in (router, a, b):
        _run("ip", "netns", "add", ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")
        # No duplicate address detection: a tentative link-local address delays the first probes.
        _run("ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv6.conf.default.accept_dad=0")
    _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv4.ip_forward=1")
    _run("ip", "netns", "exec", router, "sysctl", "-qw", "net.ipv6.conf.all.forwarding=1")
    for pod, subnet in ((a, 1), (b, 2)):
        side = pod[-1]
        outer, inner = f"tpc-r{side}", f"tpc-{side}r"
        _run("ip", "-n", router, "link", "add", outer, "type", "veth", "peer", "name", inner, "netns", pod)
        _run("ip", "-n", router, "addr", "add", f"10.250.{subnet}.1/24", "dev", outer)
        _run("ip", "-n", router, "addr", "add", f"fd50:{subnet}::1/64", "dev", outer, "nodad")
        _run("ip", "-n", router, "link", "set", outer, "up")
        _run("ip", "netns", "exec", pod, "sysctl", "-qw", f"net.ipv6.conf.{inner}.accept_dad=0")
        _run("ip", "-n", pod, "addr", "add", f"10.250.{subnet}.2/24", "dev", inner)
        _run("ip", "-n", pod, "addr", "add", f"fd50:{subnet}::2/64", "dev", inner, "nodad")
        _run("ip", "-n", pod, "link", "set", inner, "up")
        _run("ip", "-n", pod, "route", "add", "default", "via", f"10.250.{subnet}.1")
        _run("ip", "-n", pod, "-6", "route", "add", "default", "via", f"fd50:{subnet}::1")
    _run("ip", "netns", "exec", b, "nft", "-f", "-", stdin=DROP_81_ON_VETH)


@pytest.fixture(scope="module")
def pods() -> Iterator[Pods]:
    prefix = f"tpc{uuid.uuid4().hex[:6]}"
    try:
        _build(prefix)
        yield Pods(a=f"/run/netns/{prefix}a", b=f"/run/netns/{prefix}b", router=f"/run/netns/{prefix}r")
    finally:
        for role in "abr":
            subprocess.run(["ip", "netns", "del", f"{prefix}{role}"], capture_output=True)


@pytest.fixture(scope="module")
def servers(pods: Pods) -> Iterator[ServerSet]:
    with ServerSet([pods.a, pods.b]) as server_set:
        yield server_set


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_open_port_is_reachable_and_dropped_port_is_not(
    pods: Pods, servers: ServerSet, family: int, protocol: str
) -> None:
    b = ADDRESSES[family]["b"]
    a = ADDRESSES[family]["a"]
    assert probe(pods.a, b, 80, protocol, TIMEOUT) is True
    started = time.monotonic()
    assert probe(pods.a, b, 81, protocol, TIMEOUT) is False
    assert time.monotonic() - started < TIMEOUT * 2, "a dropped probe must give up after its timeout"
    assert probe(pods.b, a, 81, protocol, TIMEOUT) is True  # the drop is b's, not a's
    assert probe(pods.b, b, 81, protocol, TIMEOUT) is True  # b reaches itself over lo


@pytest.mark.parametrize("family", [4, 6])
@pytest.mark.parametrize("protocol", ["TCP", "UDP"])
def test_closed_port_is_unreachable_without_waiting(pods: Pods, servers: ServerSet, family: int, protocol: str) -> None:
    started = time.monotonic()
    assert probe(pods.a, ADDRESSES[family]["b"], 82, protocol, timeout=5.0) is False
    assert time.monotonic() - started < 2.0, "a reset or ICMP port unreachable ends the probe at once"


@pytest.mark.parametrize("family", [4, 6])
def test_probe_matrix_runs_all_cells_at_once(pods: Pods, servers: ServerSet, family: int) -> None:
    netns = {"a": pods.a, "b": pods.b}
    started = time.monotonic()
    matrix = probe_matrix(netns, ADDRESSES[family], 81, "UDP", timeout=TIMEOUT)
    elapsed = time.monotonic() - started
    assert matrix == {("a", "a"): True, ("a", "b"): False, ("b", "a"): True, ("b", "b"): True}
    assert elapsed < TIMEOUT * 2.5, f"the matrix took {elapsed:.2f} s: probes did not run concurrently"
    assert probe_matrix(netns, ADDRESSES[family], 80, "TCP", timeout=TIMEOUT) == {
        ("a", "a"): True,
        ("a", "b"): True,
        ("b", "a"): True,
        ("b", "b"): True,
    }


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_stop_closes_every_socket(pods: Pods) -> None:
    router = "10.250.1.1"  # nothing else serves in the router namespace
    before = _open_fds()
    server_set = ServerSet([pods.router])
    server_set.start()
    assert server_set.listening == 8  # 2 families x 2 ports x TCP and UDP
    assert probe(pods.a, router, 80, "TCP", TIMEOUT) is True
    server_set.stop()
    assert server_set.listening == 0
    assert _open_fds() <= before
    assert probe(pods.a, router, 80, "TCP", TIMEOUT) is False


def test_failed_start_leaves_no_socket_open(pods: Pods, servers: ServerSet) -> None:
    before = _open_fds()
    clash = ServerSet([pods.router, pods.a])  # the router's listeners open, then a's clash
    with pytest.raises(OSError, match=r"cannot serve .* in /run/netns/tpc"):
        clash.start()
    assert clash.listening == 0
    assert _open_fds() <= before
