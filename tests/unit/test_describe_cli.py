"""`tulle describe` and the columns `tulle get` adds, against a real etcd (no root).

What is guarded here:
- describe shows an object with what relates to it: a pod's endpoints, addresses, node, the
  policies that select it per direction and its last CNI failure as its node's agent published
  it; a node's blocks, pods and its agent's problems; a policy's pods and its rules in words; a
  namespace's pods and policies;
- an unknown kind or name is one line on stderr and exit status 1;
- `get nodes` shows readiness, routing mode, addresses, block and pod counts (-o wide: the
  blocks and the underlay interface); `get po -o wide` every address; `get netpol -o wide` the
  policy types.
"""

from __future__ import annotations

import ipaddress

import pytest

from tests.unit.conftest import Tulle
from tulle.agent.node import node_object
from tulle.cli.describe_cmd import Section, render
from tulle.datastore.base import AtomicWriter, Datastore, Obj
from tulle.ipam.allocator import Block
from tulle.model.endpoints import WorkloadEndpoint
from tulle.model.kinds import NODE, POD
from tulle.model.node_report import CniFailure, report_annotations
from tulle.model.validation import admit_all


def pod(name: str, labels: dict[str, str], node: str, ips: list[str] | None = None) -> Obj:
    obj: Obj = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "labels": labels},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": "busybox", "ports": [{"name": "http", "containerPort": 80}]}],
        },
    }
    if ips:
        obj["status"] = {"phase": "Running", "podIP": ips[0], "podIPs": [{"ip": ip} for ip in ips]}
    return obj


ALLOW_WEB: Obj = {
    "apiVersion": "networking.k8s.io/v1",
    "kind": "NetworkPolicy",
    "metadata": {"name": "allow-web", "namespace": "shop"},
    "spec": {
        "podSelector": {"matchLabels": {"app": "web"}},
        "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "client"}}}], "ports": [{"port": 80}]}],
    },
}
ENDPOINT = WorkloadEndpoint("shop", "web", "node1", "tulle", "c1", "eth0", ("10.244.1.5", "fd00::5"), "tul0a1b2c3")
FAILURE = CniFailure("shop/broken", "ADD", 4, "CNI_NETNS /run/netns/gone does not exist", 1_800_000_000.0)


@pytest.fixture
def shop(store: Datastore) -> Datastore:
    """A namespace with a served pod, a client, a pod whose ADD failed, a policy, and two nodes:
    node1 with a block, an endpoint, problems and the failure its agent published; node2 bare."""
    assert isinstance(store, AtomicWriter)
    web, client = pod("web", {"app": "web"}, "node1"), pod("client", {"app": "client"}, "node2", ["10.244.2.9"])
    broken = pod("broken", {"app": "web"}, "node1")
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "shop"}}
    store.apply_many([namespace, web, client, broken, ALLOW_WEB], admit=admit_all)
    node1 = node_object("node1", "vxlan", ["172.30.1.11", "fd00:172:30:1::11"], [])
    node1["metadata"]["annotations"].update(report_annotations("eth0", ["no IPPool is configured"], [FAILURE]))
    store.create(node1)
    store.create(node_object("node2", "host-gw", ["172.30.1.12"], []))
    block = Block(ipaddress.ip_network("10.244.1.0/26"), "v4", "node1", {"10.244.1.5": {"handle": "tulle/c1/eth0"}})
    store.create(block.to_object())
    store.create(ENDPOINT.to_object())
    return store


def test_describe_pod_shows_its_endpoint_addresses_node_policies_and_last_cni_error(
    shop: Datastore, tulle: Tulle
) -> None:
    out = tulle.ok("describe", "pod", "web", "-n", "shop")
    lines = out.splitlines()
    assert lines[0].split() == ["Name:", "web"] and lines[1].split() == ["Namespace:", "shop"]
    assert "Node:            node1 (NotReady)" in out  # no heartbeat: its agent is not running
    assert "IPs:             10.244.1.5\n                 fd00::5" in out
    assert f"Endpoints:\n  {ENDPOINT.name}:\n    Node:       node1\n" in out
    assert "Interface:  tul0a1b2c3 on the node, eth0 in the pod" in out
    assert "  Ingress:  shop/allow-web" in out
    assert "  Egress:   <none>: not isolated, all egress allowed (no policy selecting it has Egress)" in out
    assert "Last CNI error:  <none>" in out
    broken = tulle.ok("describe", "po/broken", "-n", "shop")
    assert f"Last CNI error:  {FAILURE.text()} (on node1)" in broken
    assert "Endpoints:       <none> (no CNI ADD has given it a network)" in broken


def test_describe_node_shows_its_blocks_pods_and_its_agents_problems(shop: Datastore, tulle: Tulle) -> None:
    beat = shop.heartbeat("node1", 10)
    beat.start()
    out = tulle.ok("describe", "no", "node1")
    assert "Status:         Ready (the tulle agent is running)" in out
    assert "Routing mode:   vxlan" in out and "Underlay:       eth0" in out
    assert "Problems:       no IPPool is configured\n" in out
    assert "Blocks:\n  10.244.1.0/26  1 of 64 addresses in use\n" in out
    assert "  shop/web     10.244.1.5, fd00::5" in out
    assert "  shop/broken  <no address>" in out
    assert f"  shop/broken  {FAILURE.text()}" in out
    bare = tulle.ok("describe", "node", "node2")
    assert "Status:         NotReady (the tulle agent's heartbeat expired" in bare
    assert "Problems:       <unknown>: its agent has published none" in bare
    assert "Blocks:         <none>" in bare


def test_describe_network_policy_shows_its_pods_and_its_rules_in_words(shop: Datastore, tulle: Tulle) -> None:
    out = tulle.ok("describe", "netpol", "allow-web", "-n", "shop")
    assert "Pod selector:   app=web (in namespace shop)" in out
    assert "Policy types:   Ingress" in out
    assert "Selected pods:  shop/broken\n                shop/web" in out
    assert "Ingress rules:\n  rule 1: from pods app=client in namespace shop, port 80/TCP" in out
    assert "Egress rules:   <none>: Egress is not in its policyTypes, it does not isolate egress" in out


def test_describe_namespace_shows_its_pods_and_policies(shop: Datastore, tulle: Tulle) -> None:
    out = tulle.ok("describe", "ns", "shop")
    assert "  client  node2  Running  10.244.2.9" in out
    assert "  web     node1  Pending  10.244.1.5, fd00::5" in out
    assert "Network policies:\n  allow-web  pod selector app=web  Ingress" in out


def test_describe_of_an_unknown_kind_or_name_is_one_line_and_status_1(shop: Datastore, tulle: Tulle) -> None:
    code, out, err = tulle("describe", "pod", "nope", "-n", "shop")
    assert (code, out) == (1, "") and err == 'Error from server (NotFound): pods "nope" not found\n'
    code, out, err = tulle("describe", "frobs", "x")
    assert (code, out) == (1, "") and len(err.splitlines()) == 1
    assert err.startswith('error: the server doesn\'t have a resource type "frobs"')


def test_describe_of_other_kinds_shows_their_spec(shop: Datastore, tulle: Tulle) -> None:
    out = tulle.ok("describe", "block", "10-244-1-0-26")
    assert "Kind:    IPAMBlock" in out and "  cidr: 10.244.1.0/26" in out


def _table(text: str) -> list[dict[str, str]]:
    header, *rows = text.splitlines()
    names = header.split()
    return [dict(zip(names, row.split(), strict=True)) for row in rows]


def test_get_nodes_shows_readiness_mode_addresses_blocks_and_pods(shop: Datastore, tulle: Tulle) -> None:
    beat = shop.heartbeat("node2", 10)
    beat.start()
    rows = _table(tulle.ok("get", "nodes"))
    assert [{k: v for k, v in r.items() if k != "AGE"} for r in rows] == [
        {
            "NAME": "node1",
            "STATUS": "NotReady",
            "MODE": "vxlan",
            "ADDRESSES": "172.30.1.11,fd00:172:30:1::11",
            "BLOCKS": "1",
            "PODS": "2",
        },
        {"NAME": "node2", "STATUS": "Ready", "MODE": "host-gw", "ADDRESSES": "172.30.1.12", "BLOCKS": "0", "PODS": "1"},
    ]
    wide = _table(tulle.ok("get", "no", "node1", "-o", "wide"))
    assert (wide[0]["BLOCK-CIDRS"], wide[0]["UNDERLAY"]) == ("10.244.1.0/26", "eth0")


def test_get_wide_shows_every_address_of_a_pod_and_a_policys_types(shop: Datastore, tulle: Tulle) -> None:
    pods = {r["NAME"]: r for r in _table(tulle.ok("get", "po", "-n", "shop", "-o", "wide"))}
    assert (pods["web"]["IP"], pods["web"]["NODE"]) == ("10.244.1.5,fd00::5", "node1")
    assert pods["broken"]["IP"] == "<none>"
    [policy] = _table(tulle.ok("get", "netpol", "-n", "shop", "-o", "wide"))
    assert (policy["POD-SELECTOR"], policy["POLICY-TYPES"]) == ("app=web", "Ingress")


def test_render_aligns_values_and_says_what_an_empty_section_means() -> None:
    lines = render([("Name", "a"), ("Blocks", Section(empty="<none> yet")), ("Pods", Section(lines=("x/a",)))])
    assert lines == ["Name:    a", "Blocks:  <none> yet", "Pods:", "  x/a"]


def test_a_pod_and_a_node_are_read_as_a_reader_sees_them(shop: Datastore, tulle: Tulle) -> None:
    shop.delete(NODE, "node1")  # removed: its pods are lost until the agents collect them
    out = tulle.ok("describe", "pod", "web", "-n", "shop")
    assert "Node:            node1 (removed: no such Node)" in out
    assert "Status:          Unknown (NodeLost: Node node1 which was running pod web no longer exists)" in out
    assert shop.get(POD, "web", "shop") is not None
