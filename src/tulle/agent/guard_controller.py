"""The node's guards, kept current: its local pods' interfaces, MACs, addresses and allowed
source prefixes, and the cluster's node addresses, written into the guard tables
(`tulle.guard.tables`: source verification, tunnel sources, connection limits, control-plane
ports; docs/design/guard.md).

One key: a local endpoint coming or going, a local pod's annotation changing, or a node's
addresses changing asks for a pass; the tables are small (local pods and nodes), so a pass is a
small transaction. An ADD calls `sync_now`, so a new pod's veth is guarded before the runtime
starts its containers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from tulle.agent.controller import TableController
from tulle.agent.endpoints import EndpointRegistry
from tulle.agent.informers import Informer
from tulle.dataplane.nft import NftReconciler
from tulle.guard.tables import (
    FOREIGN_TUNNEL,
    REASONS,
    TABLE,
    GuardedEndpoint,
    GuardSettings,
    arp_guard,
    drop_counters,
    inet_guard,
)
from tulle.policy.inputs import PodSource
from tulle.routing.compile import NodeInfo

log = logging.getLogger(__name__)

GUARD = "guard"


@dataclass(frozen=True)
class GuardConfig:
    """What the node's guards need besides the pods and nodes they learn from the informers."""

    underlay: str
    control_plane: tuple[str, ...] = ()  # the datastore's addresses
    protected_ports: tuple[tuple[int, int], ...] = ()
    connection_limit: int = 16384
    verify_sources: bool = True


class GuardController(TableController):
    def __init__(
        self,
        config: GuardConfig,
        registry: EndpointRegistry,
        pods: Informer[PodSource],
        nodes: Informer[NodeInfo],
        inet: NftReconciler | None = None,
        arp: NftReconciler | None = None,
        resync: float = 30.0,
        verify: float = 90.0,
    ) -> None:
        super().__init__("guard", resync, verify)
        self.config = config
        self.registry = registry
        self.pods = pods
        self.nodes = nodes
        self.inet = inet or NftReconciler(family="inet", name=TABLE)
        self.arp = arp or NftReconciler(family="arp", name=TABLE)
        self.guarded: list[GuardedEndpoint] = []
        pods.add_handler(self._on_pod)
        nodes.add_handler(self._on_node)

    def _on_pod(self, _key: str, old: PodSource | None, new: PodSource | None) -> None:
        before = (old.source_prefixes, old.source_prefixes_problem) if old else None
        after = (new.source_prefixes, new.source_prefixes_problem) if new else None
        if before != after:
            self.enqueue(GUARD)

    def _on_node(self, _key: str, old: NodeInfo | None, new: NodeInfo | None) -> None:
        if (old.addresses if old else None) != (new.addresses if new else None):
            self.enqueue(GUARD)

    def endpoints_changed(self) -> None:
        self.enqueue(GUARD)

    # -- what is guarded ------------------------------------------------------------------------

    def _pod(self, namespace: str, name: str) -> PodSource | None:
        return self.pods.get(f"{namespace}/{name}")

    def problems_of(self, namespace: str, pod: str) -> tuple[str, ...]:
        """What the guards cannot honour for a pod (a malformed annotation), for its endpoint."""
        source = self._pod(namespace, pod)
        return (source.source_prefixes_problem,) if source is not None and source.source_prefixes_problem else ()

    def endpoints(self) -> list[GuardedEndpoint]:
        out = []
        for ep in self.registry.all():
            if ep.state != "ready" or not ep.mac:
                continue
            source = self._pod(ep.namespace, ep.pod)
            prefixes = source.source_prefixes if source is not None else ()
            out.append(GuardedEndpoint(ep.host_ifname, ep.mac, tuple(ep.addresses()), prefixes))
        return out

    def settings(self) -> GuardSettings:
        nodes = tuple(sorted({a for n in self.nodes.values() for a in n.addresses}))
        c = self.config
        return GuardSettings(
            underlay=c.underlay,
            cluster_nodes=nodes,
            control_plane=c.control_plane,
            protected_ports=c.protected_ports,
            connection_limit=c.connection_limit,
            verify_sources=c.verify_sources,
        )

    # -- passes ---------------------------------------------------------------------------------

    def apply_pass(self, verify: bool) -> None:
        endpoints, settings = self.endpoints(), self.settings()
        self.inet.apply(inet_guard(endpoints, settings), verify=verify)
        self.arp.apply(arp_guard(endpoints, settings), verify=verify)
        self.guarded = endpoints

    # -- what status reports ---------------------------------------------------------------------

    def drops(self) -> list[dict[str, Any]]:
        """Packets the guards dropped: per local pod and reason, and tunnel packets from outside."""
        pods = {ep.host_ifname: f"{ep.namespace}/{ep.pod}" for ep in self.registry.all()}
        counters = {**self.inet.counters(), **self.arp.counters()}
        out: list[dict[str, Any]] = []
        for name, (interface, reason) in sorted(drop_counters(self.guarded).items()):
            packets = counters.get(name, (0, 0))[0]
            if packets:
                out.append({"pod": pods.get(interface, interface), "reason": REASONS[reason], "packets": packets})
        foreign = counters.get(FOREIGN_TUNNEL, (0, 0))[0]
        if foreign:
            out.append({"pod": "", "reason": "VXLAN from outside the cluster", "packets": foreign})
        return out
