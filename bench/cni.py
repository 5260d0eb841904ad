"""CNI ADD latency: the plugin process's own time (as our runtime runs it, alone and 20 in
parallel) and ADD through podman, against podman with no network measured in the same run.

Target: the plugin's own time for an ADD is at most 60 ms at the median.
"""

from __future__ import annotations

import json
import os
import threading
import time
import uuid

from tulle.lab import topology
from tulle.lab.cluster import CNI_PATH, Lab
from tulle.lab.podman import Podman, make_rootfs
from tulle.lab.runtime import exec_plugin

from .common import bench_name, median, percentile, table, verdict

ROUNDS = 30
PARALLEL = 20


def _config(lab: Lab) -> dict[str, object]:
    return {
        "cniVersion": "1.0.0",
        "name": "tulle",
        "type": "tulle",
        "agentSocket": lab.agent_socket("node1"),
        "stateDir": os.path.join(lab.node_dir("node1"), "state"),
    }


def _add_del(lab: Lab, host_netns: str, netns: str) -> tuple[float, float]:
    cid = uuid.uuid4().hex
    conf = _config(lab)
    add = exec_plugin(
        "tulle",
        "ADD",
        conf,
        cni_path=CNI_PATH,
        container_id=cid,
        netns=netns,
        ifname="eth0",
        host_netns=host_netns,
    )
    if add.status != 0:
        raise RuntimeError(add.stdout.decode())
    result = json.loads(add.stdout)
    delete = exec_plugin(
        "tulle",
        "DEL",
        dict(conf, prevResult=result),
        cni_path=CNI_PATH,
        container_id=cid,
        netns=netns,
        ifname="eth0",
        host_netns=host_netns,
    )
    return add.seconds * 1000, delete.seconds * 1000


def main() -> None:
    lab = Lab(bench_name("cn"))
    try:
        lab.up(nodes=1, mode="vxlan")
        host = f"/run/netns/{lab.names.node('node1')}"
        netnses = []
        for i in range(PARALLEL):
            name = f"{lab.name}-pod-b-{i}"
            topology.add_netns(name)
            netnses.append(f"/run/netns/{name}")
        # the plugin alone: one ADD (and DEL) at a time
        alone = [_add_del(lab, host, netnses[i % PARALLEL]) for i in range(ROUNDS)]
        # 20 ADDs at once
        parallel: list[float] = []
        barrier = threading.Barrier(PARALLEL)

        def one(netns: str) -> None:
            barrier.wait()
            parallel.append(_add_del(lab, host, netns)[0])

        threads = [threading.Thread(target=one, args=(n,)) for n in netnses]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # podman: with our network, and with none (the baseline)
        node = lab.status()["nodes"][0]
        podman = Podman(lab.node_dir("node1"), node["netns"], os.path.join(lab.node_dir("node1"), "cni"), CNI_PATH)
        rootfs = make_rootfs(os.path.join(lab.dir, "rootfs"))
        timings: dict[str, list[float]] = {"tulle": [], "none": []}
        for i in range(8):
            for network in ("none", "tulle"):
                name = f"b{network}{i}"
                started = time.perf_counter()
                podman.run(
                    "run",
                    "-d",
                    "--name",
                    name,
                    "--network",
                    network,
                    "--rootfs",
                    rootfs,
                    "/bin/sleep",
                    "1000",
                )
                timings[network].append((time.perf_counter() - started) * 1000)
                podman.remove(name)
        add_times = [a for a, _ in alone]
        del_times = [d for _, d in alone]
        rows = [
            [
                "plugin ADD, alone",
                f"{median(add_times):.1f}",
                f"{percentile(add_times, 90):.1f}",
                f"<= 60 ({verdict(median(add_times), 60, False)})",
            ],
            ["plugin DEL, alone", f"{median(del_times):.1f}", f"{percentile(del_times, 90):.1f}", ""],
            [
                f"plugin ADD, {PARALLEL} in parallel",
                f"{median(parallel):.1f}",
                f"{max(parallel):.1f} (max)",
                "",
            ],
            [
                "podman run --network none (baseline)",
                f"{median(timings['none']):.1f}",
                f"{percentile(timings['none'], 90):.1f}",
                "",
            ],
            [
                "podman run --network tulle",
                f"{median(timings['tulle']):.1f}",
                f"{percentile(timings['tulle'], 90):.1f}",
                f"ratio {median(timings['tulle']) / median(timings['none']):.2f}, "
                f"+{median(timings['tulle']) - median(timings['none']):.0f} ms",
            ],
        ]
        table(
            "CNI ADD latency in ms (the plugin's time includes the agent's work; nsenter adds ~1 ms)",
            ["what", "median", "p90", "target"],
            rows,
        )
    finally:
        lab.down()
