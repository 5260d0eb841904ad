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

Beside throughput, each iperf3 run's CPU cost is taken from the kernel's per-CPU counters
(/proc/stat: system + softirq, summed over both CPUs, over the client's run) and divided by the
bytes moved: CPU seconds per GB, with each Tulle path's ratio to its kernel-only counterpart in
the same round. The figure stays put where throughput does not: a VM that is given less of the
host moves fewer bytes but spends about as much of its own CPU on each (the time it was not
given shows as steal, reported beside). `python -m bench cpu` runs only this part.

Targets: host-gw >= 0.95 of the direct veth's throughput, VXLAN >= 0.85.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass

from tulle.lab.cluster import Lab
from tulle.lab.state import load

from .baseline import direct_veth_pair, kernel_only_path
from .common import Iperf3Run, bench_name, iperf3_run, kernel_cpu, median, sockperf_rr, table, verdict

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


def _lab_paths(lab: Lab, mode: str, source_verification: bool = True) -> dict[str, tuple[str, str, str]]:
    lab.up(nodes=3, mode=mode, ipv4_only=True, source_verification=source_verification)
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


def build_paths(stack: ExitStack) -> dict[str, tuple[str, str, str]]:
    """Every measured path, label -> (client netns path, server netns path, server address): the
    direct veth pair, the two kernel-only paths and the labs of all three modes, all up at once
    and removed when `stack` closes."""
    paths: dict[str, tuple[str, str, str]] = {
        BASELINE: stack.enter_context(direct_veth_pair()),
        KERNEL_ROUTED: stack.enter_context(kernel_only_path(vxlan=False)),
        KERNEL_VXLAN: stack.enter_context(kernel_only_path(vxlan=True)),
    }
    for mode in ("host-gw", "vxlan", "hybrid"):
        lab = Lab(bench_name(mode[:2]))
        stack.callback(lab.down)
        paths.update(_lab_paths(lab, mode))
    return paths


class CpuPerGb:
    """CPU seconds per GB moved, by path and round: system + softirq of all CPUs (/proc/stat), and
    the kernel time of the iperf3 processes and ksoftirqd alone; and the machine-wide counters
    over a stretch with no traffic once a round (what the rest of the machine costs)."""

    def __init__(self) -> None:
        self.per_gb: dict[str, list[float]] = {}
        self.attributed: dict[str, list[float]] = {}
        self.gb: dict[str, list[float]] = {}
        self.steal: dict[str, list[float]] = {}  # share of the run's CPU time the host took back
        self.guest: dict[str, list[float]] = {}
        self.background: list[float] = []  # system + softirq CPU seconds per second, no traffic

    def add(self, label: str, r: Iperf3Run) -> None:
        gb = r.bytes_moved / 1e9
        self.gb.setdefault(label, []).append(gb)
        self.per_gb.setdefault(label, []).append((r.cpu["system"] + r.cpu["softirq"]) / gb)
        self.attributed.setdefault(label, []).append(r.attributed_system / gb)
        total = sum(r.cpu.values()) - r.cpu["guest"] - r.cpu["guest_nice"]  # guest is inside user
        self.steal.setdefault(label, []).append(r.cpu["steal"] / total if total else 0.0)
        self.guest.setdefault(label, []).append(r.cpu["guest"] / total if total else 0.0)

    def idle_window(self, seconds: float) -> None:
        before, t0 = kernel_cpu(), time.monotonic()
        time.sleep(seconds)
        cpu, elapsed = kernel_cpu().since(before), time.monotonic() - t0
        self.background.append((cpu["system"] + cpu["softirq"]) / elapsed)

    def print_table(self, seconds: int, rounds: int) -> None:
        rows = []
        for label, values in self.per_gb.items():
            same_shape = SAME_SHAPE.get(label)
            own = self.attributed[label]
            rows.append(
                [
                    label,
                    f"{median(self.gb[label]):.1f}",
                    f"{median(values):.3f} ({min(values):.3f}-{max(values):.3f})",
                    _median_and_range(_ratios(self.per_gb, label, BASELINE)) if label != BASELINE else "",
                    _median_and_range(_ratios(self.per_gb, label, same_shape)) if same_shape else "",
                    f"{median(own):.3f} ({min(own):.3f}-{max(own):.3f})",
                    _median_and_range(_ratios(self.attributed, label, same_shape)) if same_shape else "",
                    f"{median(self.steal[label]) * 100:.1f} / {median(self.guest[label]) * 100:.1f}",
                ]
            )
        table(
            f"CPU per GB moved (the same {rounds} interleaved rounds of iperf3, {seconds} s each), lower is better. "
            "'all CPUs': system + softirq seconds from /proc/stat, summed over both CPUs, over each client run; "
            "'iperf3+ksoftirqd': the kernel time (stime) of the two iperf3 processes, which takes in the softirq "
            "work run in their context, and of the ksoftirqd threads. The iperf3 processes' own user time is "
            "excluded from both. Per 10^9 bytes received (iperf3's sum_received plus its omitted first second). "
            "Median, range over the rounds, ratios taken within each round",
            [
                "path",
                "GB/run",
                "all CPUs s/GB",
                "vs veth",
                "vs kernel only",
                "iperf3+ksoftirqd s/GB",
                "vs kernel only",
                "steal / guest %",
            ],
            rows,
        )
        print(
            f"  no traffic (rest of the machine): {median(self.background) * 1000:.0f} ms of system + softirq per s "
            f"(range {min(self.background) * 1000:.0f}-{max(self.background) * 1000:.0f}) over both CPUs; "
            "'all CPUs' takes in whatever else runs on the machine, 'iperf3+ksoftirqd' does not"
        )


def _ratios(values: dict[str, list[float]], label: str, against: str) -> list[float]:
    return [v / b for v, b in zip(values[label], values[against], strict=True)]


def _median_and_range(ratios: list[float]) -> str:
    return f"{median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})"


@dataclass
class Rounds:
    """What interleaved rounds over every path measured: per path, one figure a round."""

    labels: list[str]
    cpu: CpuPerGb
    gbits: dict[str, list[float]]
    p50: dict[str, list[float]]
    p99: dict[str, list[float]]


def interleaved_rounds(seconds: int, rounds: int, latency: bool = True) -> Rounds:
    """Every path once a round (iperf3, and sockperf when `latency`), rounds one after another,
    so that the machine's drift over minutes falls on all paths alike."""
    out = Rounds([], CpuPerGb(), {}, {}, {})
    with ExitStack() as stack:
        paths = build_paths(stack)
        out.labels = list(paths)
        for _ in range(rounds):
            out.cpu.idle_window(seconds)
            for label, (client, server, address) in paths.items():
                run = iperf3_run(client, server, address, seconds)
                out.gbits.setdefault(label, []).append(run.gbits)
                out.cpu.add(label, run)
                if latency:
                    lat = sockperf_rr(client, server, address, seconds)
                    out.p50.setdefault(label, []).append(lat.p50)
                    out.p99.setdefault(label, []).append(lat.p99)
    return out


def main(seconds: int = 5, rounds: int = ROUNDS) -> None:
    measured = interleaved_rounds(seconds, rounds)
    gbits, p50, p99, cpu, paths = measured.gbits, measured.p50, measured.p99, measured.cpu, measured.labels
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
        f"Pod to pod across nodes, IPv4; iperf3 and sockperf {seconds} s each, {rounds} interleaved rounds: medians, "
        "ratios taken within each round (range over the rounds) against the direct veth pair, and ('vs kernel') "
        "against the same shape built from kernel parts alone",
        ["path", "Gbit/s", "ratio", "target", "vs kernel", "RR p50 µs", "RR p99 µs", "p50 ratio", "p99 ratio"],
        rows,
    )
    cpu.print_table(seconds, rounds)
