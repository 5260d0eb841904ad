"""Chaos: pods churn on every node while agents are killed and the datastore is paused and
restarted; at the end nothing is lost and nothing is held twice.

`make test` runs a bounded round (CHAOS_SECONDS, 40 s by default); `make chaos` a long one.
The seed is printed, and CHAOS_SEED replays a round's choice of faults.

Invariants checked at the end, once every fault is healed:
- no address is held by two pods (lab, WorkloadEndpoints, IPAM);
- no address is held by nothing: every IPAM allocation belongs to a live pod's endpoint;
- every pod reaches every other pod, both families;
- no pending DEL is left, and no endpoint state file is stuck half-added.
"""

from __future__ import annotations

import ipaddress
import json
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest

from tulle.cni.plugin import AgentUnavailable
from tulle.datastore.base import Datastore, DatastoreError
from tulle.ipam.allocator import list_blocks
from tulle.lab.cluster import Lab, LabError
from tulle.lab.runtime import CniFailure
from tulle.lab.state import LabNotFound
from tulle.model.kinds import WORKLOAD_ENDPOINT

from ..lablib import ping, running_lab, state, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]

NODES = ("node1", "node2", "node3")
LEASE_TTL = 2
PODS_PER_NODE = 3
# What a lab command may fail with while its agent or etcd is down: expected, and counted.
EXPECTED_FAILURES = (LabError, CniFailure, DatastoreError, AgentUnavailable, TimeoutError, OSError, LabNotFound)


@dataclass
class Tally:
    events: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, what: str) -> None:
        with self.lock:
            self.events.append(f"{time.strftime('%H:%M:%S')} {what}")

    def count(self, prefix: str) -> int:
        return sum(1 for e in self.events if e.split(" ", 1)[1].startswith(prefix))


def _churn(lab: Lab, node: str, rng: random.Random, stop: threading.Event, tally: Tally) -> None:
    """Add and delete pods on one node, as a runtime would, whatever state the node is in."""
    serial = 0
    while not stop.is_set():
        mine = [p["pod"] for p in lab.status()["pods"] if p["node"] == node]
        try:
            if len(mine) < PODS_PER_NODE and (not mine or rng.random() < 0.6):
                serial += 1
                name = f"{node}-{serial}"
                lab.add_pod(node, "chaos", name, {"app": "chaos"}, [])
                tally.note(f"add ok {node}/{name}")
            elif mine:
                victim = rng.choice(mine)
                namespace, pod = victim.split("/")
                lab.del_pod(namespace, pod)
                tally.note(f"del ok {victim}")
        except EXPECTED_FAILURES as exc:
            tally.note(f"failed {node}: {type(exc).__name__}: {str(exc)[:120]}")
        stop.wait(rng.uniform(0.1, 0.6))


def _fault(lab: Lab, rng: random.Random, stop: threading.Event, tally: Tally) -> None:
    """One fault at a time, healed before the next: agents killed briefly or past their lease,
    agents restarted, etcd paused briefly or past every lease, etcd stopped and started."""

    def kill(node: str, down: float) -> None:
        os.kill(state(lab)["nodes"][node]["pid"], signal.SIGKILL)
        stop.wait(down)
        lab.start_agent(node)

    def pause(down: float) -> None:
        lab.pause_etcd()
        try:
            stop.wait(down)
        finally:
            lab.resume_etcd()

    def restart_etcd(down: float) -> None:
        lab.stop_etcd()
        try:
            stop.wait(down)
        finally:
            lab.start_etcd()

    faults: list[tuple[str, Callable[[], None]]] = [
        ("kill an agent briefly", lambda: kill(rng.choice(NODES), rng.uniform(0.2, 1.0))),
        ("kill an agent past its lease", lambda: kill(rng.choice(NODES), 2.5 * LEASE_TTL)),
        ("restart an agent", lambda: lab.restart_agent(rng.choice(NODES))),
        ("pause etcd briefly", lambda: pause(rng.uniform(0.5, 1.5))),
        ("pause etcd past every lease", lambda: pause(2.5 * LEASE_TTL)),
        ("stop and start etcd", lambda: restart_etcd(rng.uniform(0.5, 3.0))),
    ]
    while not stop.is_set():
        name, fault = rng.choice(faults)
        tally.note(f"fault {name}")
        try:
            fault()
        except EXPECTED_FAILURES as exc:
            tally.note(f"fault failed {name}: {exc}")
        stop.wait(rng.uniform(0.5, 2.0))


def _heal(lab: Lab) -> None:
    """Every process back: etcd running and answering, every agent running and ready."""
    lab.start_etcd()
    for node in NODES:
        lab.start_agent(node)
        lab.wait_agent_ready(state(lab), node, timeout=60)


def _pending_and_stuck(lab: Lab) -> list[str]:
    found = []
    for node in NODES:
        base = os.path.join(lab.node_dir(node), "state")
        pending = os.path.join(base, "pending-del")
        if os.path.isdir(pending):
            found += [f"{node}: pending DEL {n}" for n in os.listdir(pending)]
        endpoints = os.path.join(base, "endpoints")
        for name in os.listdir(endpoints):
            with open(os.path.join(endpoints, name)) as f:
                record = json.load(f)
            if record.get("state") != "ready":
                found.append(f"{node}: endpoint {record.get('namespace')}/{record.get('pod')} is {record.get('state')}")
    return found


def _datastore_view(lab: Lab) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """(WorkloadEndpoints, address -> IPAM handle) as the datastore has them."""

    def read(store: Datastore) -> tuple[list[dict[str, Any]], dict[str, str]]:
        weps = store.list(WORKLOAD_ENDPOINT)[0]
        allocations = {
            address: str(attrs.get("handle"))
            for block in list_blocks(store)
            for address, attrs in block.allocations.items()
        }
        return weps, allocations

    result: tuple[list[dict[str, Any]], dict[str, str]] = lab.with_store(state(lab), read)
    return result


def check_invariants(lab: Lab) -> list[str]:
    """Every broken invariant, as a sentence (empty when all hold)."""
    problems = _pending_and_stuck(lab)
    pods = lab.status()["pods"]
    by_address: dict[str, list[str]] = {}
    for pod in pods:
        for ip in pod["ips"]:
            by_address.setdefault(ip, []).append(pod["pod"])
    problems += [f"{ip} is held by pods {', '.join(who)}" for ip, who in by_address.items() if len(who) > 1]
    weps, allocations = _datastore_view(lab)
    endpoint_of, endpoint_problems = _endpoints_against_ipam(weps, allocations)
    problems += endpoint_problems
    problems += [
        f"{ip} is held in IPAM by {handle}, which no endpoint has (a leak)"
        for ip, handle in allocations.items()
        if not handle.startswith("tulle-tunnel/") and ip not in endpoint_of
    ]
    problems += [
        f"pod {who[0]} at {ip} has no endpoint in the datastore ({endpoint_of.get(ip)})"
        for ip, who in by_address.items()
        if endpoint_of.get(ip) != who[0]
    ]
    return problems + _unreachable_pairs(pods)


def _endpoints_against_ipam(
    weps: list[dict[str, Any]], allocations: dict[str, str]
) -> tuple[dict[str, str], list[str]]:
    """(address -> namespace/pod of its endpoint, problems): an address in two endpoints, or held
    in IPAM by another handle than its endpoint's."""
    endpoint_of: dict[str, str] = {}
    problems: list[str] = []
    for wep in weps:
        spec = wep["spec"]
        who = f"{wep['metadata']['namespace']}/{spec['pod']}"
        handle = f"{spec['network']}/{spec['containerID']}/{spec['ifname']}"
        for ip in spec["ips"]:
            if ip in endpoint_of:
                problems.append(f"{ip} is in the endpoints of {endpoint_of[ip]} and {who}")
            endpoint_of[ip] = who
            if allocations.get(ip) != handle:
                problems.append(f"{ip} of {who} is held in IPAM by {allocations.get(ip)}, not by its endpoint")
    return endpoint_of, problems


def _unreachable_pairs(pods: list[dict[str, Any]]) -> list[str]:
    """Every pod pings every other pod's every address."""
    problems: list[str] = []
    for src in pods:
        for dst in pods:
            if src is dst:
                continue
            problems += [
                f"{src['pod']} cannot reach {dst['pod']} at {ip}"
                for ip in dst["ips"]
                if not ping(src["netns"], ip, count=2)
            ]
    return problems


def run_chaos(seconds: float, seed: int) -> None:
    rng = random.Random(seed)
    print(f"\n[chaos] seed {seed}, {seconds:.0f} s (CHAOS_SEED={seed} replays the choice of faults)")
    with running_lab("ch", nodes=len(NODES), mode="hybrid", lease_ttl=LEASE_TTL, node_grace=3.0) as lab:
        stop = threading.Event()
        tally = Tally()
        threads = [
            threading.Thread(target=_churn, args=(lab, n, random.Random(rng.random()), stop, tally)) for n in NODES
        ]
        threads.append(threading.Thread(target=_fault, args=(lab, random.Random(rng.random()), stop, tally)))
        for t in threads:
            t.start()
        try:
            stop.wait(seconds)
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=180)
        assert not any(t.is_alive() for t in threads), "a chaos thread did not finish"
        _heal(lab)
        # the agents replay what waited (DELs, re-publishing) within a resync or two
        problems: list[str] = []

        def settled() -> bool:
            problems[:] = check_invariants(lab)
            return not problems

        ok = wait_until(settled, timeout=90, interval=3)
        summary = {k: tally.count(k) for k in ("fault", "add ok", "del ok", "failed")}
        print(f"[chaos] {summary}")
        if not ok:
            print("\n".join(tally.events[-60:]))
        assert ok, "\n".join(problems)
        assert summary["fault"] >= 3 and summary["add ok"] >= 3 and summary["del ok"] >= 1, summary
        assert len({ipaddress.ip_address(ip).version for p in lab.status()["pods"] for ip in p["ips"]}) == 2


def test_chaos_round() -> None:
    seconds = float(os.environ.get("CHAOS_SECONDS", "40"))
    seed = int(os.environ.get("CHAOS_SEED") or random.SystemRandom().randrange(1 << 30))
    run_chaos(seconds, seed)
