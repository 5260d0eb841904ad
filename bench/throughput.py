"""Pod-to-pod throughput (iperf3) and TCP request/response latency (sockperf) across nodes in
each routing mode, against a direct veth pair between two namespaces measured in the same run.

The labs of all three modes are up at once and the paths are measured in interleaved rounds
(baseline, kernel-only, host-gw, vxlan, hybrid, baseline, ...). A path's ratio is taken within
each round, against the baseline measured a few seconds before it, and the table shows the
median of those ratios with their range: on a shared VM the machine's speed drifts by ±20%
over minutes, and a ratio of two figures measured minutes apart (or of two "best of" figures)
would show that drift as a difference between paths. Client and server are pinned to two CPUs
(see common.pinned).

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
from .common import bench_name, iperf3_gbits, median, sockperf_rr, table, verdict

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


def _ratios(values: dict[str, list[float]], label: str, against: str) -> list[float]:
    return [v / b for v, b in zip(values[label], values[against], strict=True)]


def _median_and_range(ratios: list[float]) -> str:
    return f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


def main(seconds: int = 5) -> None:
    gbits: dict[str, list[float]] = {}
    p50: dict[str, list[float]] = {}
    p99: dict[str, list[float]] = {}
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
                gbits.setdefault(label, []).append(iperf3_gbits(client, server, address, seconds))
                lat = sockperf_rr(client, server, address, seconds)
                p50.setdefault(label, []).append(lat.p50)
                p99.setdefault(label, []).append(lat.p99)
    rows = []
    for label in paths:
        ratios = _ratios(gbits, label, BASELINE)
        target = TARGETS.get(label)
        same_shape = SAME_SHAPE.get(label)
        rows.append(
            [
                label,
                f"{median(gbits[label]):.1f}",
                _median_and_range(ratios),
                f">= {target:.2f} ({verdict(median(ratios), target)})" if target else "",
                _median_and_range(_ratios(gbits, label, same_shape)) if same_shape else "",
                f"{median(p50[label]):.1f}",
                f"{median(p99[label]):.1f}",
                f"{median(_ratios(p50, label, BASELINE)):.2f}",
                f"{median(_ratios(p99, label, BASELINE)):.2f}",
            ]
        )
    table(
        f"Pod to pod across nodes, IPv4; iperf3 and sockperf {seconds} s each, {ROUNDS} interleaved rounds: medians, "
        "ratios taken within each round (range over the rounds) against the direct veth pair, and ('vs kernel') "
        "against the same shape built from kernel parts alone",
        ["path", "Gbit/s", "ratio", "target", "vs kernel", "RR p50 µs", "RR p99 µs", "p50 ratio", "p99 ratio"],
        rows,
    )
