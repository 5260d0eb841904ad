"""What IPAM holds, as `tulle ipam show` tells it: pure functions of the pools, blocks,
WorkloadEndpoints and Nodes read from the datastore (`IpamState`), no I/O.

An allocated address is, in this order (docs/design/ipam.md, "Leaks"):
- held by its node's VXLAN tunnel (handle `tulle-tunnel/<node>/v<family>`) while that Node exists;
- held by a live endpoint: a WorkloadEndpoint whose handle is the allocation's, or that lists
  the address;
- recent: no endpoint holds it, but it was allocated less than the grace ago. An ADD allocates
  before it publishes its endpoint, so this may be an ADD in progress, not a leak;
- leaked: none of these. Only a leaked address may be released (`release_refusal`).

>>> import ipaddress
>>> from tulle.ipam.allocator import Block
>>> block = Block(ipaddress.ip_network("10.0.0.0/30"), "p", "n1",
...               {"10.0.0.1": {"handle": "net/c1/eth0", "allocatedAt": "1970-01-01T00:00:00Z"}})
>>> state = IpamState(pools=[], blocks=[block], endpoints=[], nodes=frozenset({"n1"}))
>>> [(a.address, a.status) for a in allocations(state, now=3600.0, grace=900.0)]
[('10.0.0.1', 'leaked')]
>>> [(a.address, a.status) for a in allocations(state, now=60.0, grace=900.0)]
[('10.0.0.1', 'recent')]
"""

from __future__ import annotations

import calendar
import ipaddress
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tulle.ipam.allocator import ALLOCATED_AT, Block
from tulle.model.endpoints import TUNNEL_HANDLE_PREFIX, WorkloadEndpoint
from tulle.model.pools import Pool

HELD, RECENT, LEAKED = "held", "recent", "leaked"

# As Calico's kube-controllers wait before they call an allocation without a pod leaked
# (leakGracePeriod, 15 minutes): an ADD takes well under a second from its allocation to its
# endpoint, a slow datastore some seconds, so this is generous even with some clock skew.
DEFAULT_LEAK_GRACE_S: float = 900


@dataclass(frozen=True)
class IpamState:
    """What the report is made from, as read from the datastore (blocks read first)."""

    pools: list[Pool]
    blocks: list[Block]
    endpoints: list[WorkloadEndpoint]
    nodes: frozenset[str]  # the Node objects' names
    # WorkloadEndpoints that could not be read ("ns/name: why"): they may hold any address.
    unreadable_endpoints: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Holder:
    """What holds an allocated address: a pod's endpoint, or a node's VXLAN tunnel."""

    node: str
    handle: str
    pod: str = ""  # namespace/name; empty for a tunnel
    interface: str = ""  # the host side of the pod's veth
    ifname: str = ""  # the interface in the pod

    def describe(self) -> str:
        if not self.pod:
            return f"the VXLAN tunnel of node {self.node}"
        where = f" (interface {self.interface}, {self.ifname} in the pod)" if self.interface else ""
        return f"pod {self.pod} on node {self.node}{where}"

    def to_json(self) -> dict[str, str]:
        kind = {"kind": "pod", "pod": self.pod} if self.pod else {"kind": "tunnel"}
        return {**kind, "node": self.node, "interface": self.interface, "ifname": self.ifname, "handle": self.handle}


@dataclass(frozen=True)
class Allocation:
    """One allocated address and who holds it."""

    address: str
    block: str  # the block's cidr
    pool: str
    node: str  # the block's node
    handle: str
    pod: str  # as IPAM recorded it at allocation ("" if it did not)
    allocated_at: float | None  # None: recorded without a time
    status: str  # HELD, RECENT or LEAKED
    holder: Holder | None

    def age(self, now: float) -> float | None:
        return None if self.allocated_at is None else max(0.0, now - self.allocated_at)

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "block": self.block,
            "pool": self.pool,
            "node": self.node,
            "handle": self.handle,
            "pod": self.pod,
            "allocatedAt": None if self.allocated_at is None else _timestamp(self.allocated_at),
            "status": self.status,
            "holder": None if self.holder is None else self.holder.to_json(),
        }


@dataclass(frozen=True)
class Usage:
    """Addresses of a pool, a node or a block: in all, used, free."""

    name: str  # the pool's or the node's name, or the block's cidr
    cidr: str  # the pool's or the block's; empty for a node
    node: str  # the block's; empty for a pool
    pool: str  # the block's; empty for a node
    blocks: int
    total: int
    used: int

    @property
    def free(self) -> int:
        return self.total - self.used

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name}
        out.update({k: v for k, v in (("cidr", self.cidr), ("node", self.node), ("pool", self.pool)) if v})
        return {**out, "blocks": self.blocks, "total": self.total, "used": self.used, "free": self.free}


@dataclass(frozen=True)
class Report:
    pools: list[Usage]  # empty when the report is one node's
    nodes: list[Usage]
    blocks: list[Usage]
    leaks: list[Allocation]
    recent: list[Allocation]
    unreadable_endpoints: list[str]

    def to_json(self) -> dict[str, Any]:
        return {
            "pools": [u.to_json() for u in self.pools],
            "nodes": [u.to_json() for u in self.nodes],
            "blocks": [u.to_json() for u in self.blocks],
            "leaks": [a.to_json() for a in self.leaks],
            "recent": [a.to_json() for a in self.recent],
            "unreadableEndpoints": self.unreadable_endpoints,
        }


@dataclass(frozen=True)
class Lookup:
    """One address: its pool, its block and its allocation, where it has them."""

    address: str
    pool: Pool | None
    block: Block | None
    allocation: Allocation | None

    def to_json(self) -> dict[str, Any]:
        return {
            "address": self.address,
            "pool": None if self.pool is None else {"name": self.pool.name, "cidr": str(self.pool.cidr)},
            "block": None if self.block is None else {"cidr": str(self.block.cidr), "node": self.block.node},
            "allocation": None if self.allocation is None else self.allocation.to_json(),
        }


def _timestamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


def allocation_time(attrs: dict[str, Any]) -> float | None:
    """When an allocation was made (seconds since the epoch); None if it records no time.

    >>> allocation_time({"allocatedAt": "1970-01-01T00:01:00Z"})
    60.0
    >>> allocation_time({"handle": "net/c1/eth0"}) is None
    True
    """
    stamp = attrs.get(ALLOCATED_AT)
    try:
        return float(calendar.timegm(time.strptime(str(stamp), "%Y-%m-%dT%H:%M:%SZ")))
    except ValueError:
        return None


def _sort_key(address: str) -> tuple[int, int]:
    ip = ipaddress.ip_address(address)
    return ip.version, int(ip)


def _block_key(block: Block) -> tuple[int, int]:
    return block.family, int(block.cidr.network_address)


def _bare(address: str) -> str:
    """An endpoint's address without a prefix length, normalised as blocks write it."""
    return str(ipaddress.ip_interface(address).ip)


class _Holders:
    """Who may hold an address: the endpoints by handle and by address, and the Nodes."""

    def __init__(self, state: IpamState) -> None:
        self.nodes = state.nodes
        self.by_handle = {ep.handle: ep for ep in state.endpoints}
        self.by_address: dict[str, WorkloadEndpoint] = {}
        for ep in state.endpoints:
            for address in ep.ips:
                try:
                    self.by_address.setdefault(_bare(address), ep)
                except ValueError:
                    continue  # not an address: it holds nothing

    def holder(self, address: str, handle: str) -> Holder | None:
        if handle.startswith(TUNNEL_HANDLE_PREFIX):
            node = handle[len(TUNNEL_HANDLE_PREFIX) :].rpartition("/")[0]
            if node in self.nodes:
                return Holder(node=node, handle=handle)
        ep = self.by_handle.get(handle) or self.by_address.get(address)
        if ep is None:
            return None
        return Holder(
            node=ep.node,
            handle=ep.handle,
            pod=f"{ep.namespace}/{ep.pod}",
            interface=ep.host_interface,
            ifname=ep.ifname,
        )


def _allocation(
    block: Block, address: str, attrs: dict[str, Any], holders: _Holders, now: float, grace: float
) -> Allocation:
    handle = str(attrs.get("handle", ""))
    holder = holders.holder(address, handle)
    at = allocation_time(attrs)
    if holder is not None:
        status = HELD
    elif at is not None and now - at < grace:
        status = RECENT
    else:
        status = LEAKED  # also an allocation that records no time: it is older than this field
    return Allocation(
        address=address,
        block=str(block.cidr),
        pool=block.pool,
        node=block.node,
        handle=handle,
        pod=str(attrs.get("pod", "")),
        allocated_at=at,
        status=status,
        holder=holder,
    )


def allocations(state: IpamState, now: float, grace: float) -> list[Allocation]:
    """Every allocated address, in address order, with its holder and status."""
    holders = _Holders(state)
    out = [
        _allocation(block, address, attrs, holders, now, grace)
        for block in state.blocks
        for address, attrs in block.allocations.items()
    ]
    return sorted(out, key=lambda a: _sort_key(a.address))


def _node_usage(node: str, blocks: Iterable[Block]) -> Usage:
    mine = [b for b in blocks if b.node == node]
    return Usage(
        name=node,
        cidr="",
        node=node,
        pool="",
        blocks=len(mine),
        total=sum(b.cidr.num_addresses for b in mine),
        used=sum(len(b.allocations) for b in mine),
    )


def _pool_usage(pool: Pool, blocks: Iterable[Block]) -> Usage:
    # A pool's free addresses include those of blocks nobody has claimed yet, as calicoctl's.
    mine = [b for b in blocks if b.family == pool.family and b.cidr.subnet_of(pool.cidr)]  # type: ignore[arg-type]
    return Usage(
        name=pool.name,
        cidr=str(pool.cidr),
        node="",
        pool="",
        blocks=len(mine),
        total=pool.cidr.num_addresses,
        used=sum(len(b.allocations) for b in mine),
    )


def knows_node(state: IpamState, node: str) -> bool:
    """Whether `node` is a Node or holds a block (a removed node may still hold some)."""
    return node in state.nodes or any(b.node == node for b in state.blocks)


def report(state: IpamState, now: float, grace: float, node: str | None = None) -> Report:
    """Pools, nodes and blocks with their addresses used and free, and the addresses no live
    endpoint holds; with `node`, that node's alone (and no pools)."""
    blocks = sorted((b for b in state.blocks if node is None or b.node == node), key=_block_key)
    if node is None:
        names = sorted(state.nodes | {b.node for b in blocks})
        pools = [_pool_usage(p, state.blocks) for p in sorted(state.pools, key=lambda p: (p.family, p.name))]
    else:
        names, pools = [node], []
    unheld = [a for a in allocations(state, now, grace) if a.status != HELD and (node is None or a.node == node)]
    return Report(
        pools=pools,
        nodes=[_node_usage(name, blocks) for name in names],
        blocks=[
            Usage(
                name=str(b.cidr),
                cidr=str(b.cidr),
                node=b.node,
                pool=b.pool,
                blocks=1,
                total=b.cidr.num_addresses,
                used=len(b.allocations),
            )
            for b in blocks
        ],
        leaks=[a for a in unheld if a.status == LEAKED],
        recent=[a for a in unheld if a.status == RECENT],
        unreadable_endpoints=list(state.unreadable_endpoints),
    )


def look_up(state: IpamState, address: str, now: float, grace: float) -> Lookup:
    """Where `address` (normalised, without a prefix length) stands in IPAM."""
    ip = ipaddress.ip_address(address)
    pool = next((p for p in state.pools if p.family == ip.version and ip in p.cidr), None)
    block = next((b for b in state.blocks if b.family == ip.version and ip in b.cidr), None)
    allocation = None
    if block is not None and address in block.allocations:
        allocation = _allocation(block, address, block.allocations[address], _Holders(state), now, grace)
    return Lookup(address=address, pool=pool, block=block, allocation=allocation)


def where_free(lookup: Lookup) -> str:
    """Where an address that is not allocated lies: free in a block, in no block, in no pool."""
    if lookup.block is not None:
        return f"it is free in block {lookup.block.cidr} of node {lookup.block.node}"
    if lookup.pool is not None:
        return f"it lies in IPPool {lookup.pool.name} but in no block a node holds"
    return "it lies in no block and no IPPool"


def release_refusal(lookup: Lookup, state: IpamState, now: float, grace: float) -> str | None:
    """Why `lookup`'s address must not be released, in one line; None when it is a leak."""
    allocation = lookup.allocation
    if allocation is None:
        return f"{lookup.address} is not allocated: {where_free(lookup)}; nothing to release"
    if allocation.holder is not None:
        if not allocation.holder.pod:
            return f"{lookup.address} is held by {allocation.holder.describe()}; it goes with the node"
        return f"{lookup.address} is held by {allocation.holder.describe()}; delete the pod to free it"
    if state.unreadable_endpoints:
        return (
            f"cannot tell whether an endpoint holds {lookup.address}: WorkloadEndpoint "
            f"{state.unreadable_endpoints[0]} cannot be read"
        )
    if allocation.status == RECENT:
        age = allocation.age(now) or 0.0
        return (
            f"{lookup.address} was allocated to {allocation.handle} {age:.0f} s ago and no endpoint holds it yet: "
            f"an ADD may be in progress; it counts as leaked after --leak-grace ({grace:g} s)"
        )
    return None
