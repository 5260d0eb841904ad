"""IPAM against a real etcd: pools, blocks claimed by compare-and-swap, addresses never twice."""

from __future__ import annotations

import ipaddress
import multiprocessing
import threading
from typing import Any

import pytest

from tulle.datastore.base import Datastore, TlsFiles
from tulle.datastore.factory import open_datastore
from tulle.ipam.allocator import Block, IpamError, NodeAllocator, list_blocks, release_node_blocks
from tulle.lab.etcd_server import EtcdServer
from tulle.model.kinds import IPAM_BLOCK, Kind
from tulle.model.pools import Pool, PoolError, check_no_overlap, parse_pool, pool_object


def pool(name: str, cidr: str, block: int) -> Pool:
    return parse_pool(pool_object(name, cidr, block))


# -- pools (pure) ---------------------------------------------------------------------------


def test_pool_blocks_cover_the_pool_once() -> None:
    p = pool("p", "10.0.0.0/24", 26)
    blocks = list(p.blocks_from("node-a"))
    assert sorted(str(b) for b in blocks) == ["10.0.0.0/26", "10.0.0.128/26", "10.0.0.192/26", "10.0.0.64/26"]
    assert sorted(map(str, p.blocks_from("node-b"))) == sorted(map(str, blocks))


def test_nodes_start_at_different_blocks() -> None:
    p = pool("p", "10.0.0.0/16", 26)
    firsts = {str(next(p.blocks_from(f"node{i}"))) for i in range(20)}
    assert len(firsts) > 10


@pytest.mark.parametrize(
    ("cidr", "reason"),
    [
        ("10.0.0.1/16", "host bits"),
        ("not-a-cidr", "CIDR"),
        ("10.0.0.0", "CIDR"),
        ("300.0.0.0/8", "CIDR"),
    ],
)
def test_pool_that_is_not_a_cidr_is_refused_naming_the_field(cidr: str, reason: str) -> None:
    with pytest.raises(PoolError, match=r"spec\.cidr"):
        parse_pool(pool_object("bad", cidr))


@pytest.mark.parametrize("block", [8, 31, 33, "26", True])
def test_bad_block_size_is_refused(block: Any) -> None:
    with pytest.raises(PoolError, match=r"spec\.blockSize"):
        parse_pool(pool_object("bad", "10.0.0.0/16", block))


def test_overlapping_pools_are_refused() -> None:
    with pytest.raises(PoolError, match="overlaps IPPool a"):
        check_no_overlap([pool("a", "10.0.0.0/16", 26), pool("b", "10.0.128.0/17", 26)])
    check_no_overlap([pool("a", "10.0.0.0/16", 26), pool("b", "10.1.0.0/16", 26), pool("c", "fd00::/64", 122)])


# -- allocation against etcd ----------------------------------------------------------------


def test_dual_stack_allocation_and_release(store: Datastore) -> None:
    pools = [pool("v4", "10.10.0.0/24", 28), pool("v6", "fd10::/120", 124)]
    alloc = NodeAllocator(store, "n1", lambda: pools)
    given = alloc.allocate("net/c1/eth0", [4, 6], {"pod": "x/a"})
    assert [a.version for a in given] == [4, 6]
    assert alloc.allocations() == {"net/c1/eth0": [str(a) for a in given]}
    # A repeated request for the same handle gets the same addresses (a retried ADD).
    assert alloc.allocate("net/c1/eth0", [4, 6]) == given
    assert sorted(alloc.release("net/c1/eth0")) == sorted(str(a) for a in given)
    # Invariant 4: releasing again is fine and gives nothing.
    assert alloc.release("net/c1/eth0") == []
    assert alloc.allocations() == {}


def test_node_claims_another_block_when_one_fills(store: Datastore) -> None:
    pools = [pool("v4", "10.11.0.0/24", 30)]  # blocks of 4 addresses
    alloc = NodeAllocator(store, "n1", lambda: pools)
    addresses = [alloc.allocate(f"net/c{i}/eth0", [4])[0] for i in range(10)]
    assert len(set(addresses)) == 10
    mine = [b for b in list_blocks(store) if b.node == "n1"]
    assert len(mine) == 3
    for a in addresses:
        assert any(a in b.cidr for b in mine)


def test_half_dual_stack_allocation_is_given_back(store: Datastore) -> None:
    """Invariant 3: no IPv6 pool, so the IPv4 address must not stay allocated."""
    pools = [pool("v4", "10.12.0.0/24", 28)]
    alloc = NodeAllocator(store, "n1", lambda: pools)
    with pytest.raises(IpamError, match="no IPv6 pool"):
        alloc.allocate("net/c1/eth0", [4, 6])
    assert alloc.allocations() == {}


def test_exhausted_pool_says_so(store: Datastore) -> None:
    pools = [pool("tiny", "10.13.0.0/29", 30)]  # 2 blocks of 4
    a = NodeAllocator(store, "a", lambda: pools)
    b = NodeAllocator(store, "b", lambda: pools)
    a.ensure_block(4)
    b.ensure_block(4)
    for i in range(4):
        a.allocate(f"net/a{i}/eth0", [4])
    with pytest.raises(IpamError, match=r"all 2 blocks of tiny \(10.13.0.0/29"):
        a.allocate("net/a-extra/eth0", [4])


def test_fifty_parallel_allocations_never_share_an_address(
    store: Datastore, prefix: str, etcd_server: EtcdServer
) -> None:
    """Invariant 2 under contention: two allocators of one node and of another node race."""
    pools = [pool("v4", "10.14.0.0/24", 27), pool("v6", "fd14::/120", 124)]
    tls = etcd_server.client_tls
    allocators = [NodeAllocator(open_datastore(store.url, prefix, tls=tls), n, lambda: pools) for n in ("a", "a", "b")]
    results: list[list[ipaddress.IPv4Address | ipaddress.IPv6Address]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    barrier = threading.Barrier(50)

    def work(i: int) -> None:
        try:
            barrier.wait()
            got = allocators[i % 3].allocate(f"net/c{i}/eth0", [4, 6])
            with lock:
                results.append(got)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    flat = [a for r in results for a in r]
    assert len(flat) == 100
    assert len(set(flat)) == 100
    blocks = list_blocks(store)
    assert len({str(b.cidr) for b in blocks}) == len(blocks)


def _claim(url: str, tls: TlsFiles | None, prefix: str, node: str, barrier: Any, out: Any) -> None:
    alloc = NodeAllocator(open_datastore(url, prefix, tls=tls), node, lambda: [pool("p", "10.15.0.0/24", 26)])
    barrier.wait()
    try:
        out.put((node, str(alloc.claim_block(4).cidr)))
    except IpamError as exc:
        out.put((node, f"error: {exc}"))


def test_n_blocks_and_n_plus_one_agents_behind_a_barrier(
    store: Datastore, prefix: str, etcd_server: EtcdServer
) -> None:
    """Invariant 1: a pool of 4 blocks, 5 agents claiming at the same moment: 4 get one block
    each, the fifth gets a clear error."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(5)
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_claim, args=(store.url, etcd_server.client_tls, prefix, f"n{i}", barrier, out))
        for i in range(5)
    ]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    blocks = [v for v in results.values() if not v.startswith("error")]
    failures = [v for v in results.values() if v.startswith("error")]
    assert sorted(blocks) == ["10.15.0.0/26", "10.15.0.128/26", "10.15.0.192/26", "10.15.0.64/26"]
    assert len(failures) == 1
    assert "all 4 blocks of p (10.15.0.0/24, /26 blocks) are claimed" in failures[0]
    owners = {str(b.cidr): b.node for b in list_blocks(store)}
    assert len(set(owners.values())) == 4


NOTHING_HELD: list[str] = []


def test_gone_node_blocks_are_freed(store: Datastore) -> None:
    pools = [pool("v4", "10.16.0.0/24", 26)]
    NodeAllocator(store, "gone", lambda: pools).allocate("net/c/eth0", [4])
    NodeAllocator(store, "stays", lambda: pools).ensure_block(4)
    assert release_node_blocks(store, "gone", NOTHING_HELD)
    assert {b.node for b in list_blocks(store)} == {"stays"}


def test_invariant_8_a_block_where_an_endpoint_holds_an_address_is_not_freed(store: Datastore) -> None:
    pools = [pool("v4", "10.16.1.0/24", 26)]
    gone = NodeAllocator(store, "gone", lambda: pools)
    [address] = gone.allocate("net/c/eth0", [4])
    assert release_node_blocks(store, "gone", {str(address)}) == []
    # also an address the block no longer records: the endpoint's word is what counts
    gone.release("net/c/eth0")
    assert release_node_blocks(store, "gone", {str(address)}) == []
    assert {b.node for b in list_blocks(store)} == {"gone"}


def test_invariant_7_an_address_an_endpoint_holds_is_never_given(store: Datastore) -> None:
    """IPAM's record lost (the block says the address is free) while a pod still holds it."""
    pools = [pool("v4", "10.16.2.0/24", 26)]
    alloc = NodeAllocator(store, "n", lambda: pools)
    [first] = alloc.allocate("net/old/eth0", [4])
    alloc.release("net/old/eth0")  # lost behind the pod's back
    [second] = alloc.allocate("net/new/eth0", [4], held={str(first)}.__contains__)
    assert second != first


def test_invariant_7_reclaim_records_a_running_endpoints_addresses_again(store: Datastore) -> None:
    """An agent restarted after its block was freed (as a node wrongly thought gone): it claims
    the block again and records its pods' addresses, so a new pod gets another address."""
    pools = [pool("v4", "10.16.3.0/24", 26)]
    alloc = NodeAllocator(store, "n", lambda: pools)
    [held] = alloc.allocate("net/old/eth0", [4])
    assert release_node_blocks(store, "n", NOTHING_HELD)
    again = NodeAllocator(store, "n", lambda: pools)  # the restarted agent
    recorded, conflicts = again.reclaim([("net/old/eth0", [str(held)], {"pod": "x/old"})])
    assert (recorded, conflicts) == ([str(held)], [])
    assert again.allocations() == {"net/old/eth0": [str(held)]}
    assert again.reclaim([("net/old/eth0", [str(held)], {"pod": "x/old"})]) == ([], [])  # idempotent
    [new] = again.allocate("net/new/eth0", [4])
    assert new != held


def test_reclaim_reports_an_address_held_by_another_and_takes_nothing_over(store: Datastore) -> None:
    pools = [pool("v4", "10.16.4.0/24", 26)]
    alloc = NodeAllocator(store, "n", lambda: pools)
    [address] = alloc.allocate("net/other/eth0", [4], {"pod": "x/other"})
    recorded, conflicts = alloc.reclaim([("net/mine/eth0", [str(address)], {"pod": "x/mine"})])
    assert recorded == []
    assert conflicts == [f"x/mine: address {address} is held in IPAM by x/other"]
    assert alloc.allocations() == {"net/other/eth0": [str(address)]}
    # an address in another node's block: reported too
    [theirs] = NodeAllocator(store, "m", lambda: pools).allocate("net/t/eth0", [4])
    _, conflicts = alloc.reclaim([("net/mine/eth0", [str(theirs)], {"pod": "x/mine"})])
    assert len(conflicts) == 1 and "which node m holds now" in conflicts[0]


class CountingDatastore:
    """The test's datastore, counting the calls an allocation makes."""

    def __init__(self, inner: Datastore) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def list(self, kind: Kind, namespace: str | None = None) -> Any:
        self.calls.append(f"list {kind.plural}")
        return self.inner.list(kind, namespace)

    def get(self, kind: Kind, name: str, namespace: str | None = None) -> Any:
        self.calls.append(f"get {kind.plural}")
        return self.inner.get(kind, name, namespace)

    def update(self, obj: Any) -> Any:
        self.calls.append("update")
        return self.inner.update(obj)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_an_allocation_reads_this_nodes_blocks_not_the_clusters(store: Datastore) -> None:
    """Per-ADD cost must not grow with the cluster: only claiming a block lists every block, and
    an allocation nobody races is one compare-and-swap."""
    pools = [pool("v4", "10.17.0.0/16", 28)]  # blocks of 16
    for i in range(20):
        NodeAllocator(store, f"other{i}", lambda: pools).allocate(f"net/o{i}/eth0", [4])
    counting = CountingDatastore(store)
    mine = NodeAllocator(counting, "me", lambda: pools)  # type: ignore[arg-type]
    given = [mine.allocate("net/c0/eth0", [4])[0]]
    counting.calls.clear()
    given += [mine.allocate(f"net/c{i}/eth0", [4])[0] for i in range(1, 20)]  # the 17th needs a second block
    assert counting.calls.count(f"list {IPAM_BLOCK.plural}") == 1  # that one claim, nothing else
    assert counting.calls.count("update") == 18  # the 17th address is written with its new block
    assert len(set(given)) == 20
    assert len(mine.allocations()) == 20
    assert mine.release("net/c19/eth0") == [str(given[19])]  # from the block claimed second


def test_a_block_freed_behind_the_agents_back_is_never_allocated_from(store: Datastore) -> None:
    """The node was thought gone and its block freed, then claimed by another node: the agent
    that comes back must neither use that block nor fail; it claims a block of its own."""
    pools = [pool("v4", "10.18.0.0/26", 28)]  # 4 blocks of 16
    mine = NodeAllocator(store, "back", lambda: pools)
    first = mine.allocate("net/c1/eth0", [4])[0]
    [held] = list_blocks(store)
    assert release_node_blocks(store, "back", NOTHING_HELD)
    store.create(Block(cidr=held.cidr, pool="v4", node="thief").to_object())
    thief = NodeAllocator(store, "thief", lambda: pools)
    assert [b.cidr for b in thief.local_blocks()] == [held.cidr] and first in held.cidr
    again = mine.allocate("net/c2/eth0", [4])[0]
    assert not any(again in b.cidr for b in thief.local_blocks())
    assert {b.node for b in mine.local_blocks()} == {"back"}
    assert mine.allocations() == {"net/c2/eth0": [str(again)]}
