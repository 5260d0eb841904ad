"""From the cluster's nodes and blocks to this node's routes, neighbours and FDB entries (pure).

Modes, per family:
- host-gw: each remote block is routed via the remote node's underlay address (the nodes must
  share a link, as with Flannel's host-gw);
- vxlan: each remote block is routed via the remote node's tunnel address on our VXLAN device,
  with a permanent neighbour entry (tunnel address -> remote VXLAN MAC) and an FDB entry
  (remote VXLAN MAC -> remote underlay address); no multicast, no learning;
- hybrid: host-gw to nodes on one of our underlay subnets, VXLAN to the others (Flannel's
  DirectRouting).
Our own blocks get blackhole routes, so that a packet to an unused pod address is dropped
here instead of following the default route out of the node.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass, field

from tulle.kernelstate.net import VXLAN_OVERHEAD, FdbEntry, Neighbour, Route

MODES = ("host-gw", "vxlan", "hybrid")


def vxlan_device(family: int) -> str:
    return f"tulle-vxlan{family}"


def vxlan_mac(node: str, family: int) -> str:
    """A stable, locally administered MAC for a node's VXLAN device: a restart keeps it."""
    digest = bytearray(hashlib.sha256(f"{node}/vxlan{family}".encode()).digest()[:6])
    digest[0] = (digest[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in digest)


@dataclass(frozen=True)
class VxlanEndpoint:
    family: int
    mac: str
    tunnel_address: str  # the node's address on its VXLAN device, from its own block


@dataclass(frozen=True)
class NodeInfo:
    name: str
    addresses: tuple[str, ...]  # underlay addresses, one per family at most
    vxlan: tuple[VxlanEndpoint, ...] = ()

    def address(self, family: int) -> str | None:
        return next((a for a in self.addresses if ipaddress.ip_address(a).version == family), None)

    def vxlan_endpoint(self, family: int) -> VxlanEndpoint | None:
        return next((v for v in self.vxlan if v.family == family), None)


@dataclass(frozen=True)
class BlockInfo:
    cidr: str
    node: str


@dataclass(frozen=True)
class LocalNode:
    name: str
    mode: str
    underlay: tuple[str, ...]  # our underlay addresses with prefix length: 172.30.1.2/24


@dataclass
class DesiredRouting:
    routes: set[Route] = field(default_factory=set)
    neighbours: set[Neighbour] = field(default_factory=set)
    fdb: set[FdbEntry] = field(default_factory=set)
    unreachable: list[str] = field(default_factory=list)  # why some blocks have no route


def on_local_subnet(local: LocalNode, address: str) -> bool:
    addr = ipaddress.ip_address(address)
    return any(
        addr in ipaddress.ip_interface(u).network
        for u in local.underlay
        if ipaddress.ip_interface(u).version == addr.version
    )


def compile_routing(local: LocalNode, nodes: Iterable[NodeInfo], blocks: Iterable[BlockInfo]) -> DesiredRouting:
    """The routes, neighbours and FDB entries this node needs to reach every other node's pods."""
    if local.mode not in MODES:
        raise ValueError(f"routing mode {local.mode!r} is not one of {', '.join(MODES)}")
    by_name = {n.name: n for n in nodes}
    out = DesiredRouting()
    for block in sorted(blocks, key=lambda b: b.cidr):
        family = ipaddress.ip_network(block.cidr).version
        if block.node == local.name:
            out.routes.add(Route(dst=block.cidr, blackhole=True))
            continue
        node = by_name.get(block.node)
        if node is None:
            continue  # the node is gone (or not registered yet): no route to its pods
        underlay = node.address(family)
        if underlay is None:
            out.unreachable.append(f"{block.cidr}: node {node.name} has no IPv{family} underlay address")
            continue
        direct = local.mode == "host-gw" or (local.mode == "hybrid" and on_local_subnet(local, underlay))
        if direct:
            if local.mode == "host-gw" and not on_local_subnet(local, underlay):
                out.unreachable.append(
                    f"{block.cidr}: node {node.name} ({underlay}) is not on this node's subnet; host-gw needs "
                    "one link between all nodes (use --mode hybrid or vxlan)"
                )
                continue
            out.routes.add(Route(dst=block.cidr, gateway=underlay))
            continue
        vtep = node.vxlan_endpoint(family)
        if vtep is None:
            out.unreachable.append(f"{block.cidr}: node {node.name} has no IPv{family} VXLAN endpoint")
            continue
        dev = vxlan_device(family)
        out.routes.add(Route(dst=block.cidr, gateway=vtep.tunnel_address, dev=dev, onlink=True))
        out.neighbours.add(Neighbour(dev=dev, address=vtep.tunnel_address, mac=vtep.mac))
        out.fdb.add(FdbEntry(dev=dev, mac=vtep.mac, dst=underlay))
    return out


def pod_mtu(mode: str, underlay_mtu: int, families: Iterable[int]) -> int:
    """The largest pod MTU whose packets still fit the underlay after encapsulation."""
    if mode == "host-gw":
        return underlay_mtu
    return underlay_mtu - max(VXLAN_OVERHEAD[f] for f in families)
