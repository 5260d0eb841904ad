"""What the benchmarks share: processes in namespaces tracked by PID, CPU time from the kernel's
counters, statistics, tables."""

from __future__ import annotations

import json
import os
import re
import resource
import secrets
import signal
import statistics
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

USER_HZ = os.sysconf("SC_CLK_TCK")  # the unit of /proc/stat and /proc/PID/stat times


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
        stop_child(proc)


def stop_child(proc: subprocess.Popen[bytes] | subprocess.Popen[str], timeout: float = 10.0) -> None:
    """Stop a process this one started, by its PID: SIGTERM, then SIGKILL."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


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


# -- CPU time from the kernel's counters -------------------------------------------------------
# This kernel accounts CPU time by sampling at each tick (CONFIG_TICK_CPU_ACCOUNTING, HZ=250, no
# IRQ time accounting): softirq work is counted as softirq when a tick lands in it, wherever it
# runs. /proc/stat and /proc/PID/stat report in USER_HZ (100/s) units.

_STAT_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal", "guest", "guest_nice")


@dataclass(frozen=True)
class KernelCpu:
    """Seconds each CPU has spent in each state since boot, per /proc/stat's `cpuN` lines."""

    per_cpu: dict[int, dict[str, float]]

    def since(self, before: KernelCpu) -> dict[str, float]:
        """Seconds spent in each state between two snapshots, summed over the CPUs."""
        return {
            name: sum(self.per_cpu[cpu][name] - before.per_cpu[cpu][name] for cpu in self.per_cpu)
            for name in _STAT_FIELDS
        }


def kernel_cpu() -> KernelCpu:
    per_cpu: dict[int, dict[str, float]] = {}
    with open("/proc/stat") as f:
        for line in f:
            words = line.split()
            if words and words[0].startswith("cpu") and words[0] != "cpu":
                values = [int(v) / USER_HZ for v in words[1:]] + [0.0] * len(_STAT_FIELDS)
                per_cpu[int(words[0][3:])] = dict(zip(_STAT_FIELDS, values, strict=False))
    return KernelCpu(per_cpu)


@dataclass(frozen=True)
class ProcCpu:
    """A process's CPU time so far. `ticks`: utime+stime of all its threads, ended ones included,
    from /proc/PID/stat (USER_HZ units: 10 ms steps); `children_ticks`: cutime+cstime of the
    children it has reaped (an agent's `ip` or `conntrack` runs); `threads_ns`: each live thread's
    exact time on a CPU (/proc/PID/task/TID/schedstat, ns)."""

    ticks: int
    children_ticks: int
    threads_ns: dict[int, int] = field(default_factory=dict)


def proc_cpu(pid: int) -> ProcCpu:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # after the command: state is field 3, utime 14, stime 15, cutime 16, cstime 17 (man 5 proc)
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    threads: dict[int, int] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        tids = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                threads[int(tid)] = int(f.read().split()[0])
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
            pass  # the thread ended while we looked
    return ProcCpu(utime + stime, cutime + cstime, threads)


def cpu_seconds(before: ProcCpu, after: ProcCpu) -> float:
    """CPU seconds a process spent between two samples. The threads' exact times are summed when
    they account for the whole (no thread ended in between, which the 10 ms ticks tell); else the
    ticks are the figure. Reaped children always come from the ticks."""
    children = (after.children_ticks - before.children_ticks) / USER_HZ
    ticks = (after.ticks - before.ticks) / USER_HZ
    exact = sum(ns - before.threads_ns.get(tid, 0) for tid, ns in after.threads_ns.items()) / 1e9
    if after.threads_ns and abs(ticks - exact) <= 2 / USER_HZ:
        return exact + children
    return ticks + children


def sample_cpu(pids: Iterable[int]) -> dict[int, ProcCpu]:
    return {pid: proc_cpu(pid) for pid in pids}


def wait_quiet(pids: list[int], below: float = 0.02, window: float = 3.0, timeout: float = 300.0) -> tuple[bool, float]:
    """Wait until every process used less than `below` of a core over one `window` (the work a
    change set off is done). (settled?, seconds waited)."""
    started = time.monotonic()
    while True:
        before, t0 = sample_cpu(pids), time.monotonic()
        time.sleep(window)
        after, t1 = sample_cpu(pids), time.monotonic()
        if all(cpu_seconds(before[p], after[p]) / (t1 - t0) < below for p in pids):
            return True, t1 - started
        if t1 - started > timeout:
            return False, t1 - started


# -- iperf3 and sockperf ----------------------------------------------------------------------


def ksoftirqd_pids() -> list[int]:
    """The per-CPU threads that run softirq work the CPU could not finish where it was raised."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/comm") as f:
                if f.read().startswith("ksoftirqd/"):
                    found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


@dataclass
class Iperf3Run:
    gbits: float  # iperf3's own figure: received bits per second over the measured seconds
    bytes_moved: int  # over the whole client run: sum_received plus the omitted first second
    seconds: float  # the client run's wall time, over which `cpu` is taken
    cpu: dict[str, float]  # seconds in each /proc/stat state over the client run, summed over CPUs
    # seconds of kernel time of the iperf3 client and server processes (their stime, which takes
    # in the softirq work run in their context) and of the ksoftirqd threads: the path's own
    # kernel cost, which other work on the machine does not enter
    attributed_system: float


def iperf3_run(client_ns: str, server_ns: str, address: str, seconds: int = 5) -> Iperf3Run:
    softirqd = ksoftirqd_pids()
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    softirqd_before = sample_cpu(softirqd)
    with background(server_ns, pinned("server", ["iperf3", "-s", "-p", "5201"])):
        argv = ["iperf3", "-c", address, "-p", "5201", "-t", str(seconds), "-J", "-O", "1"]
        cpu_before, t0 = kernel_cpu(), time.monotonic()
        out = json.loads(run(client_ns, pinned("client", argv)))
        cpu_after, t1 = kernel_cpu(), time.monotonic()
    # both iperf3 processes are reaped by now (the server when `background` stopped it)
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_stime - children_before.ru_stime
    softirqd_after = sample_cpu(softirqd)
    softirq_threads = sum(cpu_seconds(softirqd_before[p], softirqd_after[p]) for p in softirqd)
    received = out["end"]["sum_received"]
    # sum_received leaves out the omitted (warm-up) second; the CPU counters cover it, so its
    # bytes (as the sender counted them, which TCP delivers) are added for the CPU figure.
    omitted = sum(int(i["sum"]["bytes"]) for i in out["intervals"] if i["sum"].get("omitted"))
    return Iperf3Run(
        gbits=float(received["bits_per_second"]) / 1e9,
        bytes_moved=int(received["bytes"]) + omitted,
        seconds=t1 - t0,
        cpu=cpu_after.since(cpu_before),
        attributed_system=children + softirq_threads,
    )


def iperf3_gbits(client_ns: str, server_ns: str, address: str, seconds: int = 5) -> float:
    return iperf3_run(client_ns, server_ns, address, seconds).gbits


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
