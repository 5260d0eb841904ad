"""What the node's guards cost on the data path: CPU time per GB moved with source verification on
against off (`--source-verification`), for host-gw and VXLAN, in interleaved rounds of iperf3 (as
bench/throughput.py measures it; ratios taken within each round). Target: on within 2% of off.

Only the address, MAC and advertisement checks are switched off: the tunnel, connection-limit
and control-plane guards are there in both, as they are in every deployment.
"""

from __future__ import annotations

from contextlib import ExitStack

from tulle.lab.cluster import Lab

from .common import bench_name, iperf3_run, median, table, verdict
from .throughput import ROUNDS, CpuPerGb, _lab_paths, _median_and_range, _ratios

TARGET = 1.02  # on / off, CPU per GB


def main(seconds: int = 5, rounds: int = ROUNDS) -> None:
    cpu = CpuPerGb()
    with ExitStack() as stack:
        paths: dict[str, tuple[str, str, str]] = {}
        for mode in ("host-gw", "vxlan"):
            for on in (True, False):
                lab = Lab(bench_name(f"g{mode[0]}{'y' if on else 'n'}"))
                stack.callback(lab.down)
                [(_, path)] = _lab_paths(lab, mode, source_verification=on).items()
                paths[_label(mode, on)] = path
        for _ in range(rounds):
            cpu.idle_window(seconds)
            for label, (client, server, address) in paths.items():
                cpu.add(label, iperf3_run(client, server, address, seconds))
    rows = []
    for mode in ("host-gw", "vxlan"):
        on, off = _label(mode, True), _label(mode, False)
        whole, own = _ratios(cpu.per_gb, on, off), _ratios(cpu.attributed, on, off)
        rows.append(
            [
                mode,
                f"{median(cpu.per_gb[on]):.3f} / {median(cpu.per_gb[off]):.3f}",
                _median_and_range(whole),
                f"{median(cpu.attributed[on]):.3f} / {median(cpu.attributed[off]):.3f}",
                _median_and_range(own),
                f"<= {TARGET:.2f} ({verdict(median(own), TARGET, higher_is_better=False)})",
            ]
        )
    table(
        f"Source verification's cost: CPU seconds per GB moved, on / off ({rounds} interleaved rounds of {seconds} s; "
        "'all CPUs' = system + softirq of both CPUs, 'iperf3+ksoftirqd' = the path's own kernel time; "
        "ratios on/off taken within each round, median and range)",
        ["mode", "all CPUs on / off", "ratio", "iperf3+ksoftirqd on / off", "ratio", "target"],
        rows,
    )


def _label(mode: str, on: bool) -> str:
    return f"{mode}, verification {'on' if on else 'off'}"
