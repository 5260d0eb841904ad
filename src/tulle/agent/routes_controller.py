"""Routes and tunnels to the other nodes: this node's VXLAN devices, and per remote node the
routes to its blocks, the neighbour entry of its tunnel address and its FDB entry.

Keyed by node: a node that joins, leaves or moves costs the work of that node's few entries
(compiled alone, applied as a change without reading the kernel's tables), not the cluster's;
a burst of events for one node is one sync. The periodic full sync compiles everything, reads
the kernel and repairs drift (docs/design/routing.md).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from tulle.agent.controller import FULL, VERIFY, Controller
from tulle.agent.informers import Informer
from tulle.dataplane.host import Underlay
from tulle.dataplane.netlink import SharedNetlink
from tulle.dataplane.routing import (
    EntryChange,
    FdbReconciler,
    NeighbourReconciler,
    NodeChangeWriter,
    RouteReconciler,
    VxlanDeviceReconciler,
)
from tulle.ipam.allocator import Block
from tulle.kernelstate.net import VXLAN_OVERHEAD, FdbEntry, Neighbour, Route, VxlanDevice
from tulle.routing.compile import (
    BlockInfo,
    DesiredRouting,
    LocalNode,
    NodeInfo,
    compile_routing,
    vxlan_device,
    vxlan_mac,
)

log = logging.getLogger(__name__)


@dataclass
class RoutingKernel:
    """The reconcilers the controller writes through (fakes in unit tests)."""

    routes: RouteReconciler
    neighbours: NeighbourReconciler
    fdb: FdbReconciler
    devices: VxlanDeviceReconciler
    changes: NodeChangeWriter  # one node's change, without reading the kernel's tables

    @classmethod
    def real(cls) -> RoutingKernel:
        """The kernel's: the full reconcilers over one netlink socket, and the change writer."""
        shared = SharedNetlink()
        return cls(
            RouteReconciler(shared),
            NeighbourReconciler(shared),
            FdbReconciler(shared),
            VxlanDeviceReconciler(shared),
            NodeChangeWriter(),
        )


@dataclass(frozen=True)
class NodeEntries:
    routes: frozenset[Route] = frozenset()
    neighbours: frozenset[Neighbour] = frozenset()
    fdb: frozenset[FdbEntry] = frozenset()


def _entries(desired: DesiredRouting) -> NodeEntries:
    return NodeEntries(frozenset(desired.routes), frozenset(desired.neighbours), frozenset(desired.fdb))


class RoutesController(Controller):
    def __init__(
        self,
        local: LocalNode,
        underlay: Underlay,
        nodes: Informer[NodeInfo],
        blocks: Informer[Block],
        tunnels: Callable[[], dict[int, str]],
        kernel: RoutingKernel | None = None,
        resync: float = 30.0,
        verify: float = 90.0,
    ) -> None:
        super().__init__("routes", resync, verify)
        self.local = local
        self.underlay = underlay
        self.nodes = nodes
        self.blocks = blocks
        self.tunnels = tunnels
        self.kernel = kernel or RoutingKernel.real()
        self.applied: dict[str, NodeEntries] = {}  # per node (ours: the blackholes for our blocks)
        self.owners: dict[str, str] = {}  # route destination (a block) -> the node whose entries hold it
        self.unreachable: list[str] = []
        self.last_full = 0.0
        nodes.add_handler(lambda key, _old, _new: self.enqueue(key))
        blocks.add_handler(self._on_block)

    def _on_block(self, _key: str, old: Block | None, new: Block | None) -> None:
        owners = {b.node for b in (old, new) if b is not None}
        if old is not None and new is not None and old.cidr == new.cidr and old.node == new.node:
            return  # only its allocations changed: nothing to route differently
        for owner in owners:
            self.enqueue(owner)

    # -- what the kernel should have ----------------------------------------------------------

    def devices(self) -> list[VxlanDevice]:
        out = []
        for family, tunnel in sorted(self.tunnels().items()):
            local = self.underlay.address(family)
            if local is None:
                continue
            out.append(
                VxlanDevice(
                    name=vxlan_device(family),
                    family=family,
                    local=local,
                    underlay_ifname=self.underlay.ifname,
                    mac=vxlan_mac(self.local.name, family),
                    mtu=self.underlay.mtu - VXLAN_OVERHEAD[family],
                    tunnel_address=tunnel,
                )
            )
        return out

    def desired_for(self, node: str) -> DesiredRouting:
        """One node's entries, compiled from that node and its blocks alone."""
        info = self.nodes.get(node)
        blocks = [BlockInfo(cidr=str(b.cidr), node=b.node) for b in self.blocks.by_index("node", node)]
        return compile_routing(self.local, [info] if info is not None else [], blocks)

    # -- syncs --------------------------------------------------------------------------------

    def sync(self, key: str) -> None:
        if key == VERIFY:
            self.sync_all()
        elif key == FULL:
            self.sync_known()
        else:
            self.sync_node(key)

    def sync_known(self) -> None:
        """Every node from the informers' state against what was applied: only differences are
        written, nothing is read from the kernel (the periodic VERIFY does that)."""
        for node in sorted(
            set(self.blocks.index_values("node")) | {n.name for n in self.nodes.values()} | set(self.applied)
        ):
            self.sync_node(node)

    def sync_node(self, node: str) -> None:
        desired = _entries(self.desired_for(node))
        before = self.applied.get(node, NodeEntries())
        if desired == before:
            return
        # A block that moved to another node keeps its route: the other node's entry replaced it.
        gone = [r for r in before.routes - desired.routes if self.owners.get(r.dst) in (node, None)]
        change = EntryChange(
            routes_add=tuple(sorted(desired.routes - before.routes)),
            routes_remove=tuple(sorted(gone)),
            neighbours_add=tuple(sorted(desired.neighbours - before.neighbours)),
            neighbours_remove=tuple(sorted(before.neighbours - desired.neighbours)),
            fdb_add=tuple(sorted(desired.fdb - before.fdb)),
            fdb_remove=tuple(sorted(before.fdb - desired.fdb)),
        )
        self.kernel.changes.write(change)
        for route in gone:
            self.owners.pop(route.dst, None)
        for route in desired.routes:
            self.owners[route.dst] = node
        if desired == NodeEntries():
            self.applied.pop(node, None)
        else:
            self.applied[node] = desired
        log.info(
            "routes to a node changed",
            extra={"node": node, "routes": len(desired.routes), "was": len(before.routes)},
        )

    def sync_all(self) -> None:
        """Everything, against the kernel itself: devices, then routes, neighbours and FDB."""
        started = time.monotonic()
        devices = self.devices()
        for device in devices:
            self.kernel.devices.apply(device)
        if self.local.mode == "host-gw":
            for family in (4, 6):
                self.kernel.devices.remove(vxlan_device(family))
        per_node: dict[str, NodeEntries] = {}
        unreachable: list[str] = []
        for node in set(self.blocks.index_values("node")) | {n.name for n in self.nodes.values()}:
            desired = self.desired_for(node)
            unreachable += desired.unreachable
            entries = _entries(desired)
            if entries != NodeEntries():
                per_node[node] = entries
        names = [d.name for d in devices]
        routes = self.kernel.routes.apply({r for e in per_node.values() for r in e.routes})
        neighbours = self.kernel.neighbours.apply({n for e in per_node.values() for n in e.neighbours}, names)
        fdb = self.kernel.fdb.apply({f for e in per_node.values() for f in e.fdb}, names)
        self.applied = per_node
        self.owners = {r.dst: node for node, entries in per_node.items() for r in entries.routes}
        for reason in sorted(set(unreachable) - set(self.unreachable)):
            log.warning("no route", extra={"reason": reason})
        self.unreachable = unreachable
        self.last_full = time.time()
        if routes or neighbours or fdb:
            log.info(
                "routing repaired",
                extra={
                    "routes_added": len(routes.add),
                    "routes_removed": len(routes.remove),
                    "neighbours": len(neighbours.add) + len(neighbours.remove),
                    "fdb": len(fdb.add) + len(fdb.remove),
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
