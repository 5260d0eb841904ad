"""Per-node address allocation from blocks claimed in the datastore.

A block is an `IPAMBlock` object (tulle.dev/v1, cluster-scoped, as Calico's): its cidr, pool,
owning node and allocations (address -> handle and attributes). Every write is one object's
compare-and-swap on its resourceVersion, so the same code runs on any backend.

Invariants (docs/design/ipam.md):
1. A block belongs to at most one node: it is claimed with create-if-absent.
2. An address is given to at most one handle: allocations live in the block object and change
   only by compare-and-swap on its resourceVersion.
3. A dual-stack allocation is all or nothing: if one family fails, the other is given back.
4. Releasing is idempotent: releasing a handle that holds nothing succeeds.
7. An address a live endpoint holds is never given to another: a restarted agent records its
   endpoints' addresses again (`reclaim`), and `allocate` skips any address its caller knows
   to be held, whatever the blocks say.
8. A block is freed only when its node is removed, and never while an endpoint holds an
   address in it (`release_node_blocks`).
"""

from __future__ import annotations

import copy
import ipaddress
import logging
import threading
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

from tulle.datastore.base import AlreadyExists, Conflict, Datastore, NotFound, Obj
from tulle.model.kinds import IPAM_BLOCK
from tulle.model.pools import IPAddress, IPNetwork, Pool

log = logging.getLogger(__name__)

# Each allocation records when it was made (UTC, to the second, as a creationTimestamp): an
# allocation without an endpoint is an ADD in progress while it is young and a leak once it is
# not (`tulle ipam show`; docs/design/ipam.md, "Leaks").
ALLOCATED_AT = "allocatedAt"


def timestamp(epoch: float) -> str:
    """An allocation's time as it is stored.

    >>> timestamp(0)
    '1970-01-01T00:00:00Z'
    """
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class IpamError(Exception):
    """No address could be given; the message says why and what to do."""


class AddressConflict(IpamError):
    """One address is claimed by two holders (or lies in another node's block)."""


# (handle, addresses, attributes such as {"pod": "ns/name"}): what one endpoint holds.
Holding = tuple[str, Sequence[str], dict[str, Any]]


@dataclass(frozen=True)
class FirstAllocation:
    """The allocation a block is claimed for: it is written with the block."""

    handle: str
    attrs: dict[str, Any]
    held: Callable[[str], bool]


def block_name(cidr: IPNetwork) -> str:
    """The IPAMBlock's name: its cidr as a DNS subdomain.

    >>> block_name(ipaddress.ip_network("10.244.1.64/26"))
    '10-244-1-64-26'
    """
    return str(cidr).replace(".", "-").replace(":", "-").replace("/", "-")


@dataclass
class Block:
    cidr: IPNetwork
    pool: str
    node: str
    allocations: dict[str, dict[str, Any]] = field(default_factory=dict)
    # The stored object's metadata (uid, creationTimestamp, resourceVersion): a write of this
    # copy is a compare-and-swap on the version it was read at.
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> int:
        return self.cidr.version

    @property
    def name(self) -> str:
        return block_name(self.cidr)

    def to_object(self) -> Obj:
        meta = dict(self.meta, name=self.name)
        spec = {"cidr": str(self.cidr), "pool": self.pool, "node": self.node, "allocations": self.allocations}
        return {"apiVersion": IPAM_BLOCK.api_version, "kind": IPAM_BLOCK.kind, "metadata": meta, "spec": spec}

    @classmethod
    def from_object(cls, obj: Obj) -> Block:
        spec = obj["spec"]
        return cls(
            cidr=ipaddress.ip_network(spec["cidr"]),
            pool=str(spec.get("pool", "")),
            node=str(spec["node"]),
            allocations=copy.deepcopy(dict(spec.get("allocations") or {})),
            meta=copy.deepcopy(dict(obj.get("metadata", {}))),
        )

    def free_address(self, held: Callable[[str], bool] = lambda _a: False) -> IPAddress | None:
        """The first address neither allocated in this block nor `held` by a live endpoint."""
        for address in self.cidr:
            text = str(address)
            if text not in self.allocations and not held(text):
                return address
        return None


def list_blocks(datastore: Datastore) -> list[Block]:
    objects, _ = datastore.list(IPAM_BLOCK)
    return [Block.from_object(obj) for obj in objects]


class NodeAllocator:
    """Gives this node's pods addresses from blocks the node claims.

    It keeps its own blocks as last read or written: an allocation is then one compare-and-swap
    per family, and a lost race (or a block changed behind its back) re-reads that block. It
    learns its blocks by one list of every block when first used, then from its own claims, so
    that an ADD never reads the cluster's blocks (a 1000-node cluster holds ~2000).

    >>> alloc = NodeAllocator(datastore, "node1", lambda: pools)  # doctest: +SKIP
    >>> alloc.allocate("ctr1/eth0", [4, 6], {"pod": "default/web"})  # doctest: +SKIP
    [IPv4Address('10.244.3.0'), IPv6Address('fd00:10:244::c0')]
    """

    def __init__(
        self, datastore: Datastore, node: str, pools: Callable[[], list[Pool]], clock: Callable[[], float] = time.time
    ) -> None:
        self.datastore = datastore
        self.node = node
        self._pools = pools
        self._clock = clock
        self._lock = threading.RLock()
        self._blocks: dict[str, Block] | None = None

    def _holding(self, handle: str, attrs: dict[str, Any]) -> dict[str, Any]:
        """What an allocation records: its handle, the caller's attributes and when it was made."""
        return dict(attrs, handle=handle, **{ALLOCATED_AT: timestamp(self._clock())})

    # -- reading ---------------------------------------------------------------------------

    def _own(self) -> dict[str, Block]:
        if self._blocks is None:
            self._blocks = {b.name: b for b in list_blocks(self.datastore) if b.node == self.node}
        return self._blocks

    def _refresh(self, name: str) -> None:
        """Read one block again; a block freed, or now another node's, is forgotten."""
        own = self._own()
        obj = self.datastore.get(IPAM_BLOCK, name)
        block = Block.from_object(obj) if obj is not None else None
        if block is None or block.node != self.node:
            own.pop(name, None)
        else:
            own[name] = block

    def local_blocks(self, fresh: bool = False) -> list[Block]:
        """This node's blocks (copies), as last known, or read afresh."""
        with self._lock:
            if fresh and self._blocks is not None:
                for name in list(self._blocks):
                    self._refresh(name)
            return [copy.deepcopy(b) for _, b in sorted(self._own().items())]

    def allocations(self) -> dict[str, list[str]]:
        """handle -> addresses, over this node's blocks, read afresh."""
        out: dict[str, list[str]] = {}
        for block in self.local_blocks(fresh=True):
            for address, attrs in block.allocations.items():
                out.setdefault(attrs["handle"], []).append(address)
        return out

    def _write(self, block: Block) -> bool:
        """Store this copy of one of our blocks if nobody wrote it since it was read (invariant
        2); on a lost race, read it again and say so."""
        try:
            stored = self.datastore.update(block.to_object())
        except NotFound:
            self._own().pop(block.name, None)
            return False
        except Conflict:
            self._refresh(block.name)
            return False
        self._own()[block.name] = Block.from_object(stored)
        return True

    # -- claiming blocks ---------------------------------------------------------------------

    def _pools_for(self, family: int) -> list[Pool]:
        return sorted((p for p in self._pools() if p.family == family), key=lambda p: p.name)

    def _create_block(self, cidr: IPNetwork, pool: str, first: FirstAllocation | None = None) -> Block | None:
        """Create the block for this node if nobody holds it (invariant 1); None if somebody does.
        With `first`, the block is created holding that allocation already: one write, and one
        event for every other node, where a claim and then an allocation would be two."""
        block = Block(cidr=cidr, pool=pool, node=self.node)
        if first is not None:
            address = block.free_address(first.held)
            if address is not None:
                block.allocations[str(address)] = self._holding(first.handle, first.attrs)
        try:
            stored = self.datastore.create(block.to_object())
        except AlreadyExists:
            return None
        log.info("claimed block", extra={"block": str(cidr), "pool": pool})
        block = Block.from_object(stored)
        with self._lock:
            self._own()[block.name] = block
        return copy.deepcopy(block)

    def claim_block(self, family: int, first: FirstAllocation | None = None) -> Block:
        """Claim one more block of this family for this node (invariant 1), holding `first`'s
        allocation from the start if given."""
        pools = self._pools_for(family)
        if not pools:
            raise IpamError(f"no IPv{family} pool is configured: create an IPPool with an IPv{family} cidr")
        for pool in pools:
            while True:
                taken = {str(b.cidr) for b in list_blocks(self.datastore)}
                candidate = next((c for c in pool.blocks_from(self.node) if str(c) not in taken), None)
                if candidate is None:
                    break  # this pool is full; try the next one
                block = self._create_block(candidate, pool.name, first)
                if block is not None:
                    return block
                # another node claimed it between our read and our create: read again
        total = sum(p.block_count() for p in pools)
        names = ", ".join(f"{p.name} ({p.cidr}, /{p.block_size} blocks)" for p in pools)
        raise IpamError(
            f"node {self.node} cannot claim an IPv{family} block: all {total} blocks of {names} are claimed "
            "by other nodes; add an IPPool or free blocks by removing nodes"
        )

    def ensure_block(self, family: int) -> Block:
        """A block of this family for this node, claiming one if it has none."""
        with self._lock:
            for block in self.local_blocks():
                if block.family == family:
                    return block
            return self.claim_block(family)

    # -- addresses ---------------------------------------------------------------------------

    def _allocate_one(self, handle: str, family: int, attrs: dict[str, Any], held: Callable[[str], bool]) -> IPAddress:
        """An address of one family from this node's blocks, claiming a block when all are full."""
        for _attempt in range(100):
            blocks = sorted(
                (b for b in self.local_blocks() if b.family == family), key=lambda b: int(b.cidr.network_address)
            )
            for block in blocks:
                address = block.free_address(held)
                if address is None:
                    continue
                block.allocations[str(address)] = self._holding(handle, attrs)
                if self._write(block):
                    return address
                break  # the block changed under us (invariant 2): read again
            else:
                claimed = self.claim_block(family, FirstAllocation(handle, attrs, held))
                for given, holder in claimed.allocations.items():
                    if holder.get("handle") == handle:
                        return ipaddress.ip_address(given)
        raise IpamError(f"could not allocate an IPv{family} address for {handle}: the datastore kept changing")

    def allocate(
        self,
        handle: str,
        families: list[int],
        attrs: dict[str, Any] | None = None,
        held: Callable[[str], bool] = lambda _a: False,
    ) -> list[IPAddress]:
        """One address per family for handle; all or nothing (invariant 3). `held(address)` says
        an endpoint holds the address whatever the blocks say: it is never given (invariant 7)."""
        with self._lock:
            existing = [a for b in self.local_blocks() for a, at in b.allocations.items() if at.get("handle") == handle]
            if existing:
                # The same handle asks again (a retried ADD): give it what it has.
                have = [ipaddress.ip_address(a) for a in existing]
                if sorted(a.version for a in have) == sorted(families):
                    return sorted(have, key=lambda a: a.version)
                self.release(handle)
            given: list[IPAddress] = []
            try:
                for family in families:
                    given.append(self._allocate_one(handle, family, attrs or {}, held))
            except Exception:
                self.release(handle)
                raise
            return given

    def release(self, handle: str) -> list[str]:
        """Give back every address the handle holds on this node (invariant 4)."""
        with self._lock:
            released: list[str] = []
            for _attempt in range(100):
                retry = False
                for block in self.local_blocks():
                    mine = [a for a, attrs in block.allocations.items() if attrs.get("handle") == handle]
                    if not mine:
                        continue
                    for address in mine:
                        del block.allocations[address]
                    if self._write(block):
                        released.extend(mine)
                    else:
                        retry = True
                if not retry:
                    return released
            raise IpamError(f"could not release the addresses of {handle}: the datastore kept changing")

    def reclaim(self, holdings: Sequence[Holding]) -> tuple[list[str], list[str]]:
        """Record each holding's addresses as its handle's again: an endpoint read back from disk
        keeps what it has (invariant 7), also when its allocation or its whole block was lost
        while the agent was away. Reads this node's blocks afresh, and writes only when
        something is missing. Returns (addresses recorded again, conflicts): an address held by
        another handle, or lying in another node's block, is reported, never taken over."""
        with self._lock:
            for _attempt in range(100):
                blocks = self.local_blocks(fresh=True)
                changed: dict[str, Block] = {}
                recorded: list[str] = []
                conflicts: list[str] = []
                for handle, addresses, attrs in holdings:
                    for address in addresses:
                        ip = ipaddress.ip_address(address)
                        block = next((b for b in blocks if ip in b.cidr), None)
                        if block is None:
                            try:
                                block = self._block_for(ip)
                            except AddressConflict as exc:
                                conflicts.append(f"{attrs.get('pod', handle)}: {exc}")
                                continue
                            blocks.append(block)
                        holder = block.allocations.get(address)
                        if holder is not None and holder.get("handle") != handle:
                            conflicts.append(
                                f"{attrs.get('pod', handle)}: address {address} is held in IPAM by "
                                f"{holder.get('pod') or holder.get('handle')}"
                            )
                        elif holder is None:
                            block.allocations[address] = self._holding(handle, attrs)
                            changed[block.name] = block
                            recorded.append(address)
                if all(self._write(b) for b in changed.values()):
                    return recorded, conflicts
            raise IpamError("could not record the running endpoints' addresses: the datastore kept changing")

    def _block_for(self, ip: IPAddress) -> Block:
        """The block that holds `ip`, claimed for this node if it is free (it was freed while this
        node was thought gone); AddressConflict if another node holds it."""
        pool = next((p for p in self._pools() if ip in p.cidr), None)
        if pool is None:
            raise AddressConflict(f"address {ip} is in no IPPool: its pool was deleted while a pod holds it")
        cidr = ipaddress.ip_network((ip, pool.block_size), strict=False)
        for _attempt in range(100):
            obj = self.datastore.get(IPAM_BLOCK, block_name(cidr))
            if obj is not None:
                block = Block.from_object(obj)
                if block.node != self.node:
                    raise AddressConflict(f"address {ip} lies in block {cidr}, which node {block.node} holds now")
                self._own()[block.name] = block
                return copy.deepcopy(block)
            created = self._create_block(cidr, pool.name)
            if created is not None:
                return created
        raise IpamError(f"could not claim block {cidr}: the datastore kept changing")

    def release_unless(self, keep: Callable[[str], bool]) -> dict[str, list[str]]:
        """Release every handle on this node for which keep(handle) is False (garbage collection)."""
        with self._lock:
            out: dict[str, list[str]] = {}
            for handle in list(self.allocations()):
                if not keep(handle):
                    out[handle] = self.release(handle)
            return out


def release_node_blocks(datastore: Datastore, node: str, held: Collection[str]) -> list[str]:
    """Free the blocks of a removed node (invariant 8): each block in whose range no address is
    `held` by an endpoint (whether or not the block still records it), by compare-and-swap on
    the block as read."""
    addresses = [ipaddress.ip_address(a) for a in held]
    freed = []
    for block in list_blocks(datastore):
        if block.node != node or any(a in block.cidr for a in addresses):
            continue
        try:
            if datastore.delete(IPAM_BLOCK, block.name, resource_version=block.meta.get("resourceVersion")):
                freed.append(str(block.cidr))
        except Conflict:
            continue  # it changed: the next pass looks again
    return freed
