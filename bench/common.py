"""What the benchmarks share: processes in namespaces tracked by PID, statistics, tables."""

from __future__ import annotations

import json
import os
import re
import secrets
import statistics
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tulle.datastore.etcd_server import stop_pid


def bench_name(tag: str) -> str:
    return f"b{tag[:2]}{secrets.token_hex(3)[:5]}"


@contextmanager
def background(netns_path: str, argv: list[str]) -> Iterator[int]:
    """A server inside a namespace, stopped by its PID at the end."""
    proc = subprocess.Popen(
        ["nsenter", f"--net={netns_path}", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        time.sleep(0.3)
        yield proc.pid
    finally:
        stop_pid(proc.pid)


def run(netns_path: str, argv: list[str], timeout: float = 120) -> str:
    proc = subprocess.run(["nsenter", f"--net={netns_path}", *argv], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def pinned(role: str, argv: list[str]) -> list[str]:
    """The client on the first CPU, the server on the last: left to the scheduler, two processes on
    a small machine land on one CPU in some runs and on two in others, which moves single-stream
    throughput by up to 40% and swamps the differences between paths."""
    cpus = sorted(os.sched_getaffinity(0))
    return ["taskset", "-c", str(cpus[0] if role == "client" else cpus[-1]), *argv]


def iperf3_gbits(client_ns: str, server_ns: str, address: str, seconds: int = 5) -> float:
    with background(server_ns, pinned("server", ["iperf3", "-s", "-p", "5201"])):
        argv = ["iperf3", "-c", address, "-p", "5201", "-t", str(seconds), "-J", "-O", "1"]
        out = json.loads(run(client_ns, pinned("client", argv)))
    return float(out["end"]["sum_received"]["bits_per_second"]) / 1e9


_PERCENTILE = re.compile(r"percentile (\d+\.\d+) =\s+([\d.]+)")


@dataclass
class Latency:
    p50: float
    p99: float


def sockperf_rr(client_ns: str, server_ns: str, address: str, seconds: int = 5) -> Latency:
    """TCP request/response round trip (µs) with 1-byte messages, on one connection."""
    with background(server_ns, pinned("server", ["sockperf", "server", "-i", address, "-p", "11111", "--tcp"])):
        argv = ["sockperf", "ping-pong", "-i", address, "-p", "11111", "--tcp", "-t", str(seconds), "-m", "14"]
        out = run(client_ns, pinned("client", argv))
    found = {float(p): float(v) for p, v in _PERCENTILE.findall(out)}
    return Latency(p50=found[50.0], p99=found[99.0])


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * pct / 100
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def table(title: str, headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    print()
    print(title)
    print("  " + "  ".join(h.ljust(widths[i]) for i, h in enumerate(headers)))
    for row in rows:
        print("  " + "  ".join(c.ljust(widths[i]) for i, c in enumerate(row)))


def verdict(value: float, target: float, higher_is_better: bool = True) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "meets" if ok else "MISSES"
