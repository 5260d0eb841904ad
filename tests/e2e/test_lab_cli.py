"""The `tulle lab` command as a user runs it: exec passes stdin, stdout and the exit status
through; --json output; an IPv4-only lab; addresses leaked while the agent was away are
collected when it starts; `tulle status` shows policy drops."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tulle.datastore.base import Datastore
from tulle.ipam.allocator import NodeAllocator
from tulle.model.pools import parse_pool, pool_object

from ..lablib import ping, pod_netns, running_lab, state, unique_lab_name, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]
TULLE = os.path.join(os.path.dirname(sys.executable), "tulle")


def tulle(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
    return subprocess.run([TULLE, *args], input=stdin, capture_output=True, text=True, timeout=120)


def test_lab_cli_end_to_end() -> None:
    name = unique_lab_name("cl")
    try:
        up = tulle("lab", "up", name, "--nodes", "2", "--mode", "vxlan", "--ipv4-only", "--json")
        assert up.returncode == 0, up.stderr
        status = json.loads(up.stdout)
        assert [n["name"] for n in status["nodes"]] == ["node1", "node2"]
        assert all(len(n["addresses"]) == 2 for n in status["nodes"])
        assert status["external"]["addresses"] == ["172.30.100.2", "fd30:100::2"]
        added = tulle("lab", "pod", "add", name, "node1", "x/a", "--label", "app=a", "--port", "http:80/TCP", "--json")
        assert added.returncode == 0, added.stderr
        pod = json.loads(added.stdout)
        assert pod["pod"] == "x/a" and pod["node"] == "node1"
        assert len(pod["ips"]) == 1 and ":" not in pod["ips"][0]  # IPv4 only
        tulle("lab", "pod", "add", name, "node2", "x/b")
        # exec: stdin in, stdout out, the exit status through
        echo = tulle("lab", "exec", name, "x/a", "--", "sh", "-c", "cat; exit 3", stdin="hello\n")
        assert echo.returncode == 3 and echo.stdout == "hello\n"
        b = json.loads(tulle("lab", "status", name, "--json").stdout)["pods"][1]["ips"][0]
        assert tulle("lab", "exec", name, "x/a", "--", "ping", "-c1", "-W2", b).returncode == 0
        # the Pod object carries labels, ports and status, as the kubelet would leave it
        got = json.loads(tulle("get", "pod", "a", "-n", "x", "-o", "json", "--lab", name).stdout)
        assert got["metadata"]["labels"] == {"app": "a"}
        assert got["spec"]["containers"][0]["ports"][0]["name"] == "http"
        assert got["status"]["podIPs"] == [{"ip": pod["ips"][0]}]
        assert tulle("lab", "pod", "del", name, "x/b").returncode == 0
        assert tulle("lab", "exec", name, "x/b", "--", "true").returncode == 1
    finally:
        assert tulle("lab", "down", name, "--ignore-not-found").returncode == 0  # also if `up` made nothing


def test_leaked_addresses_are_collected_when_the_agent_starts() -> None:
    with running_lab("lk", nodes=1, mode="host-gw") as lab:
        lab.add_pod("node1", "x", "a", {}, [])
        lab.stop_agent("node1")

        def handles(store: Datastore) -> set[str]:
            return set(NodeAllocator(store, "node1", lambda: []).allocations())

        pools = [parse_pool(pool_object("default-ipv4", "10.244.0.0/16", 26))]

        def leak_with_pools(store: Datastore) -> None:
            NodeAllocator(store, "node1", lambda: pools).allocate(
                "tulle/crashed-container/eth0", [4], {"pod": "x/ghost"}
            )

        lab.with_store(state(lab), leak_with_pools)
        assert "tulle/crashed-container/eth0" in lab.with_store(state(lab), handles)
        lab.start_agent("node1")
        remaining = lab.with_store(state(lab), handles)
        assert "tulle/crashed-container/eth0" not in remaining
        assert any(h.endswith("/eth0") for h in remaining)  # x/a keeps its address


def test_status_shows_policy_drops() -> None:
    with running_lab("st", nodes=2, mode="vxlan") as lab:
        lab.add_pod("node1", "x", "a", {"app": "a"}, [])
        lab.add_pod("node2", "x", "b", {"app": "b"}, [])
        policy = (
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n"
            "metadata: {name: deny, namespace: x}\nspec:\n  podSelector: {matchLabels: {app: a}}\n"
        )
        assert tulle("apply", "--lab", lab.name, "-f", "-", stdin=policy).returncode == 0
        a = state(lab)["pods"]["x/a"]["ips"][0]

        def dropped() -> int:
            out = json.loads(tulle("status", "--lab", lab.name, "-o", "json").stdout)
            return sum(d["packets"] for n in out["nodes"] for d in n.get("drops", []) if d["pod"] == "x/a")

        assert wait_until(lambda: not ping(pod_netns(lab, "x/b"), a, count=1), timeout=10)
        assert dropped() >= 1
        text = tulle("status", "--lab", lab.name).stdout
        assert "x/a" in text and "ingress" in text
