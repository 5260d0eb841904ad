"""The agent's memory (RSS) with 100 pods, and the time a node join takes to reach every other
node (from the new agent's registration to the route for its block on all others).

Targets: RSS <= 60 MB; join <= 2 s.
"""

from __future__ import annotations

import json
import time
from datetime import datetime

from tulle.lab.cluster import Lab
from tulle.lab.state import load

from .common import bench_name, median, table, verdict

PODS = 100


def rss_mb(pid: int) -> float:
    """RSS of the agent process (nsenter execs the agent, so the PID is the agent's)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _routes_211(netns: str) -> set[str]:
    import subprocess

    out = subprocess.run(
        ["ip", "-n", netns, "-j", "route", "show", "proto", "211"], capture_output=True, text=True
    ).stdout
    return {r["dst"] for r in json.loads(out or "[]") if r.get("type") != "blackhole"}


def _registered_at(log_path: str) -> float:
    with open(log_path) as f:
        for line in f:
            if '"registered node"' in line:
                stamp = json.loads(line)["time"]
                return datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").timestamp() + time.timezone * 0
    raise RuntimeError("the new agent never registered")


def main() -> None:
    lab = Lab(bench_name("ag"))
    try:
        lab.up(nodes=3, mode="vxlan")
        pid = load(lab.name)["nodes"]["node1"]["pid"]
        idle = rss_mb(pid)
        for i in range(PODS):
            lab.add_pod(
                "node1",
                "bench",
                f"p{i}",
                {"app": f"a{i % 10}"},
                [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
            )
        time.sleep(2)
        busy = rss_mb(pid)
        joins = []
        for n in range(4, 7):
            node = f"node{n}"
            others = [lab.names.node(f"node{i}") for i in range(1, n)]
            before = {o: _routes_211(o) for o in others}
            lab.add_node(node)
            registered = _registered_at(f"{lab.node_dir(node)}/agent.log")
            deadline = time.time() + 30
            reached = None
            while time.time() < deadline:
                if all(_routes_211(o) - before[o] for o in others):
                    reached = time.time()
                    break
                time.sleep(0.01)
            if reached is None:
                raise RuntimeError(f"{node}'s block did not reach every node within 30 s")
            joins.append(reached - registered)
        table(
            "Agent",
            ["what", "value", "target"],
            [
                ["agent RSS, no pods (baseline)", f"{idle:.1f} MB", ""],
                [f"agent RSS, {PODS} pods", f"{busy:.1f} MB", f"<= 60 MB ({verdict(busy, 60, False)})"],
                [
                    "node join reaches every other node",
                    f"{median(joins) * 1000:.0f} ms median, {max(joins) * 1000:.0f} ms max",
                    f"<= 2000 ms ({verdict(max(joins), 2.0, False)})",
                ],
            ],
        )
    finally:
        lab.down()
