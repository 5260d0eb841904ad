"""NetworkPolicy at scale, each figure against a baseline measured in the same run:

1. cross-node throughput (iperf3) and TCP request/response p50/p99 (sockperf) with no policy,
   against the same with 1,000 policies selecting 5,000 Pod objects (only the two measured pods
   get namespaces; the others are objects with addresses), target >= 0.95;
2. time to compile and apply those 1,000 policies from scratch on one node;
3. time from writing a policy change (what `tulle apply` does) to enforcement on all 3 nodes,
   target <= 1 s.
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from typing import Any

from tulle.dataplane.netns import run_in_netns
from tulle.dataplane.nft import NftReconciler
from tulle.datastore.base import AtomicWriter, Datastore
from tulle.lab import topology
from tulle.lab.cluster import Lab
from tulle.lab.state import load
from tulle.model.kinds import NETWORK_POLICY
from tulle.policy.compiler import compile_policies
from tulle.policy.datapath import policy_table
from tulle.policy.inputs import inputs_from_objects

from .common import bench_name, iperf3_gbits, median, sockperf_rr, table, verdict
from .policyset import PODS, POLICIES, synthetic_objects, write_objects

WRITE_BATCH = 40  # objects per atomic write (an etcd transaction takes at most 128 writes)


def compile_and_apply_from_scratch() -> tuple[float, float, float, int]:
    """(compile s, table s, apply s, elements) for the 1,000 policies on a scratch namespace."""
    namespaces, pods, policies = synthetic_objects()
    name = f"{bench_name('pc')}-node"
    topology.add_netns(name)
    try:
        t0 = time.perf_counter()
        model = compile_policies(inputs_from_objects(namespaces, pods, policies, []))
        t1 = time.perf_counter()
        local = [p["status"]["podIPs"][0]["ip"] for p in pods[:110]]  # one node's share of the pods
        table_ = policy_table(model, local)
        t2 = time.perf_counter()
        run_in_netns(f"/run/netns/{name}", lambda: NftReconciler().apply(table_))
        t3 = time.perf_counter()
        elements = sum(len(s.elements) for s in table_.sets.values())
        return t1 - t0, t2 - t1, t3 - t2, elements
    finally:
        topology.del_netns(name)


def _write_with_status(lab: Lab, pods: list[dict[str, Any]]) -> None:
    """Pods as the kubelet leaves them: with status.podIPs (written as they are, unadmitted)."""
    for i in range(0, len(pods), WRITE_BATCH):
        chunk = pods[i : i + WRITE_BATCH]

        def put(store: Datastore, chunk: list[dict[str, Any]] = chunk) -> None:
            assert isinstance(store, AtomicWriter), store.url
            store.apply_many(chunk)

        lab.with_store(load(lab.name), put)


def _nft_elements(netns: str, set_name: str) -> int:
    out = subprocess.run(
        ["ip", "netns", "exec", netns, "nft", "-j", "list", "set", "inet", "tulle", set_name],
        capture_output=True,
        text=True,
    ).stdout
    try:
        data = json.loads(out)["nftables"]
    except (ValueError, KeyError):
        return -1
    for item in data:
        if "set" in item:
            return len(item["set"].get("elem", []))
    return -1


def throughput_with_policies(seconds: int) -> list[list[str]]:
    lab = Lab(bench_name("pt"))
    try:
        lab.up(nodes=2, mode="host-gw", ipv4_only=True)
        lab.add_pod("node1", "ns1", "client", {"tier": "front"}, [])
        lab.add_pod(
            "node2", "ns0", "server", {"app": "svc-0"}, [{"name": "http", "containerPort": 5201, "protocol": "TCP"}]
        )
        pods = load(lab.name)["pods"]
        client, server = pods["ns1/client"], pods["ns0/server"]
        address = server["ips"][0]

        def measure() -> tuple[float, Any]:
            gbits = iperf3_gbits(client["netns"], server["netns"], address, seconds)
            return gbits, sockperf_rr(client["netns"], server["netns"], address, seconds)

        base = [measure() for _ in range(2)]
        namespaces, pods_, policies = synthetic_objects()
        # the measured pods' namespaces exist already (the lab made them); give them the labels
        namespaces = [n for n in namespaces if n["metadata"]["name"] not in ("ns0", "ns1")]
        started = time.monotonic()
        write_objects(lab, namespaces)
        _write_with_status(lab, pods_)
        for ns, team in (("ns0", "t0"), ("ns1", "t1")):
            obj = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": {"team": team}}}
            write_objects(lab, [obj])
        # policy 0 selects the server (app=svc-0 in ns0) and admits tier=front from team=t0;
        # admit the client's namespace too, with the server's ports, so traffic stays allowed
        policies[0]["spec"]["ingress"][0]["from"].append(
            {"namespaceSelector": {"matchLabels": {"team": "t1"}}, "podSelector": {"matchLabels": {"tier": "front"}}}
        )
        policies[0]["spec"]["ingress"][0]["ports"].append({"port": 5201, "endPort": 5202})
        policies[0]["spec"]["ingress"][0]["ports"].append({"port": 11111})
        write_objects(lab, policies)
        node2 = lab.names.node("node2")
        deadline = time.monotonic() + 300
        while _nft_elements(node2, "ingress_peer_ports_v4") <= 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        settled = time.monotonic() - started
        with_policy = [measure() for _ in range(2)]
        b_gbit = max(g for g, _ in base)
        p_gbit = max(g for g, _ in with_policy)
        b_p50 = min(r.p50 for _, r in base)
        b_p99 = min(r.p99 for _, r in base)
        p_p50 = min(r.p50 for _, r in with_policy)
        p_p99 = min(r.p99 for _, r in with_policy)
        return [
            ["no policy (baseline)", f"{b_gbit:.1f}", "1.00", f"{b_p50:.1f}", f"{b_p99:.1f}", ""],
            [
                f"{POLICIES} policies over {PODS} pods",
                f"{p_gbit:.1f}",
                f"{p_gbit / b_gbit:.2f}",
                f"{p_p50:.1f} ({p_p50 / b_p50:.2f})",
                f"{p_p99:.1f} ({p_p99 / b_p99:.2f})",
                f">= 0.95 ({verdict(p_gbit / b_gbit, 0.95)}); objects written and enforced in {settled:.0f} s",
            ],
        ]
    finally:
        lab.down()


def apply_to_enforcement(rounds: int = 5) -> list[float]:
    """Seconds from writing a deny policy to the last of 3 nodes refusing new connections."""
    lab = Lab(bench_name("pe"))
    times: list[float] = []
    try:
        lab.up(nodes=3, mode="vxlan", ipv4_only=True)
        for n in (1, 2, 3):
            lab.add_pod(f"node{n}", "bench", f"s{n}", {"role": "server"}, [])
        lab.add_pod("node1", "bench", "client", {"role": "client"}, [])
        pods = load(lab.name)["pods"]
        client = pods["bench/client"]["netns"]
        servers = [(pods[f"bench/s{n}"]["netns"], pods[f"bench/s{n}"]["ips"][0]) for n in (1, 2, 3)]
        listeners = [run_in_netns(ns, _listen) for ns, _ in servers]
        try:
            for r in range(rounds):
                deny = {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicy",
                    "metadata": {"name": "deny-servers", "namespace": "bench"},
                    "spec": {"podSelector": {"matchLabels": {"role": "server"}}, "policyTypes": ["Ingress"]},
                }
                started = time.monotonic()
                write_objects(lab, [deny])
                pending = {ip for _, ip in servers}
                while pending and time.monotonic() - started < 10:
                    pending = {ip for ip in pending if _connects(client, ip)}
                times.append(time.monotonic() - started)
                lab.with_store(load(lab.name), lambda store: store.delete(NETWORK_POLICY, "deny-servers", "bench"))
                time.sleep(0.5 + r * 0.1)
        finally:
            for s in listeners:
                s.close()
    finally:
        lab.down()
    return times


def _listen() -> socket.socket:
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("0.0.0.0", 7070))
    s.listen(256)
    return s


def _connects(netns: str, ip: str) -> bool:
    def attempt() -> bool:
        with socket.socket() as s:
            s.settimeout(0.05)
            try:
                s.connect((ip, 7070))
                return True
            except OSError:
                return False

    return run_in_netns(netns, attempt)


def main(seconds: int = 4) -> None:
    compile_s, table_s, apply_s, elements = compile_and_apply_from_scratch()
    table(
        f"Compile and apply {POLICIES} policies over {PODS} pods from scratch (one node, 110 local pods)",
        ["step", "seconds"],
        [
            ["parse + compile (all nodes' model)", f"{compile_s:.2f}"],
            ["this node's table", f"{table_s:.2f}"],
            [f"apply ({elements} set elements, one transaction)", f"{apply_s:.2f}"],
        ],
    )
    enforcement = apply_to_enforcement()
    table(
        "From writing a policy to enforcement on all 3 nodes (new connections refused)",
        ["rounds", "median", "max", "target"],
        [
            [
                str(len(enforcement)),
                f"{median(enforcement) * 1000:.0f} ms",
                f"{max(enforcement) * 1000:.0f} ms",
                f"<= 1000 ms ({verdict(max(enforcement), 1.0, False)})",
            ]
        ],
    )
    rows = throughput_with_policies(seconds)
    table(
        "Cross-node pod to pod (host-gw, IPv4) with no policy and with the policies; best of 2 runs each",
        ["case", "Gbit/s", "ratio", "RR p50 µs (ratio)", "RR p99 µs (ratio)", "target"],
        rows,
    )
