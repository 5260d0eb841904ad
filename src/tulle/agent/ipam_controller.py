"""IPAM on this node: the pools it allocates from, the blocks it holds, the VXLAN tunnel
addresses, its endpoints' addresses recorded as theirs, and the blocks of removed nodes.

Invariants (docs/design/ipam.md): a block is this node's until the node is removed; an address
a live endpoint holds is never given twice (`reclaim` at start and on every resync); a removed
node's endpoints and then its blocks (each only if no endpoint holds an address in it) go a
grace period after its Node object is deleted, never because its agent is silent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from tulle.agent.cni_service import TUNNEL_HANDLE_PREFIX
from tulle.agent.controller import FULL, Controller
from tulle.agent.endpoints import EndpointRegistry
from tulle.agent.informers import Informer
from tulle.datastore.base import Datastore
from tulle.ipam.allocator import Block, IpamError, NodeAllocator, release_node_blocks
from tulle.model.endpoints import WorkloadEndpoint
from tulle.model.kinds import NODE, WORKLOAD_ENDPOINT
from tulle.model.pools import Pool, PoolError, check_no_overlap
from tulle.routing.compile import NodeInfo

log = logging.getLogger(__name__)

GONE = "gone-nodes"


class IpamController(Controller):
    def __init__(
        self,
        datastore: Datastore,
        node: str,
        allocator: NodeAllocator,
        registry: EndpointRegistry,
        pools: Informer[Pool],
        nodes: Informer[NodeInfo],
        blocks: Informer[Block],
        tunnel_families: Callable[[], list[int]],
        on_tunnels: Callable[[dict[int, str]], None],
        node_grace: float,
        resync: float = 30.0,
    ) -> None:
        super().__init__("ipam", resync)
        self.datastore = datastore
        self.node = node
        self.allocator = allocator
        self.registry = registry
        self._pool_informer = pools
        self.nodes = nodes
        self.blocks = blocks
        self.tunnel_families = tunnel_families
        self.on_tunnels = on_tunnels
        self.node_grace = node_grace
        self.pools: list[Pool] = []
        self.tunnels: dict[int, str] = {}
        self.errors: list[str] = []
        self.conflicts: list[str] = []
        self._gone_since: dict[str, float] = {}
        pools.add_handler(lambda _k, _o, _n: self.enqueue(FULL))
        nodes.add_handler(self._on_node)
        blocks.add_handler(self._on_block)

    # -- what others read -------------------------------------------------------------------

    def families(self) -> list[int]:
        return sorted({p.family for p in self.pools})

    def problems(self) -> list[str]:
        problems = [] if self.pools else ["no IPPool is configured"]
        return problems + self.errors + self.conflicts

    # -- events -----------------------------------------------------------------------------

    def _on_node(self, _key: str, _old: NodeInfo | None, new: NodeInfo | None) -> None:
        if new is None:
            self.enqueue(GONE)

    def _on_block(self, _key: str, _old: Block | None, new: Block | None) -> None:
        if new is not None and new.node != self.node and self.nodes.get(new.node) is None:
            self.enqueue(GONE)

    # -- syncs ------------------------------------------------------------------------------

    def sync(self, key: str) -> None:
        if key == GONE:
            self.collect_gone_nodes()
            return
        self.load_pools()
        self.claim_blocks()
        self.reclaim()
        self.collect_gone_nodes()

    def load_pools(self) -> list[Pool]:
        """The pools from the informer; overlapping pools would give one address twice, so then
        the last good set stays and the overlap is reported."""
        pools = sorted(self._pool_informer.values(), key=lambda p: p.name)
        try:
            check_no_overlap(pools)
        except PoolError as exc:
            log.error("IPPools overlap; allocating from the pools as they were", extra={"error": str(exc)})
            return self.pools
        self.pools = pools
        return pools

    def claim_blocks(self) -> None:
        """A block per family and the tunnel addresses; a full pool is reported, not fatal: the
        node stays up, STATUS says why it is not ready, and it tries again on every resync."""
        errors = []
        tunnel_families = self.tunnel_families()
        for family in self.families():
            if family in tunnel_families:
                continue  # the tunnel address claims the block, written with it in one go
            try:
                self.allocator.ensure_block(family)
            except IpamError as exc:
                errors.append(str(exc))
                log.error("cannot claim a block", extra={"error": str(exc)})
        try:
            self._tunnel_addresses(tunnel_families)
        except IpamError as exc:
            errors.append(str(exc))
            log.error("cannot claim a block", extra={"error": str(exc)})
        self.errors = errors

    def _tunnel_addresses(self, families: list[int]) -> None:
        tunnels = {}
        for family in families:
            handle = f"{TUNNEL_HANDLE_PREFIX}{self.node}/v{family}"
            (address,) = self.allocator.allocate(handle, [family], {"node": self.node})
            tunnels[family] = str(address)
        if tunnels != self.tunnels:
            self.tunnels = tunnels
            self.on_tunnels(tunnels)

    def reclaim(self) -> None:
        """Every ready endpoint's addresses recorded as its own in IPAM: a restart (or an outage
        in which its node was wrongly thought gone) must never let an address be given twice.
        A conflict is an error in the log and in the status, never taken over."""
        holdings = [
            (ep.handle, ep.addresses(), {"pod": f"{ep.namespace}/{ep.pod}", "node": self.node})
            for ep in self.registry.all()
            if ep.state == "ready"
        ]
        recorded, conflicts = self.allocator.reclaim(holdings)
        if recorded:
            log.warning("recorded running pods' addresses in IPAM again", extra={"addresses": recorded})
        for conflict in conflicts:
            if conflict not in self.conflicts:
                log.error("an address of a running pod is claimed twice", extra={"error": conflict})
        self.conflicts = conflicts

    def collect_leaks(self) -> None:
        """Give back addresses no endpoint of this node holds (an ADD that died half-way)."""
        known = {ep.handle for ep in self.registry.all()}
        released = self.allocator.release_unless(lambda h: h in known or h.startswith(TUNNEL_HANDLE_PREFIX))
        if released:
            log.info("released leaked addresses", extra={"handles": sorted(released)})

    # -- removed nodes ----------------------------------------------------------------------

    def collect_gone_nodes(self) -> None:
        """Forget nodes removed (their Node object deleted) a grace period ago. A node whose
        agent is merely silent keeps its Node object, and so its blocks and endpoints."""
        if not (self.nodes.synced and self.blocks.synced):
            return
        now = time.monotonic()
        for owner in self.blocks.index_values("node"):
            if owner == self.node or self.nodes.get(owner) is not None:
                self._gone_since.pop(owner, None)
                continue
            since = self._gone_since.setdefault(owner, now)
            left = self.node_grace - (now - since)
            if left > 0:
                self.enqueue(GONE, after=left + 0.05)
                continue
            self._forget_node(owner)
            self._gone_since.pop(owner, None)

    def _forget_node(self, node: str) -> None:
        """A removed node's endpoints go (its pods went with it), then its blocks, each only if
        no endpoint in the datastore holds an address in it; read afresh, not from the informers."""
        if self.datastore.get(NODE, node) is not None:
            return  # it came back
        endpoints = [WorkloadEndpoint.from_object(o) for o in self.datastore.list(WORKLOAD_ENDPOINT)[0]]
        for ep in endpoints:
            if ep.node == node:
                self.datastore.delete(WORKLOAD_ENDPOINT, ep.name, ep.namespace)
        endpoints = [WorkloadEndpoint.from_object(o) for o in self.datastore.list(WORKLOAD_ENDPOINT)[0]]
        held = {ip for ep in endpoints for ip in ep.ips}
        freed = release_node_blocks(self.datastore, node, held)
        if freed:
            log.info("freed the blocks of a removed node", extra={"node": node, "blocks": freed})
