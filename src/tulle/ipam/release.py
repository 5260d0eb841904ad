"""Reading what `tulle ipam show` reports on, and freeing a leaked address: the thin part over
the datastore; what is a leak is decided by `tulle.ipam.report`.

A release is a compare-and-swap on the block as it was read, as every allocator write is
(docs/design/ipam.md, invariant 2): if the block changed since, everything is read and judged
again, so an address given to a pod meanwhile is never taken from it.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from tulle.datastore.base import Conflict, Datastore
from tulle.ipam.allocator import IpamError, list_blocks
from tulle.ipam.report import Allocation, IpamState, look_up, release_refusal
from tulle.model.endpoints import WorkloadEndpoint
from tulle.model.kinds import IP_POOL, NODE, WORKLOAD_ENDPOINT
from tulle.model.pools import Pool, PoolError, parse_pool


class ReleaseRefused(IpamError):
    """The address is not a leak (or not allocated); the message says what it is."""


def read_state(datastore: Datastore) -> IpamState:
    """Blocks first, then endpoints: an endpoint published after the blocks were read still
    counts as a holder, so a release judged on this state never frees what it holds."""
    blocks = list_blocks(datastore)
    endpoints: list[WorkloadEndpoint] = []
    unreadable: list[str] = []
    for obj in datastore.list(WORKLOAD_ENDPOINT)[0]:
        try:
            endpoints.append(WorkloadEndpoint.from_object(obj))
        except (ValueError, KeyError, TypeError) as exc:
            meta = obj.get("metadata") or {}
            unreadable.append(f"{meta.get('namespace')}/{meta.get('name')}: {exc}")
    nodes = frozenset(str((obj.get("metadata") or {}).get("name", "")) for obj in datastore.list(NODE)[0])
    pools: list[Pool] = []
    for obj in datastore.list(IP_POOL)[0]:
        try:
            pools.append(parse_pool(obj))
        except PoolError:
            continue  # admission keeps these out; a pool nobody can allocate from holds nothing
    return IpamState(pools=pools, blocks=blocks, endpoints=endpoints, nodes=nodes, unreadable_endpoints=unreadable)


def release_leaked_address(
    datastore: Datastore, address: str, grace: float, clock: Callable[[], float] = time.time
) -> Allocation:
    """Free `address` if it is leaked (`tulle.ipam.report`); ReleaseRefused saying what it is
    otherwise. Returns the allocation that was freed.

    >>> release_leaked_address(datastore, "10.244.1.7", grace=900)  # doctest: +SKIP
    Allocation(address='10.244.1.7', block='10.244.1.0/26', ..., status='leaked', holder=None)
    """
    for _attempt in range(100):
        state = read_state(datastore)
        now = clock()
        lookup = look_up(state, address, now, grace)
        refusal = release_refusal(lookup, state, now, grace)
        if refusal is not None:
            raise ReleaseRefused(refusal)
        assert lookup.block is not None and lookup.allocation is not None  # a leak has both
        block = lookup.block
        del block.allocations[address]
        try:
            datastore.update(block.to_object())
        except Conflict:  # the block changed (or went) since it was read: judge again
            continue
        return lookup.allocation
    raise IpamError(f"could not release {address}: its block kept changing")
