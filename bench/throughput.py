"""Pod-to-pod throughput (iperf3) and TCP request/response latency (sockperf) across nodes in
each routing mode, against a direct veth pair between two namespaces measured in the same run.

The labs of all three modes are up at once and the paths are measured in interleaved rounds
(baseline, host-gw, vxlan, hybrid, baseline, ...), keeping the best of the rounds for each
path, so that a passing disturbance of the machine does not count against one path only.
Client and server are pinned to two CPUs (see common.pinned).

Besides the direct veth pair (the targets' baseline), the same pod-node-node-pod shape is built
from kernel parts alone (static routes, a static VXLAN; no agent, no nftables): the ratio against
it is Tulle's own cost, and its ratio against the veth pair is what the machine allows for that
shape before any CNI adds anything.

Targets: host-gw >= 0.95 of the direct veth's throughput, VXLAN >= 0.85.
"""

from __future__ import annotations

from contextlib import ExitStack

from tulle.lab.cluster import Lab
from tulle.lab.state import load

from .baseline import direct_veth_pair, kernel_only_path
from .common import Latency, bench_name, iperf3_gbits, sockperf_rr, table, verdict

TARGETS = {"host-gw": 0.95, "vxlan": 0.85, "hybrid (direct pair)": 0.95, "hybrid (vxlan pair)": 0.85}
BASELINE = "direct veth (baseline)"
KERNEL_ROUTED = "kernel only: routed"
KERNEL_VXLAN = "kernel only: VXLAN"
SAME_SHAPE = {
    "host-gw": KERNEL_ROUTED,
    "vxlan": KERNEL_VXLAN,
    "hybrid (direct pair)": KERNEL_ROUTED,
    "hybrid (vxlan pair)": KERNEL_VXLAN,
}
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
        paths: dict[str, tuple[str, str, str]] = {
            BASELINE: stack.enter_context(direct_veth_pair()),
            KERNEL_ROUTED: stack.enter_context(kernel_only_path(vxlan=False)),
            KERNEL_VXLAN: stack.enter_context(kernel_only_path(vxlan=True)),
        }
        for mode in ("host-gw", "vxlan", "hybrid"):
            lab = Lab(bench_name(mode[:2]))
            stack.callback(lab.down)
            paths.update(_lab_paths(lab, mode))
        for _ in range(ROUNDS):
            for label, (client, server, address) in paths.items():
                keep(
                    label, iperf3_gbits(client, server, address, seconds), sockperf_rr(client, server, address, seconds)
                )
    base_gbits, base_lat = best[BASELINE]
    rows = []
    for label, (gbits, lat) in best.items():
        ratio = gbits / base_gbits
        target = TARGETS.get(label)
        same_shape = SAME_SHAPE.get(label)
        rows.append(
            [
                label,
                f"{gbits:.1f}",
                f"{ratio:.2f}",
                f">= {target:.2f} ({verdict(ratio, target)})" if target else "",
                f"{gbits / best[same_shape][0]:.2f}" if same_shape else "",
                f"{lat.p50:.1f}",
                f"{lat.p99:.1f}",
                f"{lat.p50 / base_lat.p50:.2f}",
                f"{lat.p99 / base_lat.p99:.2f}",
            ]
        )
    table(
        f"Pod to pod across nodes, IPv4; iperf3 and sockperf {seconds} s each, best of {ROUNDS} interleaved rounds "
        "(ratios against the direct veth pair; 'vs kernel' against the same shape built from kernel parts alone)",
        ["path", "Gbit/s", "ratio", "target", "vs kernel", "RR p50 µs", "RR p99 µs", "p50 ratio", "p99 ratio"],
        rows,
    )
