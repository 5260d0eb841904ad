"""Pod-to-pod throughput (iperf3) and TCP request/response latency (sockperf) across nodes in
each routing mode, against a direct veth pair between two namespaces measured in the same run.

The labs of all three modes are up at once and the paths are measured in interleaved rounds
(baseline, host-gw, vxlan, hybrid, baseline, ...), keeping the best of the rounds for each
path, so that a passing disturbance of the machine does not count against one path only.

Targets: host-gw >= 0.95 of the direct veth's throughput, VXLAN >= 0.85.
"""

from __future__ import annotations

from contextlib import ExitStack

from tulle.lab.cluster import Lab
from tulle.lab.state import load

from .baseline import direct_veth_pair
from .common import Latency, bench_name, iperf3_gbits, sockperf_rr, table, verdict

TARGETS = {"host-gw": 0.95, "vxlan": 0.85, "hybrid (direct pair)": 0.95, "hybrid (vxlan pair)": 0.85}
ROUNDS = 5


def _lab_paths(lab: Lab, mode: str) -> dict[str, tuple[str, str, str]]:
    lab.up(nodes=3, mode=mode, ipv4_only=True)
    lab.add_pod("node1", "bench", "client", {}, [])
    lab.add_pod("node2", "bench", "server2", {}, [])
    lab.add_pod("node3", "bench", "server3", {}, [])
    pods = load(lab.name)["pods"]
    client = pods["bench/client"]["netns"]

    def path(server: str) -> tuple[str, str, str]:
        return client, pods[f"bench/{server}"]["netns"], pods[f"bench/{server}"]["ips"][0]

    if mode == "hybrid":
        return {"hybrid (direct pair)": path("server2"), "hybrid (vxlan pair)": path("server3")}
    return {mode: path("server2")}


def main(seconds: int = 5) -> None:
    best: dict[str, tuple[float, Latency]] = {}

    def keep(label: str, gbits: float, lat: Latency) -> None:
        old = best.get(label)
        if old is None:
            best[label] = (gbits, lat)
        else:
            best[label] = (
                max(old[0], gbits),
                Latency(p50=min(old[1].p50, lat.p50), p99=min(old[1].p99, lat.p99)),
            )

    with ExitStack() as stack:
        base_path = stack.enter_context(direct_veth_pair())
        paths: dict[str, tuple[str, str, str]] = {"direct veth (baseline)": base_path}
        for mode in ("host-gw", "vxlan", "hybrid"):
            lab = Lab(bench_name(mode[:2]))
            stack.callback(lab.down)
            paths.update(_lab_paths(lab, mode))
        for _ in range(ROUNDS):
            for label, (client, server, address) in paths.items():
                keep(
                    label, iperf3_gbits(client, server, address, seconds), sockperf_rr(client, server, address, seconds)
                )
    base_gbits, base_lat = best.pop("direct veth (baseline)")
    rows = [
        [
            "direct veth (baseline)",
            f"{base_gbits:.1f}",
            "1.00",
            "",
            f"{base_lat.p50:.1f}",
            f"{base_lat.p99:.1f}",
            "1.00",
            "1.00",
        ]
    ]
    for label, (gbits, lat) in best.items():
        ratio = gbits / base_gbits
        target = TARGETS[label]
        rows.append(
            [
                label,
                f"{gbits:.1f}",
                f"{ratio:.2f}",
                f">= {target:.2f} ({verdict(ratio, target)})",
                f"{lat.p50:.1f}",
                f"{lat.p99:.1f}",
                f"{lat.p50 / base_lat.p50:.2f}",
                f"{lat.p99 / base_lat.p99:.2f}",
            ]
        )
    table(
        f"Pod to pod across nodes, IPv4; iperf3 and sockperf {seconds} s each, best of {ROUNDS} interleaved rounds "
        "(ratios against the direct veth pair)",
        ["path", "Gbit/s", "ratio", "target", "RR p50 µs", "RR p99 µs", "p50 ratio", "p99 ratio"],
        rows,
    )
