"""A lab's pods as a user sees them: the pods of a removed node, and pods that serve their ports.

- A removed node's pods read as lost (`tulle get po`: 0/1 Unknown) at once; the agents delete
  them and their WorkloadEndpoints after the grace period (`--node-grace`), Pod objects the
  lab did not make included; `tulle lab pod del` clears a pod of a removed node at any time
  (docs/design/ipam.md, invariant 8; docs/design/agent.md, invariant 7).
- `tulle lab pod add --serve` answers on the declared TCP and UDP ports, in both families,
  with the pod's name, from a process the lab stops by PID with the pod, its node or the lab.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tulle.dataplane.netns import run_in_netns
from tulle.datastore.base import Datastore, Obj
from tulle.ipam.allocator import list_blocks
from tulle.lab.cluster import Lab, LabError
from tulle.lab.etcd_server import pid_alive
from tulle.model.kinds import POD, WORKLOAD_ENDPOINT
from tulle.model.validation import AdmissionErrors

from ..lablib import lab_leftovers, pod_ips, pod_netns, state, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]
TULLE = os.path.join(os.path.dirname(sys.executable), "tulle")
GRACE = 8.0  # long enough to see the lost pods, short enough to wait for their collection


def tulle(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TULLE, *args], capture_output=True, text=True, timeout=120)


def lab_name() -> str:
    return f"h10b{secrets.token_hex(2)}"


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(lab_name())
    try:
        lab.up(nodes=2, mode="vxlan", node_grace=GRACE)
        lab.add_pod("node1", "client", "c", {}, [])
        yield lab
    finally:
        lab.down()


def _objects(lab: Lab, kind: Any) -> list[Obj]:
    return lab.with_store(state(lab), lambda store: store.list(kind)[0])


def _pod_table(lab: Lab, namespace: str) -> dict[str, dict[str, str]]:
    """`tulle get po` as printed: each pod's row by column name."""
    out = tulle("get", "po", "-n", namespace, "--lab", lab.name)
    assert out.returncode == 0, out.stderr
    header, *lines = out.stdout.splitlines()
    return {row[0]: dict(zip(header.split(), row, strict=False)) for row in (line.split() for line in lines)}


def _server_pid(lab: Lab, key: str) -> int:
    return int(state(lab)["pods"][key]["server"]["pid"])


def test_a_removed_nodes_pods_show_lost_at_once_and_go_with_their_endpoints_after_the_grace(lab: Lab) -> None:
    lab.add_node("node3")
    lab.add_pod("node3", "rm", "gone", {}, [{"name": "http", "containerPort": 80, "protocol": "TCP"}], serve=True)
    lab.add_pod("node3", "rm", "early", {}, [])
    lab.add_pod("node1", "rm", "stay", {}, [])
    server = _server_pid(lab, "rm/gone")

    def apply_pod_on_node3(store: Datastore) -> None:  # a Pod object the lab did not make
        store.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "applied", "namespace": "rm"},
                "spec": {"nodeName": "node3", "containers": [{"name": "main", "image": "busybox"}]},
                "status": {"phase": "Running"},
            }
        )

    lab.with_store(state(lab), apply_pod_on_node3)
    blocks3 = {str(b.cidr) for b in lab.with_store(state(lab), list_blocks) if b.node == "node3"}
    assert blocks3
    lab.del_node("node3")
    assert not pid_alive(server)  # the pod's server went with its node
    # At once, and within the grace: lost, not Running.
    table = _pod_table(lab, "rm")
    assert {name: (row["READY"], row["STATUS"]) for name, row in table.items()} == {
        "applied": ("0/1", "Unknown"),
        "early": ("0/1", "Unknown"),
        "gone": ("0/1", "Unknown"),
        "stay": ("1/1", "Running"),
    }
    shown = json.loads(tulle("get", "po", "gone", "-n", "rm", "-o", "json", "--lab", lab.name).stdout)
    assert shown["status"]["reason"] == "NodeLost"
    # `lab pod del` clears a pod of a removed node: the lab's record and its Pod object.
    lab.del_pod("rm", "early")
    assert "rm/early" not in state(lab)["pods"]
    assert "early" not in {o["metadata"]["name"] for o in _objects(lab, POD)}
    # After the grace the agents delete the node's Pods and endpoints, then free its blocks.
    assert wait_until(
        lambda: not [o for o in _objects(lab, POD) if o["spec"].get("nodeName") == "node3"], timeout=GRACE + 30
    )
    assert wait_until(
        lambda: not [o for o in _objects(lab, WORKLOAD_ENDPOINT) if o["spec"]["node"] == "node3"], timeout=10
    )
    assert wait_until(lambda: not [b for b in lab.with_store(state(lab), list_blocks) if b.node == "node3"])
    assert {o["metadata"]["name"] for o in _objects(lab, POD) if o["metadata"]["namespace"] == "rm"} == {"stay"}
    status = json.loads(tulle("lab", "status", lab.name, "--json").stdout)
    assert status["podsOfRemovedNodes"] == [{"pod": "rm/gone", "node": "node3"}]
    deleted = tulle("lab", "pod", "del", lab.name, "rm/gone")
    assert deleted.returncode == 0, deleted.stderr
    assert "rm/gone" not in state(lab)["pods"]


def _ask_tcp(netns: str, address: str, port: int) -> bytes:
    def ask() -> bytes:
        with socket.create_connection((address, port), timeout=5) as conn:
            got = b""
            while chunk := conn.recv(100):
                got += chunk
            return got

    return run_in_netns(netns, ask)


def _ask_udp(netns: str, address: str, port: int) -> bytes:
    def ask() -> bytes:
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.settimeout(5)
            sock.sendto(b"who are you?", (address, port))
            return sock.recvfrom(100)[0]

    return run_in_netns(netns, ask)


def test_serve_answers_with_the_pods_name_on_its_tcp_and_udp_ports_and_stops_with_the_pod(lab: Lab) -> None:
    added = tulle(
        "lab", "pod", "add", lab.name, "node2", "sv/web", "--port", "http:80/TCP", "--port", "dns:53/UDP", "--serve"
    )
    assert added.returncode == 0, added.stderr
    assert "(serving 80/TCP, 53/UDP)" in added.stdout
    client = pod_netns(lab, "client/c")
    for family, address in pod_ips(lab, "sv/web").items():
        assert _ask_tcp(client, address, 80) == b"web\n", family
        assert _ask_udp(client, address, 53) == b"web", family
    [shown] = [p for p in json.loads(tulle("lab", "status", lab.name, "--json").stdout)["pods"] if p["pod"] == "sv/web"]
    assert shown["serving"]["ports"] == ["80/TCP", "53/UDP"] and shown["serving"]["state"] == "running"
    server = _server_pid(lab, "sv/web")
    lab.del_pod("sv", "web")
    assert not pid_alive(server)


def test_serve_refuses_what_it_cannot_serve_and_leaves_nothing(lab: Lab) -> None:
    for ports, why in (
        ([{"name": "sig", "containerPort": 9, "protocol": "SCTP"}], "only TCP and UDP can be served"),
        ([], "--serve needs a port to serve"),
    ):
        with pytest.raises(LabError, match=why):
            lab.add_pod("node2", "sv", "bad", {}, ports, serve=True)
        assert "sv/bad" not in state(lab)["pods"]
        assert "bad" not in {o["metadata"]["name"] for o in _objects(lab, POD)}


def test_a_pod_add_refused_by_admission_leaves_the_pod_that_was_there(lab: Lab) -> None:
    def apply_pod_on_node2(store: Datastore) -> None:  # a user's Pod of the same name, on another node
        store.create(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "theirs", "namespace": "client"},
                "spec": {"nodeName": "node2", "containers": [{"name": "main", "image": "busybox"}]},
            }
        )

    lab.with_store(state(lab), apply_pod_on_node2)
    with pytest.raises(AdmissionErrors, match=r"spec\.nodeName"):
        lab.add_pod("node1", "client", "theirs", {}, [])
    pods = {o["metadata"]["name"]: o for o in _objects(lab, POD)}
    assert pods["theirs"]["spec"]["nodeName"] == "node2"
    assert "client/theirs" not in state(lab)["pods"]


def test_lab_down_stops_the_pods_servers() -> None:
    lab = Lab(lab_name())
    try:
        lab.up(nodes=1, mode="host-gw", ipv4_only=True)
        lab.add_pod("node1", "x", "a", {}, [{"name": "echo", "containerPort": 7, "protocol": "UDP"}], serve=True)
        server = _server_pid(lab, "x/a")
        assert pid_alive(server)
    finally:
        lab.down()
    assert not pid_alive(server)
    assert lab_leftovers(lab.name) == []
