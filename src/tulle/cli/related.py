"""How the objects the CLI shows relate to each other, for `tulle get` and `tulle describe`
(pure: plain objects in, plain data out).

A pod is on a node if its Pod names the node (spec.nodeName, where it was scheduled) or one of
its WorkloadEndpoints does (where its network is); a block is a node's if its spec.node says so.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from tulle.agent.node import ANNOTATION_MODE
from tulle.model.kinds import Obj


def name_of(obj: Obj) -> str:
    return str((obj.get("metadata") or {}).get("name", ""))


def key_of(obj: Obj) -> str:
    """`namespace/name` of a namespaced object."""
    meta = obj.get("metadata") or {}
    return f"{meta.get('namespace', 'default')}/{meta.get('name', '')}"


def _spec(obj: Obj) -> dict[str, object]:
    spec = obj.get("spec")
    return spec if isinstance(spec, dict) else {}


def endpoint_pod(endpoint: Obj) -> str:
    """`namespace/pod` of the pod a WorkloadEndpoint is for."""
    return f"{(endpoint.get('metadata') or {}).get('namespace', 'default')}/{_spec(endpoint).get('pod', '')}"


def pod_addresses(pod: Obj, endpoints: Iterable[Obj]) -> list[str]:
    """The pod's addresses: its endpoints' (what its network holds), else its status's.

    >>> pod = {"metadata": {"name": "a", "namespace": "x"}, "status": {"podIPs": [{"ip": "10.0.0.9"}]}}
    >>> pod_addresses(pod, [{"metadata": {"namespace": "x"}, "spec": {"pod": "a", "ips": ["fd00::1", "10.0.0.1"]}}])
    ['10.0.0.1', 'fd00::1']
    >>> pod_addresses(pod, [])
    ['10.0.0.9']
    """
    key = key_of(pod)
    found: set[str] = set()
    for endpoint in endpoints:
        ips = _spec(endpoint).get("ips")
        if endpoint_pod(endpoint) == key and isinstance(ips, list):
            found.update(str(ip) for ip in ips)
    if not found:
        status = pod.get("status") or {}
        found = {str(e.get("ip")) for e in status.get("podIPs") or [] if isinstance(e, dict) and e.get("ip")}
        if not found and status.get("podIP"):
            found = {str(status["podIP"])}
    return sorted(found, key=_address_order)


def _address_order(text: str) -> tuple[int, int, str]:
    try:
        ip = ipaddress.ip_address(text.split("/")[0])
    except ValueError:
        return (9, 0, text)
    return (ip.version, int(ip), text)


def node_addresses(node: Obj) -> list[str]:
    """Its InternalIP addresses, as the agent registered them."""
    status = node.get("status") or {}
    return [
        str(a.get("address"))
        for a in status.get("addresses") or []
        if isinstance(a, dict) and a.get("type") == "InternalIP"
    ]


def routing_mode(node: Obj) -> str:
    annotations = (node.get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(ANNOTATION_MODE) or "<unknown>")


@dataclass
class NodeShare:
    """What a node holds: its blocks (cidr -> addresses in use, size) and its pods."""

    blocks: dict[str, tuple[int, int]] = field(default_factory=dict)
    pods: set[str] = field(default_factory=set)  # namespace/name


def node_shares(
    nodes: Iterable[Obj], pods: Iterable[Obj], endpoints: Iterable[Obj], blocks: Iterable[Obj]
) -> dict[str, NodeShare]:
    """Each node's blocks and pods, for every node named by a Node or by what it holds.

    >>> shares = node_shares(
    ...     [{"metadata": {"name": "n1"}}],
    ...     [{"metadata": {"name": "a", "namespace": "x"}, "spec": {"nodeName": "n1"}}],
    ...     [{"metadata": {"namespace": "x"}, "spec": {"pod": "b", "node": "n1"}}],
    ...     [{"spec": {"cidr": "10.0.0.0/30", "node": "n1", "allocations": {"10.0.0.1": {}}}}])
    >>> sorted(shares["n1"].pods), shares["n1"].blocks
    (['x/a', 'x/b'], {'10.0.0.0/30': (1, 4)})
    """
    shares = {name_of(n): NodeShare() for n in nodes}
    for pod in pods:
        node = _spec(pod).get("nodeName")
        if isinstance(node, str) and node:
            shares.setdefault(node, NodeShare()).pods.add(key_of(pod))
    for endpoint in endpoints:
        node = _spec(endpoint).get("node")
        if isinstance(node, str) and node:
            shares.setdefault(node, NodeShare()).pods.add(endpoint_pod(endpoint))
    for block in blocks:
        spec = _spec(block)
        node, cidr, allocations = spec.get("node"), spec.get("cidr"), spec.get("allocations") or {}
        if not isinstance(node, str) or not isinstance(cidr, str):
            continue
        try:
            size = ipaddress.ip_network(cidr).num_addresses
        except ValueError:
            continue
        used = len(allocations) if isinstance(allocations, dict) else 0
        shares.setdefault(node, NodeShare()).blocks[cidr] = (used, size)
    return shares


def sorted_cidrs(cidrs: Iterable[str]) -> list[str]:
    """IPv4 first, then IPv6, each in address order."""
    return sorted(cidrs, key=_address_order)
