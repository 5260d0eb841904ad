"""`make demo` / `tulle demo`: a 3-node dual-stack lab, pods, traffic and a NetworkPolicy.

What it shows, in order: the lab coming up (etcd, one agent per node); six pods, two per node;
the connectivity matrix (ping and TCP, IPv4 and IPv6) between every pair; what an outside host
sees of a pod (the node's address: masquerade); pod-to-pod throughput across nodes; then a
NetworkPolicy that lets only the api pods reach the database, its effect on the matrix, the
explanation `tulle policy trace` gives, and the drops the node counted. It tears the lab down at
the end unless asked to keep it.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import yaml

from tulle.dataplane.netns import run_in_netns
from tulle.datastore.base import AtomicWriter, Datastore
from tulle.lab.cluster import Lab
from tulle.lab.probe import ServerSet, probe_matrix
from tulle.lab.state import load
from tulle.model.kinds import NAMESPACE, NETWORK_POLICY, POD, WORKLOAD_ENDPOINT

PODS = [
    ("node1", "shop", "web-1", "web"),
    ("node1", "shop", "api-1", "api"),
    ("node2", "shop", "web-2", "web"),
    ("node2", "shop", "db-1", "db"),
    ("node3", "shop", "api-2", "api"),
    ("node3", "shop", "db-2", "db"),
]
POLICY = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata:
  name: db-from-api-only
  namespace: shop
spec:
  podSelector:
    matchLabels: {app: db}
  policyTypes: [Ingress]
  ingress:
  - from:
    - podSelector:
        matchLabels: {app: api}
    ports:
    - {protocol: TCP, port: 80}
"""
OK, NO = "✓", "✗"


def _say(text: str = "") -> None:
    print(text, flush=True)


class Demo:
    def __init__(self, name: str, mode: str, keep: bool) -> None:
        self.lab = Lab(name)
        self.mode = mode
        self.keep = keep
        self.netns: dict[str, str] = {}
        self.ips: dict[str, dict[int, str]] = {}
        self.node: dict[str, str] = {}

    # -- steps -------------------------------------------------------------------------------

    def run(self) -> None:
        started = time.monotonic()
        try:
            self.up()
            self.pods()
            with ServerSet(self.netns.values()):
                self.connectivity()
                self.outside()
                self.throughput()
                self.policy()
        finally:
            if self.keep:
                self.explore()
            else:
                _say("\nTearing the lab down (keep it with `make demo DEMO_ARGS=--keep`)...")
                self.lab.down()
                _say(f"Done in {time.monotonic() - started:.0f} s; nothing is left behind.")

    def up(self) -> None:
        _say(f"Tulle demo: a 3-node dual-stack lab in {self.mode} mode (lab {self.lab.name!r})")
        _say("  nodes 1 and 2 share an underlay subnet; node 3 is behind a router")
        t = time.monotonic()
        self.lab.up(nodes=3, mode=self.mode, progress=lambda m: _say(f"  {m}..."))
        _say(f"  {OK} etcd and 3 node agents are up in {time.monotonic() - t:.1f} s")

    def pods(self) -> None:
        _say("\nPods (created through the CNI plugin, as a container runtime does):")
        for node, ns, pod, app in PODS:
            self.lab.add_pod(node, ns, pod, {"app": app}, [{"name": "http", "containerPort": 80, "protocol": "TCP"}])
        state = load(self.lab.name)
        rows = []
        for node, ns, pod, _app in PODS:
            entry = state["pods"][f"{ns}/{pod}"]
            self.netns[pod] = entry["netns"]
            self.ips[pod] = {(6 if ":" in ip else 4): ip for ip in entry["ips"]}
            self.node[pod] = node
            rows.append([f"{ns}/{pod}", node, self.ips[pod][4], self.ips[pod][6]])
        _table(["POD", "NODE", "IPv4", "IPv6"], rows)

    def _ping_matrix(self, family: int) -> dict[tuple[str, str], bool]:
        names = [p for _, _, p, _ in PODS]

        def ping(pair: tuple[str, str]) -> bool:
            src, dst = pair
            cmd = ["nsenter", f"--net={self.netns[src]}", "ping", "-n", "-c", "2", "-i", "0.2", "-W", "1"]
            return subprocess.run([*cmd, self.ips[dst][family]], capture_output=True).returncode == 0

        pairs = [(s, d) for s in names for d in names if s != d]
        with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
            return dict(zip(pairs, pool.map(ping, pairs), strict=True))

    def _tcp_matrix(self, family: int) -> dict[tuple[str, str], bool]:
        names = [p for _, _, p, _ in PODS]
        addresses = {p: self.ips[p][family] for p in names}
        out = probe_matrix({p: self.netns[p] for p in names}, addresses, 80, "TCP", timeout=0.5)
        return {k: v for k, v in out.items() if k[0] != k[1]}

    def connectivity(self) -> None:
        _say("\nConnectivity between every pair of pods (rows: from, columns: to)")
        for family in (4, 6):
            pings = self._ping_matrix(family)
            tcp = self._tcp_matrix(family)
            _say(f"\n  IPv{family}: ping / TCP port 80")
            cells = {k: f"{_mark(pings[k])}/{_mark(tcp[k])}" for k in pings}
            _matrix([p for _, _, p, _ in PODS], cells.__getitem__)
            failed = [k for k in pings if not (pings[k] and tcp[k])]
            _say(f"  {OK if not failed else NO} {len(pings) - len(failed)} of {len(pings)} pairs reach each other")

    def outside(self) -> None:
        _say("\nTo the outside: the external host (no route back to the pods) sees the node's address")
        ext_ns = f"/run/netns/{self.lab.names.external}"
        state = load(self.lab.name)
        for family, ext_ip in ((4, "172.30.100.2"), (6, "fd30:100::2")):
            seen = _whoami(ext_ns, self.netns["web-1"], ext_ip, family)
            node_ip = next(a for a in state["nodes"]["node1"]["addresses"] if (":" in a) == (family == 6))
            verdict = OK if seen == node_ip else NO
            _say(
                f"  {verdict} IPv{family}: shop/web-1 ({self.ips['web-1'][family]}) -> {ext_ip} "
                f"arrives from {seen} (node1)"
            )

    def throughput(self) -> None:
        _say("\nThroughput, pod to pod across nodes (iperf3, 3 s, IPv4):")
        for server, how in (("db-1", "node1 -> node2, direct route"), ("api-2", "node1 -> node3, VXLAN")):
            gbits = _iperf3(self.netns["web-1"], self.netns[server], self.ips[server][4])
            _say(f"  shop/web-1 -> shop/{server} ({how}): {gbits:.1f} Gbit/s")

    def policy(self) -> None:
        _say("\nA NetworkPolicy: the databases accept TCP/80 from the api pods only")
        for line in POLICY.strip().splitlines():
            _say(f"    {line}")
        from tulle.model.validation import admit_all

        objects = [o for o in yaml.safe_load_all(POLICY) if o]
        t = time.monotonic()

        def write(store: Datastore) -> None:
            assert isinstance(store, AtomicWriter), store.url
            store.apply_many(objects, admit=admit_all)

        self.lab.with_store(load(self.lab.name), write)
        names = [p for _, _, p, _ in PODS]

        def enforced() -> dict[tuple[str, str], bool]:
            return self._tcp_matrix(4)

        deadline = time.monotonic() + 10
        tcp = enforced()
        while tcp[("web-1", "db-1")] and time.monotonic() < deadline:
            tcp = enforced()
        _say(f"  applied; enforced on every node within {time.monotonic() - t:.1f} s")
        _say("\n  TCP port 80, IPv4, with the policy:")
        _matrix(names, lambda pair: _mark(tcp[pair]))
        _say("\n  Why web-1 cannot reach db-1, and api-1 can (tulle policy trace):")
        for src in ("web-1", "api-1"):
            for line in self._trace(src, "db-1"):
                _say(f"    {line}")
        self._drops()

    def _trace(self, src: str, dst: str) -> list[str]:
        from tulle.policy.compiler import compile_policies
        from tulle.policy.inputs import inputs_from_objects
        from tulle.policy.trace import trace

        def read(store: Datastore) -> list[list[dict[str, Any]]]:
            return [store.list(k)[0] for k in (NAMESPACE, POD, NETWORK_POLICY, WORKLOAD_ENDPOINT)]

        model = compile_policies(inputs_from_objects(*self.lab.with_store(load(self.lab.name), read)))
        lines: list[str] = trace(model, self.ips[src][4], self.ips[dst][4], "TCP", 80).lines()
        return lines

    def _drops(self) -> None:
        _say("\n  Drops counted by the nodes (tulle status):")
        for node in ("node2", "node3"):
            status = self.lab.agent_call(node, {"command": "AGENT_STATUS"})["result"]
            for d in status.get("drops", []):
                if d.get("family") == 4:
                    _say(f"    {node}: {d['pod']} {d['direction']} IPv4: {d['packets']} packets dropped")

    def explore(self) -> None:
        name = self.lab.name
        _say(f"\nThe lab {name!r} is still up. Try:")
        _say(f"  tulle lab status {name}")
        _say(f"  tulle lab exec {name} shop/web-1 -- ping -c1 {self.ips['db-2'][6]}")
        _say(f"  tulle get pods -n shop -o wide --lab {name}")
        _say(f"  tulle policy trace --lab {name} shop/web-2 shop/db-2 80/TCP")
        _say(f"  tulle status --lab {name}")
        _say(f"  tulle lab down {name}")


# -- helpers -----------------------------------------------------------------------------------


def _mark(ok: bool) -> str:
    return OK if ok else NO


def _table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    for row in [headers, *rows]:
        _say("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)))


def _matrix(names: list[str], cell: Callable[[tuple[str, str]], str]) -> None:
    width = max(len(n) for n in names) + 2
    _say("  " + " " * width + "".join(n.ljust(width) for n in names))
    for src in names:
        row = "".join(("-" if src == dst else cell((src, dst))).ljust(width) for dst in names)
        _say(f"  {src.ljust(width)}{row}")


def _whoami(server_ns: str, client_ns: str, address: str, family: int) -> str:
    """The source address a datagram from client_ns arrives with at a server in server_ns."""
    af = socket.AF_INET if family == 4 else socket.AF_INET6

    def bind() -> socket.socket:
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.bind(("0.0.0.0" if family == 4 else "::", 9876))
        s.settimeout(3)
        return s

    server = run_in_netns(server_ns, bind)
    seen: list[str] = []

    def serve() -> None:
        try:
            _data, peer = server.recvfrom(64)
            seen.append(peer[0])
            server.sendto(peer[0].encode(), peer)
        except OSError:
            pass

    thread = threading.Thread(target=serve)
    thread.start()

    def ask() -> None:
        with socket.socket(af, socket.SOCK_DGRAM) as c:
            c.settimeout(3)
            c.sendto(b"who am I?", (address, 9876))
            try:
                c.recvfrom(64)
            except OSError:
                pass

    run_in_netns(client_ns, ask)
    thread.join()
    server.close()
    return seen[0] if seen else "(nothing arrived)"


def _iperf3(client_ns: str, server_ns: str, address: str, seconds: int = 3) -> float:
    server = subprocess.Popen(
        ["nsenter", f"--net={server_ns}", "iperf3", "-s", "-1", "-p", "5201"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.3)
        out = subprocess.run(
            [
                "nsenter",
                f"--net={client_ns}",
                "iperf3",
                "-c",
                address,
                "-p",
                "5201",
                "-t",
                str(seconds),
                "-J",
            ],
            capture_output=True,
            text=True,
            timeout=seconds + 30,
        )
        data = json.loads(out.stdout)
        return float(data["end"]["sum_received"]["bits_per_second"]) / 1e9
    finally:
        server.terminate()
        server.wait(timeout=10)


def run_demo(name: str = "demo", mode: str = "hybrid", keep: bool = False) -> None:
    Demo(name, mode, keep).run()
