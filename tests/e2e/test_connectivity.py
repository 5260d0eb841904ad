"""`tulle connectivity test` as a user runs it, on one 2-node dual-stack lab: it passes on a healthy
lab, reports a broken datapath as failures with a non-zero exit, refuses a namespace it did not
make, and whatever happens (a pass, failures, SIGINT, an earlier run killed outright) leaves no
pod, policy, namespace or network namespace of its own behind."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from tulle.connectivity.checks import NAMESPACE, deny_policy
from tulle.datastore.base import AtomicWriter, Datastore
from tulle.lab.cluster import DEFAULT_POOLS, Lab
from tulle.model.kinds import NAMESPACE as NAMESPACE_KIND
from tulle.model.kinds import NETWORK_POLICY, POD, WORKLOAD_ENDPOINT
from tulle.model.validation import admit_all

from ..lablib import node_netns, run_in, state, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]
TULLE = os.path.join(os.path.dirname(sys.executable), "tulle")
PROBE_PODS = {"echo", "client-a", "client-b"}


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(f"h10f{secrets.token_hex(2)}")
    try:
        lab.up(nodes=2, mode="vxlan")
        yield lab
    finally:
        lab.down()


def connectivity_test(lab: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [TULLE, "connectivity", "test", "--lab", lab.name, *args], capture_output=True, text=True, timeout=300
    )


def start_connectivity_test(lab: Lab, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [TULLE, "connectivity", "test", "--lab", lab.name, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def left_behind(lab: Lab) -> list[str]:
    """Whatever of the test's namespace is still anywhere: the datastore, the lab's books, the kernel."""

    def read(store: Datastore) -> list[str]:
        found = [f"namespace {NAMESPACE}"] if store.get(NAMESPACE_KIND, NAMESPACE) else []
        for kind in (POD, NETWORK_POLICY, WORKLOAD_ENDPOINT):
            found += [f"{kind.kind} {o['metadata']['name']}" for o in store.list(kind, NAMESPACE)[0]]
        return found

    found = lab.with_store(state(lab), read)
    found += [f"lab pod {key}" for key in state(lab)["pods"] if key.startswith(f"{NAMESPACE}/")]
    found += [f"netns {n}" for n in os.listdir("/run/netns") if n.startswith(lab.names.pod(NAMESPACE, ""))]
    return found


def probe_pods_added(lab: Lab) -> bool:
    pods = state(lab)["pods"]
    return all(not pods.get(f"{NAMESPACE}/{name}", {"phase": "absent"}).get("phase") for name in PROBE_PODS)


@contextmanager
def pod_traffic_dropped_on(lab: Lab, node: str) -> Iterator[None]:
    """A datapath broken on one node: an nft table of the test's own drops the pod-to-pod traffic the
    node forwards (so the pods on it reach no pod on another node), and nothing else."""
    v4, v6 = DEFAULT_POOLS[4][1], DEFAULT_POOLS[6][1]
    table = (
        "table inet connectivity_test_cut {\n"
        "  chain forward {\n"
        "    type filter hook forward priority -400; policy accept;\n"
        f"    ip saddr {v4} ip daddr {v4} drop\n"
        f"    ip6 saddr {v6} ip6 daddr {v6} drop\n"
        "  }\n"
        "}\n"
    )
    netns = node_netns(lab, node)
    subprocess.run(["nsenter", f"--net={netns}", "nft", "-f", "-"], input=table, text=True, check=True)
    try:
        yield
    finally:
        run_in(netns, ["nft", "delete", "table", "inet", "connectivity_test_cut"], check=True)


def test_a_healthy_lab_passes_every_check_and_nothing_is_left_behind(lab: Lab) -> None:
    done = connectivity_test(lab, "-o", "json")
    assert done.returncode == 0, done.stdout + done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert (report["passed"], report["failed"], report["skipped"]) == (32, 0, 0), report
    assert {(c["family"], c["protocol"]) for c in report["checks"]} == {
        ("IPv4", "TCP"),
        ("IPv4", "UDP"),
        ("IPv6", "TCP"),
        ("IPv6", "UDP"),
    }
    outside = [c for c in report["checks"] if c["check"] == "pod to outside (masquerade)"]
    assert {c["from"]["node"] for c in outside} == {"node1", "node2"}
    assert left_behind(lab) == []


def test_a_broken_datapath_is_reported_as_failures_with_a_nonzero_exit(lab: Lab) -> None:
    with pod_traffic_dropped_on(lab, "node2"):
        done = connectivity_test(lab, "--timeout", "3")
    assert done.returncode == 1, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    across = [line for line in lines if "pod to pod, across nodes" in line]
    assert len(across) == 4 and all(line.startswith("FAIL") and "no answer: timed out" in line for line in across)
    allowed = [line for line in lines if "the allowed peer gets through" in line]
    assert len(allowed) == 4 and all(line.startswith("FAIL") for line in allowed)
    same = [line for line in lines if "pod to pod, same node" in line]
    assert len(same) == 4 and all(line.startswith("PASS") for line in same)
    assert lines[-1].startswith("8 of 32 checks FAILED (24 passed, 0 skipped)")
    assert "Traceback" not in done.stderr
    assert left_behind(lab) == []


def test_an_interrupted_run_cleans_up(lab: Lab) -> None:
    # Across nodes nothing gets through: the run waits in its first checks until it is interrupted.
    with pod_traffic_dropped_on(lab, "node2"):
        run = start_connectivity_test(lab, "--timeout", "300")
        try:
            assert wait_until(lambda: probe_pods_added(lab), timeout=60)
            assert left_behind(lab) != []
            run.send_signal(signal.SIGINT)
            out, err = run.communicate(timeout=60)
        finally:
            if run.poll() is None:
                run.kill()
                run.wait()
    assert run.returncode == 130, out + err
    assert "SIGINT: stopping; cleaning up first" in err and "Traceback" not in err
    assert "interrupted after" in out.splitlines()[-1]
    assert left_behind(lab) == []


def test_what_a_killed_run_left_is_removed_by_the_next_run(lab: Lab) -> None:
    with pod_traffic_dropped_on(lab, "node2"):
        run = start_connectivity_test(lab, "--timeout", "300")
        try:
            assert wait_until(lambda: probe_pods_added(lab), timeout=60)
        finally:
            run.kill()
            run.communicate()

    # A policy such a run could have left too: the next run's pod-to-pod checks fail unless it goes.
    def leave_a_policy(store: Datastore) -> None:
        assert isinstance(store, AtomicWriter)
        store.apply_many([deny_policy(NAMESPACE)], admit=admit_all)

    lab.with_store(state(lab), leave_a_policy)
    left = left_behind(lab)
    assert f"namespace {NAMESPACE}" in left and "NetworkPolicy default-deny-ingress" in left
    assert {f"lab pod {NAMESPACE}/{name}" for name in PROBE_PODS} <= set(left)
    done = connectivity_test(lab)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "removing what an earlier run left" in done.stderr
    assert left_behind(lab) == []


def test_a_namespace_the_test_did_not_make_is_refused_and_left_as_it_is(lab: Lab) -> None:
    lab.add_pod("node1", NAMESPACE, "mine", {"app": "mine"}, [])
    try:
        done = connectivity_test(lab)
        assert done.returncode == 1
        assert done.stderr.strip().splitlines() == [
            f"error: namespace {NAMESPACE} exists and was not made by `tulle connectivity test` (it lacks the "
            "label app.kubernetes.io/managed-by=tulle-connectivity); nothing was changed: delete it, or name "
            "another with --namespace"
        ]
        assert f"lab pod {NAMESPACE}/mine" in left_behind(lab)
        bad_node = connectivity_test(lab, "--namespace", "elsewhere", "--node", "node9")
        assert bad_node.returncode == 1
        assert bad_node.stderr == "error: --node node9: no such node (nodes: node1, node2)\n"
    finally:
        lab.del_pod(NAMESPACE, "mine")

        def delete_namespace(store: Datastore) -> None:
            assert isinstance(store, AtomicWriter)
            store.delete_namespace(NAMESPACE)

        lab.with_store(state(lab), delete_namespace)
    assert left_behind(lab) == []
