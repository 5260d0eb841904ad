"""IPAM on this node: the pools it allocates from, the blocks it holds, the VXLAN tunnel
addresses, and its endpoints' addresses recorded as theirs.

Invariants (docs/design/ipam.md): a block is this node's until the node is removed (the blocks
of removed nodes are freed by `removed_nodes.py`); an address a live endpoint holds is never
given twice (`reclaim` at start and on every resync).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from tulle.agent.controller import FULL, Controller
from tulle.agent.endpoints import EndpointRegistry
from tulle.agent.informers import Informer
from tulle.datastore.base import Datastore
from tulle.ipam.allocator import IpamError, NodeAllocator
from tulle.model.endpoints import TUNNEL_HANDLE_PREFIX
from tulle.model.pools import Pool, PoolError, check_no_overlap

log = logging.getLogger(__name__)


class IpamController(Controller):
    def __init__(
        self,
        datastore: Datastore,
        node: str,
        allocator: NodeAllocator,
        registry: EndpointRegistry,
        pools: Informer[Pool],
        tunnel_families: Callable[[], list[int]],
        on_tunnels: Callable[[dict[int, str]], None],
        resync: float = 30.0,
    ) -> None:
        super().__init__("ipam", resync)
        self.datastore = datastore
        self.node = node
        self.allocator = allocator
        self.registry = registry
        self._pool_informer = pools
        self.tunnel_families = tunnel_families
        self.on_tunnels = on_tunnels
        self.pools: list[Pool] = []
        self.tunnels: dict[int, str] = {}
        self.errors: list[str] = []
        self.conflicts: list[str] = []
        pools.add_handler(lambda _k, _o, _n: self.enqueue(FULL))

    # -- what others read -------------------------------------------------------------------

    def families(self) -> list[int]:
        return sorted({p.family for p in self.pools})

    def problems(self) -> list[str]:
        problems = [] if self.pools else ["no IPPool is configured"]
        return problems + self.errors + self.conflicts

    # -- syncs ------------------------------------------------------------------------------

    def sync(self, key: str) -> None:
        self.load_pools()
        self.claim_blocks()
        self.reclaim()

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
