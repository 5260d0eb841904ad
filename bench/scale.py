"""Lab scale and the agent's CPU cost per node join, at N nodes (default 10 and 100).

For each N: `tulle lab up` with N nodes, timed (given up after --timeout: the lab is torn down
and what came up is reported). Then, with the lab idle, --joins times: each agent's CPU time over
a quiet window; one more node (`Lab.add_node`, which waits for its agent to be ready); the wait
until every other node routes the new node's blocks (the blackholes for them on the new node,
protocol 211); 2 s more for trailing work. An agent's CPU for the join is its CPU over that
stretch less its idle CPU over the quiet window just before (as long as the previous join's
stretch, scaled to this one), so lease renewals are not counted. The agents run with their
periodic full resync pushed out of the measurement (`--resync 600`): a resync is work per
period, not per join, and `python -m bench idle` measures it; one landing in a join's window
would show as that join's cost. Median and max over the other agents. CPU time: utime + stime
of the agent process (/proc/PID/stat), exact from each thread's schedstat where no thread ended
(see common.cpu_seconds).

Targets: <= 5 ms of CPU per join per agent at 10 and at 100 nodes; the 100-node lab up <= 120 s.
Opt-in (not in `make bench`): `python -m bench scale`; try `--nodes 4,8 --joins 2` first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tulle.lab.cluster import Lab
from tulle.lab.etcd_server import stop_pid
from tulle.lab.state import load

from .common import bench_name, cpu_seconds, median, sample_cpu, stop_child, table, verdict, wait_quiet

RESYNC_S = 600  # periodic full resyncs out of the way: they are measured by `bench idle`

NODES = [10, 100]
JOINS = 3
TIMEOUT = 600.0  # seconds for one `lab up`
JOIN_TIMEOUT = 120.0  # seconds for one join to reach every other node
TRAILING = 2.0
QUIET_BELOW, QUIET_TIMEOUT = 0.05, 180.0  # after lab up, wait until no agent uses 5% of a core (or give up)
FIRST_QUIET = 5.0
TARGET_JOIN_MS = 5.0
TARGET_UP_S = 120.0
UP_TARGET_AT = 100


@dataclass
class Join:
    node: str
    agents: int
    propagated_s: float  # from add_node's return (its agent ready) to the routes on every other node
    stretch_s: float  # the measured stretch: add_node, propagation, trailing wait
    cpu_ms: list[float] = field(default_factory=list)  # per other agent, idle CPU taken off
    idle_ms: list[float] = field(default_factory=list)  # the idle CPU taken off, per other agent


@dataclass
class SizeResult:
    nodes: int
    up_s: float | None = None
    up_error: str = ""
    load_after_up: float = float("nan")
    quiet_after_s: float | None = None  # how long after lab up the agents went quiet (None: they did not)
    joins: list[Join] = field(default_factory=list)
    join_error: str = ""


def _routes_211(netns: str, family: int) -> list[dict[str, str]]:
    out = subprocess.run(
        ["ip", "-n", netns, "-j", f"-{family}", "route", "show", "proto", "211"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    routes: list[dict[str, str]] = json.loads(out or "[]")
    return routes


def _own_blocks(netns: str) -> set[str]:
    return {r["dst"] for f in (4, 6) for r in _routes_211(netns, f) if r.get("type") == "blackhole"}


def _routed_blocks(netns: str) -> set[str]:
    return {r["dst"] for f in (4, 6) for r in _routes_211(netns, f) if r.get("type") != "blackhole"}


def _ready_agents(lab: Lab) -> tuple[int, int]:
    """(agents answering ready, nodes in the books), asking them all at once."""
    try:
        nodes = list(load(lab.name)["nodes"])
    except Exception:
        return 0, 0

    def ready(node: str) -> bool:
        try:
            return bool(lab.agent_call(node, {"command": "AGENT_STATUS"}, timeout=2)["result"].get("ready"))
        except Exception:
            return False

    with ThreadPoolExecutor(16) as pool:
        return sum(pool.map(ready, nodes)), len(nodes)


def _lab_up(lab: Lab, nodes: int, mode: str, timeout: float, result: SizeResult) -> bool:
    """`tulle lab up`, timed; on a timeout or failure, interrupted and the reason recorded."""
    argv = [sys.executable, "-m", "tulle.cli.main", "lab", "up", lab.name, "--nodes", str(nodes), "--mode", mode]
    argv += ["--resync", str(RESYNC_S)]
    output: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    reader = threading.Thread(target=lambda: output.extend(proc.stdout or []), daemon=True)
    reader.start()
    try:
        status = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGINT)  # lab up saves its books on the way out
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            stop_child(proc)
        up, total = _ready_agents(lab)
        result.up_error = f"did not come up within {timeout:.0f} s ({up} of {nodes} agents ready, {total} started)"
        return False
    finally:
        reader.join(5)
    elapsed = time.monotonic() - started
    if status != 0:
        last = "".join(output).strip().splitlines()[-1:] or ["(no output)"]
        result.up_error = f"lab up failed after {elapsed:.0f} s: {last[0]}"
        return False
    result.up_s = elapsed
    result.load_after_up = os.getloadavg()[0]
    return True


def _leftover_pids(lab_dir: str) -> list[int]:
    """Processes of the lab that its books may have missed (started just before an interrupt):
    its agents and etcd name files under the lab's own folder."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if f"{lab_dir}/" in cmdline:
            found.append(int(entry))
    return found


def _tear_down(lab: Lab) -> None:
    lab.down()
    for pid in _leftover_pids(lab.dir):
        stop_pid(pid)


def _join(lab: Lab, node: str, quiet: float) -> Join:
    state = load(lab.name)
    agents = {n: int(rec["pid"]) for n, rec in state["nodes"].items()}
    others = {n: lab.names.node(n) for n in agents}  # namespace names, as `ip -n` takes them
    pids = list(agents.values())
    before_quiet, t0 = sample_cpu(pids), time.monotonic()
    time.sleep(quiet)
    start, t1 = sample_cpu(pids), time.monotonic()
    lab.add_node(node)
    ready = time.monotonic()
    new_netns = lab.names.node(node)
    deadline = ready + JOIN_TIMEOUT
    blocks: set[str] = set()
    while not blocks:
        blocks = _own_blocks(new_netns)
        if not blocks and time.monotonic() > deadline:
            raise RuntimeError(f"{node} claimed no block (no blackhole route) within {JOIN_TIMEOUT:.0f} s")
        time.sleep(0.05)
    pending = dict(others)
    while pending:
        pending = {n: ns for n, ns in pending.items() if not blocks <= _routed_blocks(ns)}
        if pending and time.monotonic() > deadline:
            raise RuntimeError(
                f"{node}'s blocks reached {len(others) - len(pending)} of {len(others)} nodes in {JOIN_TIMEOUT:.0f} s"
            )
        if pending:
            time.sleep(0.05)
    propagated = time.monotonic() - ready
    time.sleep(TRAILING)
    end, t2 = sample_cpu(pids), time.monotonic()
    scale = (t2 - t1) / (t1 - t0)
    idle_ms = [cpu_seconds(before_quiet[pid], start[pid]) * scale * 1000 for pid in pids]
    cpu_ms = [cpu_seconds(start[pid], end[pid]) * 1000 - idle for pid, idle in zip(pids, idle_ms, strict=True)]
    return Join(node, len(pids), propagated, t2 - t1, cpu_ms, idle_ms)


def _one_size(nodes: int, joins: int, mode: str, timeout: float) -> SizeResult:
    result = SizeResult(nodes=nodes)
    lab = Lab(bench_name("sc"))
    try:
        print(f"  {nodes} nodes: lab up ({lab.name}, timeout {timeout:.0f} s)...", file=sys.stderr, flush=True)
        if not _lab_up(lab, nodes, mode, timeout, result):
            return result
        pids = [int(rec["pid"]) for rec in load(lab.name)["nodes"].values()]
        settled, waited = wait_quiet(pids, below=QUIET_BELOW, timeout=QUIET_TIMEOUT)
        result.quiet_after_s = waited if settled else None
        quiet = FIRST_QUIET
        for j in range(joins):
            node = f"node{nodes + j + 1}"
            print(f"  {nodes} nodes: join {node}...", file=sys.stderr, flush=True)
            try:
                join = _join(lab, node, quiet)
            except Exception as exc:  # a join that does not finish ends this size's joins, reported
                result.join_error = f"{node}: {exc}"
                break
            result.joins.append(join)
            quiet = join.stretch_s  # the next quiet window as long as this stretch
        return result
    finally:
        _tear_down(lab)


def _ms(values: list[float]) -> str:
    return f"{median(values):.1f} / {max(values):.1f}"


def main(nodes: list[int] | None = None, joins: int = JOINS, timeout: float = TIMEOUT, mode: str = "vxlan") -> None:
    results = [_one_size(n, joins, mode, timeout) for n in (nodes or NODES)]
    up_rows = []
    for r in results:
        target = ""
        if r.nodes >= UP_TARGET_AT:
            value = r.up_s if r.up_s is not None else float("inf")
            target = f"<= {TARGET_UP_S:.0f} s ({verdict(value, TARGET_UP_S, higher_is_better=False)})"
        quiet = ""
        if r.up_s is not None:
            quiet = f"{r.quiet_after_s:.0f} s" if r.quiet_after_s is not None else f"not within {QUIET_TIMEOUT:.0f} s"
        up_rows.append(
            [
                str(r.nodes),
                f"{r.up_s:.1f} s" if r.up_s is not None else r.up_error,
                f"{r.load_after_up:.1f}" if r.up_s is not None else "",
                quiet,
                target,
            ]
        )
    table(
        f"Lab up ({mode} mode, `tulle lab up`: underlay, etcd, every agent ready) on this machine",
        ["nodes", "time", "load average (1 min) after", f"agents below {QUIET_BELOW:.0%} of a core after", "target"],
        up_rows,
    )
    join_rows = []
    for r in results:
        for j in r.joins:
            join_rows.append(
                [
                    str(r.nodes),
                    j.node,
                    str(j.agents),
                    _ms(j.cpu_ms),
                    f"{median(j.idle_ms):.1f}",
                    f"{j.stretch_s:.1f}",
                    f"{j.propagated_s * 1000:.0f}",
                    "",
                ]
            )
        if r.joins:
            every = [v for j in r.joins for v in j.cpu_ms]
            worst_median = max(median(j.cpu_ms) for j in r.joins)
            ok = verdict(worst_median, TARGET_JOIN_MS, higher_is_better=False)
            join_rows.append(
                [
                    str(r.nodes),
                    f"all {len(r.joins)} joins",
                    "",
                    _ms(every),
                    "",
                    "",
                    "",
                    f"<= {TARGET_JOIN_MS:.0f} ms per agent ({ok} at the median of each join)",
                ]
            )
        if r.join_error or not r.up_s:
            join_rows.append([str(r.nodes), "-", "", r.join_error or "no lab", "", "", "", ""])
    table(
        "CPU each other agent spends on a node join (utime + stime over the stretch from add_node to 2 s after "
        "the new node's blocks are routed everywhere, less its idle CPU over an equal quiet window just before): "
        "median / max over the agents; the idle CPU taken off (median); and the time from the new agent being "
        "ready to its blocks routed on every other node",
        [
            "nodes",
            "join",
            "agents",
            "CPU ms median / max",
            "idle ms taken off",
            "stretch s",
            "routes everywhere ms",
            "target",
        ],
        join_rows,
    )
