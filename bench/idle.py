"""An idle agent's CPU use: a 2-node lab with 100 pods and 1,000 NetworkPolicies (bench/policy.py's
generator), left alone once the agents have settled, each agent's CPU time (utime + stime, from
/proc/PID) taken over 120 s with the periodic resync at the agent's default (30 s: four resyncs
fall in the window). The baseline, measured in the same run: the same agents in the empty lab.

Pod k lives in namespace ns<k % 50> with the label app=svc-<k>, so policy k selects it and its
peers (tier=front pods of the namespaces of one team) are real pods of the lab.

Target: < 1% of one core per agent. `--quick` (or BENCH_QUICK=1): 20 pods, 100 policies, 20 s.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tulle.lab.cluster import Lab
from tulle.lab.state import load

from .common import bench_name, cpu_seconds, proc_cpu, sample_cpu, table, verdict, wait_quiet
from .policyset import NAMESPACES, synthetic_objects, write_objects

NODES = 2
PODS, POLICIES, SECONDS, BASELINE_SECONDS = 100, 1000, 120, 30
QUICK = {"pods": 20, "policies": 100, "seconds": 20, "baseline_seconds": 10}
TARGET = 0.01  # of one core
RESYNC = 30.0  # the agent's default resync interval, which the lab leaves alone
SLICE = 10.0  # the busiest stretch of this length is shown too (a resync's share)
PARALLEL = 4  # pod adds at once (each is a CNI ADD through the node's agent)


def _add_pods(lab: Lab, pods: int) -> None:
    def add(k: int) -> None:
        lab.add_pod(
            f"node{k % NODES + 1}",
            f"ns{k % NAMESPACES}",
            f"p{k}",
            {"app": f"svc-{k}", "tier": "front" if k % 3 == 0 else "back"},
            [{"name": "http", "containerPort": 8080, "protocol": "TCP"}],
        )

    with ThreadPoolExecutor(PARALLEL) as pool:
        list(pool.map(add, range(pods)))


def _measure(pids: dict[str, int], seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    """(each process's share of one core over `seconds`, its share in the busiest slice of about
    SLICE seconds)."""
    slices = max(1, round(seconds / SLICE))
    first = previous = sample_cpu(pids.values())
    started = last = time.monotonic()
    busiest = dict.fromkeys(pids, 0.0)
    for i in range(1, slices + 1):
        time.sleep(max(0.0, started + seconds * i / slices - time.monotonic()))
        sample, now = sample_cpu(pids.values()), time.monotonic()
        for name, pid in pids.items():
            busiest[name] = max(busiest[name], cpu_seconds(previous[pid], sample[pid]) / (now - last))
        previous, last = sample, now
    elapsed = last - started
    return {name: cpu_seconds(first[pid], previous[pid]) / elapsed for name, pid in pids.items()}, busiest


def _pct(share: float) -> str:
    return f"{share * 100:.2f}%"


def main(seconds: int | None = None, quick: bool = False) -> None:
    pods, policies = (QUICK["pods"], QUICK["policies"]) if quick else (PODS, POLICIES)
    window = float(seconds or (QUICK["seconds"] if quick else SECONDS))
    baseline_window = float(QUICK["baseline_seconds"] if quick else BASELINE_SECONDS)
    lab = Lab(bench_name("id"))
    try:
        lab.up(nodes=NODES, mode="vxlan")
        state = load(lab.name)
        agents = {f"agent {node}": int(rec["pid"]) for node, rec in sorted(state["nodes"].items())}
        watched = dict(agents, etcd=int(state["etcd"]["pid"]))
        proc_cpu(watched["etcd"])  # fails early if the PID is not there
        wait_quiet(list(agents.values()), timeout=60)
        empty, _ = _measure(watched, baseline_window)

        namespaces, _, all_policies = synthetic_objects()
        started = time.monotonic()
        write_objects(lab, namespaces)
        _add_pods(lab, pods)
        added = time.monotonic() - started
        write_objects(lab, all_policies[:policies])
        settled, waited = wait_quiet(list(agents.values()), timeout=300)
        loaded, busiest = _measure(watched, window)

        rows: list[list[str]] = []
        for name in watched:
            target = f"< {_pct(TARGET)} ({verdict(loaded[name], TARGET, higher_is_better=False)})"
            rows.append(
                [
                    name,
                    _pct(empty[name]),
                    _pct(loaded[name]),
                    _pct(busiest[name]),
                    target if name in agents else "(reference)",
                ]
            )
        table(
            f"Idle CPU, {NODES}-node vxlan lab: share of one core (utime + stime of the process, /proc/PID) over "
            f"{baseline_window:.0f} s in the empty lab (baseline) and over {window:.0f} s with {pods} pods and "
            f"{policies} NetworkPolicies; periodic resync at the agent's default ({RESYNC:.0f} s, "
            f"~{window / RESYNC:.0f} in the window); busiest {SLICE:.0f} s stretch beside",
            ["process", "empty lab", f"{pods} pods, {policies} policies", f"busiest {SLICE:.0f} s", "target"],
            rows,
        )
        for name in agents:
            excess = (loaded[name] - empty[name]) * RESYNC
            print(f"  {name}: {excess * 1000:.0f} ms of CPU per {RESYNC:.0f} s resync period above the empty lab")
        print(
            f"  {pods} pods added in {added:.0f} s; after the policies were written the agents "
            + (f"settled in {waited:.0f} s" if settled else f"were still busy after {waited:.0f} s (measured anyway)")
        )
    finally:
        lab.down()
