"""Helpers for tests that run a lab: unique names, guaranteed teardown, traffic in namespaces.

All traffic stays inside the lab's namespaces; every namespace and interface the lab makes
carries the lab's name, which is unique per test, except the namespaces podman makes for its
pods (`netns-<uuid>`, checked by the podman tests), and `lab down` removes them all even when
the test fails.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from tulle.dataplane.netns import run_in_netns
from tulle.lab import state as lab_state
from tulle.lab.cluster import Lab


def unique_lab_name(tag: str) -> str:
    """A lab name of 8 characters at most: 't', a 2-letter tag, 5 random hex digits."""
    return f"t{tag[:2]}{secrets.token_hex(3)[:5]}"


@contextmanager
def running_lab(tag: str, nodes: int = 3, mode: str = "vxlan", **kwargs: Any) -> Iterator[Lab]:
    lab = Lab(unique_lab_name(tag))
    try:
        lab.up(nodes=nodes, mode=mode, **kwargs)
        yield lab
    finally:
        lab.down()


def state(lab: Lab) -> dict[str, Any]:
    return lab_state.load(lab.name)


def pod_ips(lab: Lab, pod: str) -> dict[int, str]:
    ips = state(lab)["pods"][pod]["ips"]
    return {ipaddress.ip_address(a).version: a for a in ips}


def node_ips(lab: Lab, node: str) -> dict[int, str]:
    ips = state(lab)["nodes"][node]["addresses"]
    return {ipaddress.ip_address(a).version: a for a in ips}


def pod_netns(lab: Lab, pod: str) -> str:
    return str(state(lab)["pods"][pod]["netns"])


def node_netns(lab: Lab, node: str) -> str:
    return f"/run/netns/{lab.names.node(node)}"


def run_in(
    netns_path: str, argv: list[str], timeout: float = 30, check: bool = False
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nsenter", f"--net={netns_path}", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def ping(netns_path: str, address: str, count: int = 3, size: int | None = None, dont_fragment: bool = False) -> bool:
    """True if any of `count` echo requests is answered (one lost to neighbour discovery is fine)."""
    argv = ["ping", "-n", "-c", str(count), "-W", "1", "-i", "0.2"]
    if size is not None:
        argv += ["-s", str(size)]
    if dont_fragment:
        argv += ["-M", "do"]
    return run_in(netns_path, [*argv, address]).returncode == 0


def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


class UdpWitness:
    """A UDP server inside a namespace that records the source address of what it receives."""

    def __init__(self, netns_path: str, family: int, port: int = 9999) -> None:
        af = socket.AF_INET if family == 4 else socket.AF_INET6

        def make() -> socket.socket:
            s = socket.socket(af, socket.SOCK_DGRAM)
            s.bind(("0.0.0.0" if family == 4 else "::", port))
            s.settimeout(0.2)
            return s

        self.sock = run_in_netns(netns_path, make)
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(2048)
            except TimeoutError:
                continue
            except OSError:
                return
            self.seen.append(peer[0])
            self.sock.sendto(data, peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def udp_echo(netns_path: str, address: str, port: int = 9999, timeout: float = 1.0) -> bool:
    def send() -> bool:
        with socket.socket(_family(address), socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            s.sendto(b"hello", (address, port))
            try:
                return s.recvfrom(2048)[0] == b"hello"
            except TimeoutError:
                return False

    return run_in_netns(netns_path, send)


class TcpEcho:
    """A TCP echo server inside a namespace (one thread per connection)."""

    def __init__(self, netns_path: str, family: int, port: int = 7777) -> None:
        af = socket.AF_INET if family == 4 else socket.AF_INET6

        def make() -> socket.socket:
            s = socket.socket(af, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("0.0.0.0" if family == 4 else "::", port))
            s.listen(16)
            s.settimeout(0.2)
            return s

        self.sock = run_in_netns(netns_path, make)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    @staticmethod
    def _echo(conn: socket.socket) -> None:
        with conn:
            while True:
                try:
                    data = conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                conn.sendall(data)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self.sock.close()


def tcp_connect(netns_path: str, address: str, port: int = 7777, timeout: float = 2.0) -> socket.socket:
    def connect() -> socket.socket:
        s = socket.socket(_family(address), socket.SOCK_STREAM)
        s.settimeout(timeout)
        s.connect((address, port))
        return s

    return run_in_netns(netns_path, connect)


def tcp_roundtrip(sock: socket.socket, payload: bytes = b"ping") -> bool:
    try:
        sock.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = sock.recv(65536)
            if not chunk:
                return False
            got += chunk
        return got == payload
    except OSError:
        return False


def tcp_reachable(netns_path: str, address: str, port: int = 7777) -> bool:
    try:
        with tcp_connect(netns_path, address, port, timeout=1.0) as s:
            return tcp_roundtrip(s)
    except OSError:
        return False


def routes(netns_path: str, family: int = 4) -> list[dict[str, Any]]:
    proc = run_in(netns_path, ["ip", "-j", f"-{family}", "route", "show"], check=True)
    data: list[dict[str, Any]] = json.loads(proc.stdout)
    return data


def link_stats(netns_path: str, ifname: str) -> dict[str, int]:
    proc = run_in(netns_path, ["ip", "-j", "-s", "link", "show", "dev", ifname], check=True)
    data = json.loads(proc.stdout)[0]["stats64"]
    return {"rx": int(data["rx"]["packets"]), "tx": int(data["tx"]["packets"])}


def nft_ruleset(netns_path: str) -> dict[str, Any]:
    proc = run_in(netns_path, ["nft", "-j", "-a", "list", "table", "inet", "tulle"], check=True)
    data: dict[str, Any] = json.loads(proc.stdout)
    return data


def kernel_state(netns_path: str) -> dict[str, Any]:
    """What must not change for running pods when the agent restarts."""
    links = json.loads(run_in(netns_path, ["ip", "-j", "link", "show"], check=True).stdout)
    addrs = json.loads(run_in(netns_path, ["ip", "-j", "addr", "show"], check=True).stdout)
    rules = [(r["rule"]["chain"], r["rule"]["handle"]) for r in nft_ruleset(netns_path)["nftables"] if "rule" in r]
    return {
        "links": sorted((link["ifindex"], link["ifname"], link.get("address")) for link in links),
        "addresses": sorted(
            (a["ifname"], i["local"], i["prefixlen"])
            for a in addrs
            for i in a.get("addr_info", [])
            if i.get("scope") == "global"
        ),
        "routes4": sorted(json.dumps(r, sort_keys=True) for r in routes(netns_path, 4)),
        "routes6": sorted(
            json.dumps(r, sort_keys=True) for r in routes(netns_path, 6) if not r["dst"].startswith("fe80")
        ),
        "nft_rule_handles": sorted(rules),
    }


def lab_leftovers(name: str) -> list[str]:
    """Everything of a lab that `lab down` must have removed."""
    found = []
    found += (
        [f"namespace {n}" for n in os.listdir("/run/netns") if n.startswith(f"{name}-")]
        if os.path.isdir("/run/netns")
        else []
    )
    with open("/proc/mounts") as f:
        found += [f"mount {line.split()[1]}" for line in f if name in line]
    links = json.loads(subprocess.run(["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)
    found += [f"interface {link['ifname']}" for link in links if name in link["ifname"]]
    if os.path.exists(lab_state.lab_dir(name)):
        found.append(f"folder {lab_state.lab_dir(name)}")
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"/{name}/" in cmdline or f"{name}-etcd" in cmdline:
            found.append(f"process {pid}: {cmdline[:120]}")
    return found
