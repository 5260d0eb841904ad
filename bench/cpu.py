"""CPU time per GB moved on each throughput path: the throughput benchmark's paths and rounds
(see bench/throughput.py), iperf3 only (no request/response runs), its CPU table alone.

For each path (direct veth, kernel-only routed and VXLAN, Tulle host-gw, vxlan, hybrid), the
system + softirq seconds of both CPUs (/proc/stat) over each iperf3 client run, per 10^9 bytes
received; the iperf3 processes' own user time is left out. Rounds are interleaved and ratios
taken within a round (median and range over the rounds), each Tulle path against the kernel-only
path of the same shape. No target: the figure is for comparing paths and runs, and it stays
stable on this shared VM where throughput moves by ±20%.
"""

from __future__ import annotations

from .throughput import ROUNDS, interleaved_rounds


def main(seconds: int = 5, rounds: int = ROUNDS) -> None:
    interleaved_rounds(seconds, rounds, latency=False).cpu.print_table(seconds, rounds)
