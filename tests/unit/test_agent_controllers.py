"""The agent's controllers without root: the in-memory datastore, shared informers, and fakes
that record what would be written to the kernel.

Invariants (docs/design/agent.md, routing.md, ipam.md):
- a remote node that joins, leaves or moves costs routing work for that node alone;
- the Node object is written only where it differs, keeps what others set, comes back if
  deleted, and stays while the agent is silent; blocks of a silent node stay, blocks of a
  removed one go after the grace period, never while an endpoint holds an address in them;
- ADD publishes the endpoint and isolates the pod before it answers; a failed ADD leaves no
  endpoint behind; an address another endpoint holds is never given;
- the policy model is compiled only when its inputs change.
"""

from __future__ import annotations

import ipaddress
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import RecordingPodNetwork
from tests.lablib import wait_until
from tulle.agent.cni_service import CniContext, CniService
from tulle.agent.controller import FULL
from tulle.agent.endpoints import EndpointRegistry
from tulle.agent.ipam_controller import IpamController
from tulle.agent.main import ClusterInformers
from tulle.agent.node import node_object
from tulle.agent.node_controller import NodeController
from tulle.agent.pending import PendingDeletes
from tulle.agent.policy_controller import ConnectionCutter, PolicyController
from tulle.agent.removed_nodes import GONE, RemovedNodeController, pods_on
from tulle.agent.routes_controller import RoutesController, RoutingKernel
from tulle.dataplane.host import Underlay
from tulle.dataplane.nft import NftReconciler
from tulle.dataplane.routing import EntryChange
from tulle.datastore.base import Datastore, Obj
from tulle.datastore.factory import open_datastore
from tulle.datastore.memory import MemoryServer, forget_server, memory_server
from tulle.ipam.allocator import Block, NodeAllocator, list_blocks
from tulle.model.endpoints import WorkloadEndpoint
from tulle.model.kinds import IPAM_BLOCK, NODE, POD, WORKLOAD_ENDPOINT, Kind
from tulle.model.pools import parse_pool, pool_object
from tulle.policy.compiler import PolicyModel
from tulle.routing.compile import LocalNode, VxlanEndpoint, vxlan_mac

POOLS = [parse_pool(pool_object("v4", "10.244.0.0/16", 26)), parse_pool(pool_object("v6", "fd00:10:244::/104", 122))]
UNDERLAY = Underlay("uplink", ("172.30.1.11/24", "fd00:172:30:1::11/64"), 1500)


@dataclass
class Cluster:
    server: MemoryServer
    ds: Datastore
    informers: ClusterInformers

    def write_pools(self) -> None:
        for name, cidr, size in (("v4", "10.244.0.0/16", 26), ("v6", "fd00:10:244::/104", 122)):
            self.ds.create(pool_object(name, cidr, size))

    def remote_node(self, name: str, index: int) -> None:
        """Another node as its agent leaves it: a Node object and a block with its tunnel address."""
        address = f"172.30.1.{100 + index}"
        alloc = NodeAllocator(self.ds, name, lambda: POOLS)
        [tunnel] = alloc.allocate(f"tulle-tunnel/{name}/v4", [4], {"node": name})
        vxlan = [VxlanEndpoint(4, vxlan_mac(name, 4), str(tunnel))]
        self.ds.create(node_object(name, "vxlan", [address], vxlan))


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    name = f"ctl-{uuid.uuid4().hex[:8]}"
    server = memory_server(name)
    ds = open_datastore(f"memory://{name}")
    informers = ClusterInformers.make(ds)
    yield Cluster(server, ds, informers)
    for informer in informers.all():
        informer.stop()
    forget_server(name)


def start(cluster: Cluster) -> None:
    for informer in cluster.informers.all():
        informer.start()
    assert all(i.wait_synced(5) for i in cluster.informers.all())


# -- routes ---------------------------------------------------------------------------------


@dataclass
class FakeReconciler:
    """Records the full applies a reconciler, and the changes the writer, is asked for."""

    changes: list[EntryChange] = field(default_factory=list)
    applies: list[Any] = field(default_factory=list)

    def write(self, change: EntryChange) -> None:
        self.changes.append(change)

    def apply(self, desired: Any, *devices: Any) -> Any:
        self.applies.append(desired)

        class Nothing:
            add: list[Any] = []
            remove: list[Any] = []

            def __bool__(self) -> bool:
                return False

        return Nothing()

    def remove(self, _name: str) -> bool:
        return False


def fake_kernel() -> RoutingKernel:
    fakes = [FakeReconciler() for _ in range(5)]
    return RoutingKernel(*fakes)  # type: ignore[arg-type]


def test_a_remote_node_joining_costs_the_work_of_that_node_alone(cluster: Cluster) -> None:
    for i in range(100):
        cluster.remote_node(f"n{i}", i)
    start(cluster)
    kernel = fake_kernel()
    routes = RoutesController(
        LocalNode("me", "vxlan", UNDERLAY.addresses), UNDERLAY, cluster.informers.nodes, cluster.informers.blocks,
        lambda: {4: "10.244.255.1"}, kernel,
    )  # fmt: skip
    routes.sync_all()
    assert len(routes.applied) == 100
    routes.run_pending()  # what the informers' initial lists enqueued
    written: FakeReconciler = kernel.changes  # type: ignore[assignment]
    written.changes.clear()
    synced = routes.synced_keys
    cluster.remote_node("joiner", 150)
    inf = cluster.informers
    assert wait_until(lambda: inf.nodes.get("joiner") is not None and inf.blocks.by_index("node", "joiner"))
    routes.run_pending()
    assert routes.synced_keys - synced == 1  # one key: the node; its block and Node events coalesced
    [change] = written.changes
    assert [r.dst for r in change.routes_add] == [str(b.cidr) for b in inf.blocks.by_index("node", "joiner")]
    assert len(change.neighbours_add) == 1 and len(change.fdb_add) == 1
    assert not (change.routes_remove or change.neighbours_remove or change.fdb_remove)
    # another pod on a remote node changes its block's allocations only: no routing work
    written.changes.clear()
    NodeAllocator(cluster.ds, "n7", lambda: POOLS).allocate("net/pod/eth0", [4])
    time.sleep(0.2)
    routes.run_pending()
    assert written.changes == []
    # the node leaves: its entries go, no one else's
    cluster.ds.delete(NODE, "joiner")
    assert wait_until(lambda: routes._queued)
    routes.run_pending()
    [change] = written.changes
    assert not change.routes_add and len(change.routes_remove) == 1 and len(change.fdb_remove) == 1


# -- the node's registration ------------------------------------------------------------------


def node_controller(cluster: Cluster) -> NodeController:
    return NodeController(cluster.ds, "me", "vxlan", UNDERLAY, lambda: [], cluster.informers.nodes, lease_ttl=2)


def test_registration_writes_only_what_differs_and_keeps_what_others_set(cluster: Cluster) -> None:
    start(cluster)
    node = node_controller(cluster)
    node.register()
    first = cluster.ds.get(NODE, "me")
    assert first is not None and node.registered
    first["metadata"]["labels"]["zone"] = "a"  # a user labels the node
    cluster.ds.update(first)
    labelled = cluster.ds.get(NODE, "me")
    node.register()  # a restart that changes nothing
    assert cluster.ds.get(NODE, "me") == labelled


def test_a_deleted_node_object_is_registered_again_but_a_silent_agent_keeps_it(cluster: Cluster) -> None:
    start(cluster)
    node = node_controller(cluster)
    node.register()
    node.heartbeat.start()
    assert "me" in cluster.ds.live_nodes()
    assert wait_until(lambda: "me" not in cluster.ds.live_nodes(), timeout=5)  # silent past its TTL
    assert cluster.ds.get(NODE, "me") is not None  # liveness is reported, never acted on
    cluster.ds.delete(NODE, "me")
    assert wait_until(lambda: FULL in node._queued)
    node.run_pending()
    assert cluster.ds.get(NODE, "me") is not None


# -- IPAM ---------------------------------------------------------------------------------------


def ipam_controller(cluster: Cluster, registry: EndpointRegistry) -> IpamController:
    allocator = NodeAllocator(cluster.ds, "me", lambda: POOLS)
    return IpamController(
        cluster.ds, "me", allocator, registry, cluster.informers.pools,
        tunnel_families=lambda: [4], on_tunnels=lambda _t: None,
    )  # fmt: skip


def removed_node_controller(cluster: Cluster, grace: float = 0.3) -> RemovedNodeController:
    inf = cluster.informers
    return RemovedNodeController(cluster.ds, "me", inf.nodes, inf.blocks, node_grace=grace)


def endpoint(namespace: str, pod: str, node: str, ips: list[str]) -> Obj:
    return WorkloadEndpoint(namespace, pod, node, "tulle", uuid.uuid4().hex, "eth0", tuple(ips)).to_object()


def test_blocks_of_a_silent_node_stay_and_a_removed_nodes_go_after_the_grace(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_pools()
    cluster.remote_node("silent", 1)
    cluster.remote_node("removed", 2)
    start(cluster)
    ipam = ipam_controller(cluster, EndpointRegistry(str(tmp_path)))
    ipam.sync(FULL)
    assert ipam.tunnels and ipam.families() == [4, 6]
    removed = removed_node_controller(cluster)
    cluster.ds.delete(NODE, "removed")
    assert wait_until(lambda: GONE in removed._queued)
    removed.run_pending()
    assert {b.node for b in list_blocks(cluster.ds)} == {"me", "silent", "removed"}  # within the grace
    time.sleep(0.4)
    removed.run_pending()
    assert {b.node for b in list_blocks(cluster.ds)} == {"me", "silent"}


def test_a_removed_nodes_block_stays_while_an_endpoint_holds_an_address_in_it(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_pools()
    cluster.remote_node("removed", 2)
    [block] = [b for b in list_blocks(cluster.ds) if b.node == "removed"]
    moved = str(next(iter(block.cidr.hosts())) + 5)
    cluster.ds.create(endpoint("web", "moved", "elsewhere", [moved]))  # a pod now on another node holds it
    start(cluster)
    removed = removed_node_controller(cluster, grace=0.0)
    cluster.ds.delete(NODE, "removed")
    time.sleep(0.2)
    removed.sync(GONE)
    assert [b.node for b in list_blocks(cluster.ds) if b.node == "removed"] == ["removed"]


def pod_object(namespace: str, name: str, node: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"nodeName": node, "containers": [{"name": "main", "image": "busybox"}]},
        "status": {"phase": "Running"},
    }


def _names(ds: Datastore, kind: Kind) -> set[str]:
    return {o["metadata"]["name"] for o in ds.list(kind)[0]}


def test_a_removed_nodes_pods_and_endpoints_go_after_the_grace_and_no_other_nodes(
    cluster: Cluster, tmp_path: Path
) -> None:
    cluster.write_pools()
    cluster.remote_node("silent", 1)
    cluster.remote_node("removed", 2)
    [block] = [b for b in list_blocks(cluster.ds) if b.node == "removed"]
    for name, node in (("gone", "removed"), ("quiet", "silent"), ("mine", "me"), ("virtual", "never-a-node")):
        cluster.ds.create(pod_object("x", name, node))
    cluster.ds.create(endpoint("x", "gone", "removed", [str(next(iter(block.cidr.hosts())) + 5)]))
    cluster.ds.create(endpoint("x", "quiet", "silent", ["10.244.255.5"]))
    start(cluster)
    removed = removed_node_controller(cluster)
    cluster.ds.delete(NODE, "removed")
    assert wait_until(lambda: GONE in removed._queued)
    removed.run_pending()
    assert _names(cluster.ds, POD) == {"gone", "quiet", "mine", "virtual"}  # within the grace
    time.sleep(0.4)
    removed.run_pending()
    # Pods of a silent node, of this node and of a node that never held a block stay.
    assert _names(cluster.ds, POD) == {"quiet", "mine", "virtual"}
    assert {o["spec"]["pod"] for o in cluster.ds.list(WORKLOAD_ENDPOINT)[0]} == {"quiet"}
    assert {b.node for b in list_blocks(cluster.ds)} == {"silent"}
    removed.sync(GONE)  # every agent collects: a second pass finds nothing and fails nothing
    assert _names(cluster.ds, POD) == {"quiet", "mine", "virtual"}


def test_a_pod_rewritten_since_it_was_read_is_not_deleted_nor_are_the_blocks_freed(cluster: Cluster) -> None:
    cluster.write_pools()
    cluster.remote_node("removed", 2)
    cluster.ds.create(pod_object("x", "moving", "removed"))
    start(cluster)
    removed = removed_node_controller(cluster, grace=0.0)
    cluster.ds.delete(NODE, "removed")
    as_read = pods_on(cluster.ds.list(POD)[0], "removed")
    # Scheduled again elsewhere between another agent's read and its delete.
    cluster.ds.update(dict(as_read[0], spec=dict(as_read[0]["spec"], nodeName="node9")))
    assert not removed._delete_unchanged(POD, as_read, "removed")
    assert _names(cluster.ds, POD) == {"moving"}
    time.sleep(0.2)
    removed.sync(GONE)  # read afresh: the pod is no longer the removed node's
    assert _names(cluster.ds, POD) == {"moving"}
    assert not [b for b in list_blocks(cluster.ds) if b.node == "removed"]


# -- CNI ----------------------------------------------------------------------------------------


@dataclass
class Cni:
    service: CniService
    podnet: RecordingPodNetwork
    registry: EndpointRegistry
    allocator: NodeAllocator
    pending: PendingDeletes
    isolated: list[int]
    netns: str

    def add(self, pod: str, container: str | None = None) -> dict[str, Any]:
        return self.service.handle(self.request("ADD", pod, container or pod))

    def request(self, command: str, pod: str, container: str) -> dict[str, Any]:
        return {
            "command": command,
            "containerID": container,
            "ifname": "eth0",
            "netns": self.netns,
            "args": {"K8S_POD_NAMESPACE": "web", "K8S_POD_NAME": pod},
            "config": {"name": "tulle"},
        }


@pytest.fixture
def cni(cluster: Cluster, tmp_path: Path) -> Cni:
    cluster.write_pools()
    start(cluster)
    netns = tmp_path / "netns"
    netns.write_text("")
    registry = EndpointRegistry(str(tmp_path / "state"))
    pending = PendingDeletes(str(tmp_path / "state"))
    allocator = NodeAllocator(cluster.ds, "me", lambda: POOLS)
    podnet = RecordingPodNetwork()
    isolated: list[int] = []
    ctx = CniContext(
        node="me",
        datastore=cluster.ds,
        registry=registry,
        allocator=allocator,
        pending=pending,
        families=lambda: [4, 6],
        pod_mtu=lambda: 1450,
        address_holders=lambda a: cluster.informers.endpoints.by_index("address", a),
        sync_policy=lambda: isolated.append(1),
        endpoints_changed=lambda _h: None,
        readiness_problems=lambda: [],
        remove_stray_interfaces=lambda: 0,
        podnet=podnet,
    )
    return Cni(CniService(ctx), podnet, registry, allocator, pending, isolated, str(netns))


def test_add_publishes_the_endpoint_and_isolates_the_pod_before_it_answers(cni: Cni, cluster: Cluster) -> None:
    answer = cni.add("a")
    assert "result" in answer, answer
    ips = [i["address"].split("/")[0] for i in answer["result"]["ips"]]
    assert sorted(ipaddress.ip_address(a).version for a in ips) == [4, 6]
    [wep] = [WorkloadEndpoint.from_object(o) for o in cluster.ds.list(WORKLOAD_ENDPOINT)[0]]
    assert (wep.pod, wep.node, sorted(wep.ips)) == ("a", "me", sorted(ips))
    assert cni.isolated == [1]


def test_a_failed_add_with_the_datastore_away_leaves_no_endpoint_and_a_pending_del(cni: Cni, cluster: Cluster) -> None:
    cluster.server.set_reachable(False)
    answer = cni.add("a")
    assert answer["error"]["code"] == 11, answer
    assert cni.registry.all() == [] and cni.podnet.made == {}
    assert len(cni.pending.names()) == 1
    cluster.server.set_reachable(True)
    assert cni.pending.replay(cni.service.delete_now) == 1


def test_a_del_with_the_datastore_away_succeeds_and_gives_the_addresses_back_later(cni: Cni, cluster: Cluster) -> None:
    assert "result" in cni.add("a")
    cluster.server.set_reachable(False)
    assert cni.service.handle(cni.request("DEL", "a", "a")) == {"result": None}
    assert cni.registry.all() == [] and cni.podnet.made == {}
    cluster.server.set_reachable(True)
    assert cni.allocator.allocations() != {}  # still held: the DEL waits
    cni.pending.replay(cni.service.delete_now)
    assert cni.allocator.allocations() == {}
    assert cluster.ds.list(WORKLOAD_ENDPOINT)[0] == []


def test_an_address_a_live_endpoint_holds_is_never_given_even_if_ipam_lost_it(cni: Cni) -> None:
    first = cni.add("a")
    held = first["result"]["ips"][0]["address"].split("/")[0]
    [ep] = cni.registry.all()
    cni.allocator.release(ep.handle)  # IPAM's record lost behind the pod's back
    refused = cni.add("b")
    assert refused["error"]["code"] == 11 and held in refused["error"]["details"], refused
    again = cni.add("b")  # the runtime retries: the holder's record was repaired
    assert held not in [i["address"].split("/")[0] for i in again["result"]["ips"]]


# -- policy -------------------------------------------------------------------------------------


class FakeNft:
    def __init__(self) -> None:
        self.runs: list[Any] = []

    def list_table(self, family: str = "inet", name: str = "tulle") -> list[dict[str, Any]] | None:
        return None

    def run(self, commands: list[dict[str, Any]]) -> None:
        self.runs.append(commands)


def test_the_policy_model_is_compiled_only_when_its_inputs_change(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_pools()
    start(cluster)
    inf = cluster.informers
    policy = PolicyController(
        "me", "vxlan", EndpointRegistry(str(tmp_path)), inf.namespaces, inf.pods, inf.policies, inf.endpoints,
        inf.pools, lambda: POOLS, nft=NftReconciler(FakeNft()), cutter=ConnectionCutter(),
    )  # fmt: skip
    policy.sync(FULL)
    first: PolicyModel | None = policy.model
    policy.sync(FULL)  # a periodic resync with nothing new
    assert policy.model is first
    cluster.ds.create(endpoint("web", "b", "other", ["10.244.9.9"]))
    assert wait_until(lambda: policy._queued)
    policy.run_pending()
    assert policy.model is not first
    assert policy.model is not None and policy.model.addresses == {"10.244.9.9": "web/b"}


def test_pools_that_overlap_are_refused_and_the_last_good_ones_kept(cluster: Cluster, tmp_path: Path) -> None:
    cluster.write_pools()
    start(cluster)
    ipam = ipam_controller(cluster, EndpointRegistry(str(tmp_path)))
    assert [p.name for p in ipam.load_pools()] == ["v4", "v6"]
    cluster.ds.create(pool_object("clash", "10.244.128.0/17", 26))
    assert wait_until(lambda: len(cluster.informers.pools.values()) == 3)
    assert [p.name for p in ipam.load_pools()] == ["v4", "v6"]


def test_block_objects_round_trip(cluster: Cluster) -> None:
    cluster.write_pools()
    alloc = NodeAllocator(cluster.ds, "me", lambda: POOLS)
    alloc.allocate("h", [4])
    [obj] = cluster.ds.list(IPAM_BLOCK)[0]
    block = Block.from_object(obj)
    assert block.to_object()["spec"] == obj["spec"]
    assert os.path.basename(block.name) == block.name
