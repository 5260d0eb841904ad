"""Pod-to-pod throughput (iperf3) and TCP request/response latency (sockperf) across nodes in
each routing mode, against a direct veth pair measured in the same run.

Targets: host-gw >= 0.95 of the direct veth's throughput, VXLAN >= 0.85.
"""

from __future__ import annotations

from tulle.lab.cluster import Lab
from tulle.lab.state import load

from .baseline import direct_veth_pair
from .common import Latency, bench_name, iperf3_gbits, sockperf_rr, table, verdict

TARGETS = {"host-gw": 0.95, "vxlan": 0.85, "hybrid (direct pair)": 0.95, "hybrid (vxlan pair)": 0.85}


def measure_pair(client_ns: str, server_ns: str, address: str, seconds: int) -> tuple[float, Latency]:
    return iperf3_gbits(client_ns, server_ns, address, seconds), sockperf_rr(client_ns, server_ns, address, seconds)


def measure_mode(mode: str, seconds: int) -> dict[str, tuple[float, Latency]]:
    lab = Lab(bench_name(mode[:2]))
    try:
        lab.up(nodes=3, mode=mode, ipv4_only=True)
        lab.add_pod("node1", "bench", "client", {}, [])
        lab.add_pod("node2", "bench", "server2", {}, [])
        lab.add_pod("node3", "bench", "server3", {}, [])
        pods = load(lab.name)["pods"]
        client = pods["bench/client"]["netns"]
        out = {}
        pairs = {"host-gw": ["server2"], "vxlan": ["server2"], "hybrid": ["server2", "server3"]}[mode]
        for server in pairs:
            label = mode
            if mode == "hybrid":
                label = "hybrid (direct pair)" if server == "server2" else "hybrid (vxlan pair)"
            entry = pods[f"bench/{server}"]
            out[label] = measure_pair(client, entry["netns"], entry["ips"][0], seconds)
        return out
    finally:
        lab.down()


def main(seconds: int = 5) -> None:
    results: dict[str, tuple[float, Latency]] = {}
    with direct_veth_pair() as (client, server, address):
        base = measure_pair(client, server, address, seconds)
    for mode in ("host-gw", "vxlan", "hybrid"):
        results.update(measure_mode(mode, seconds))
    rows = [["direct veth (baseline)", f"{base[0]:.1f}", "1.00", "", f"{base[1].p50:.1f}", f"{base[1].p99:.1f}", "1.00", ""]]
    for label, (gbits, lat) in results.items():
        ratio = gbits / base[0]
        target = TARGETS[label]
        rows.append(
            [
                label,
                f"{gbits:.1f}",
                f"{ratio:.2f}",
                f">= {target:.2f} ({verdict(ratio, target)})",
                f"{lat.p50:.1f}",
                f"{lat.p99:.1f}",
                f"{lat.p50 / base[1].p50:.2f}",
                f"{lat.p99 / base[1].p99:.2f}",
            ]
        )
    table(
        f"Pod to pod across nodes, IPv4, iperf3 and sockperf {seconds} s each (ratios against the direct veth pair)",
        ["path", "Gbit/s", "ratio", "target", "RR p50 µs", "RR p99 µs", "p50 ratio", "p99 ratio"],
        rows,
    )
