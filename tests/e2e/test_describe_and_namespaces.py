"""What a user reads of a running lab, and what deleting a namespace does to its traffic:

- `tulle policy trace` answers a script: 1 for a flow denied, 0 for one allowed, and names the
  policy and rule in the user's words;
- deleting a Namespace deletes its Pods, NetworkPolicies and WorkloadEndpoints, and its
  policies stop holding traffic on every node (its pods' network, which no kubelet tears down in
  the lab, is reachable again);
- a CNI failure a real agent answers for a pod is shown by `tulle describe pod`, from the Node
  its agent published it on; `tulle describe node` and `tulle get nodes -o wide` show the
  node's blocks, pods, underlay interface and (no) problems as its agent published them.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tulle.dataplane.netns import run_in_netns
from tulle.lab.cluster import Lab
from tulle.model.kinds import NETWORK_POLICY, POD

from ..lablib import pod_ips, pod_netns, state, wait_until

pytestmark = [pytest.mark.root, pytest.mark.slow]
TULLE = os.path.join(os.path.dirname(sys.executable), "tulle")

DENY_ALL = """
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: deny-all, namespace: shop}
spec: {podSelector: {}}
"""
BROKEN = """
apiVersion: v1
kind: Pod
metadata: {name: broken, namespace: default}
spec:
  nodeName: node1
  containers: [{name: main, image: busybox}]
"""


def tulle(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([TULLE, *args], input=stdin, capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    lab = Lab(f"h10d{secrets.token_hex(2)}")
    try:
        lab.up(nodes=2, mode="vxlan")
        lab.add_pod(
            "node1",
            "shop",
            "web",
            {"app": "web"},
            [{"name": "http", "containerPort": 80, "protocol": "TCP"}],
            serve=True,
        )
        lab.add_pod("node2", "default", "client", {}, [])
        yield lab
    finally:
        lab.down()


def _answers(lab: Lab, address: str) -> bool:
    """Whether the web pod's server answers the client on TCP 80 (a dropped SYN times out)."""

    def ask() -> bool:
        try:
            with socket.create_connection((address, 80), timeout=1.0) as conn:
                return conn.recv(100) == b"web\n"
        except OSError:
            return False

    return bool(run_in_netns(pod_netns(lab, "default/client"), ask))


def _count(lab: Lab, kind: object, namespace: str) -> int:
    return len(lab.with_store(state(lab), lambda store: store.list(kind, namespace)[0]))


def test_a_deleted_namespaces_policies_stop_holding_traffic_and_its_objects_go(lab: Lab) -> None:
    web = pod_ips(lab, "shop/web")[4]
    assert wait_until(lambda: _answers(lab, web), 20)
    applied = tulle("apply", "--lab", lab.name, "-f", "-", stdin=DENY_ALL)
    assert applied.returncode == 0, applied.stderr
    assert wait_until(lambda: not _answers(lab, web), 20)
    traced = tulle("policy", "trace", "--lab", lab.name, "default/client", "shop/web", "80/tcp")
    assert traced.returncode == 1, traced.stdout + traced.stderr  # denied
    assert "ingress: pod shop/web is isolated by policy shop/deny-all" in traced.stdout
    assert "atom" not in traced.stdout

    deleted = tulle("delete", "ns", "shop", "--lab", lab.name)
    assert deleted.returncode == 0 and deleted.stdout == 'namespace "shop" deleted\n', deleted.stderr
    assert _count(lab, POD, "shop") == 0 and _count(lab, NETWORK_POLICY, "shop") == 0
    assert wait_until(lambda: _answers(lab, web), 20)  # the policy is gone from node1's datapath
    traced = tulle("policy", "trace", "--lab", lab.name, "default/client", web, "80/tcp")
    assert traced.returncode == 0, traced.stdout + traced.stderr  # allowed


def test_describe_shows_a_cni_failure_and_what_the_agents_published(lab: Lab) -> None:
    assert tulle("apply", "--lab", lab.name, "-f", "-", stdin=BROKEN).returncode == 0
    request = {  # what a kubelet's runtime sends when the sandbox's namespace went away meanwhile
        "command": "ADD",
        "containerID": "h10dbroken",
        "ifname": "eth0",
        "netns": "/run/netns/h10d-gone",
        "args": {"K8S_POD_NAMESPACE": "default", "K8S_POD_NAME": "broken"},
        "config": {"cniVersion": "1.1.0", "name": "tulle", "type": "tulle"},
    }
    answer = lab.agent_call("node1", request)
    assert answer["error"]["code"] == 4, answer

    def described() -> str:
        done = tulle("describe", "pod", "broken", "--lab", lab.name)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert wait_until(lambda: "CNI_NETNS /run/netns/h10d-gone does not exist" in described(), 20), described()
    assert "ADD failed with CNI error 4" in described() and "(on node1)" in described()

    node = tulle("describe", "node", "node1", "--lab", lab.name)
    assert node.returncode == 0, node.stderr
    assert "Status:         Ready" in node.stdout and "Problems:       <none>" in node.stdout
    assert "default/broken" in node.stdout and "addresses in use" in node.stdout
    wide = tulle("get", "nodes", "-o", "wide", "--lab", lab.name)
    assert wide.returncode == 0, wide.stderr
    header, *rows = (line.split() for line in wide.stdout.splitlines())
    assert header == ["NAME", "STATUS", "MODE", "ADDRESSES", "BLOCKS", "PODS", "AGE", "BLOCK-CIDRS", "UNDERLAY"]
    row = dict(zip(header, rows[0], strict=True))
    assert (row["NAME"], row["STATUS"], row["MODE"]) == ("node1", "Ready", "vxlan")
    assert int(row["BLOCKS"]) >= 2 and row["UNDERLAY"] not in ("<unknown>", "")  # a block per family
