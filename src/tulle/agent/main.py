"""The node agent, wired: shared informers feed small controllers, each owning one part of the
node (docs/design/agent.md). This module only builds and starts them.

Start-up is built so that a restart changes nothing for running pods: endpoints are read back
from disk and repaired, their addresses recorded in IPAM again and their WorkloadEndpoints
published again before any new ADD is taken; routes, neighbours, FDB entries and the nftables
table are reconciled (diffed), never flushed. The node's registration outlives the agent; only
its heartbeat expires with it.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from tulle.agent.api import ApiServer, prepare_socket_dir, serve
from tulle.agent.cni_failures import CniFailureLog
from tulle.agent.cni_service import CniContext, CniService
from tulle.agent.controller import FULL, VERIFY, Controller
from tulle.agent.endpoint_controller import PUBLISH, EndpointController
from tulle.agent.endpoints import EndpointRegistry, prepare_state_dir
from tulle.agent.guard_controller import GuardConfig, GuardController
from tulle.agent.informers import Informer
from tulle.agent.ipam_controller import IpamController
from tulle.agent.node import node_info
from tulle.agent.node_controller import NodeController
from tulle.agent.pending import PendingDeletes
from tulle.agent.policy_controller import PolicyController
from tulle.agent.removed_nodes import RemovedNodeController
from tulle.agent.routes_controller import RoutesController
from tulle.agent.status import AgentStatus
from tulle.cni.files import UnsafePermissions
from tulle.dataplane import host
from tulle.datastore.base import DEFAULT_PREFIX, Datastore, DatastoreError, Login, TlsFiles
from tulle.datastore.factory import insecure_warning, open_datastore
from tulle.ipam.allocator import Block, IpamError, NodeAllocator
from tulle.kernelstate.net import VXLAN_PORT
from tulle.model.endpoints import WorkloadEndpoint
from tulle.model.kinds import IP_POOL, IPAM_BLOCK, NAMESPACE, NETWORK_POLICY, NODE, POD, WORKLOAD_ENDPOINT
from tulle.model.node_report import report_annotations
from tulle.model.pools import Pool, parse_pool
from tulle.policy.inputs import Namespace, PodSource, PolicySource, decode_pod, decode_policy, parse_namespace
from tulle.routing.compile import MODES, LocalNode, NodeInfo, VxlanEndpoint, pod_mtu, vxlan_mac

log = logging.getLogger("tulle.agent")


@dataclass
class AgentConfig:
    node: str
    datastore: str
    mode: str = "vxlan"
    # How the agent proves itself to the datastore (docs/deployment.md); the CNI plugin holds none.
    datastore_tls: TlsFiles | None = None
    datastore_login: Login | None = None
    insecure_datastore: bool = False  # plain http:// accepted, and warned about at every start
    prefix: str = DEFAULT_PREFIX
    state_dir: str = "/var/lib/tulle"
    socket: str = "/run/tulle/agent.sock"
    interface: str | None = None  # the underlay; default: the interface of the default route
    lease_ttl: int = 15  # the heartbeat's: how long a silent agent still counts as alive
    node_grace: float = 60.0  # how long a removed node's pods, endpoints and blocks stay
    resync_interval: float = 30.0  # a full sync from the informers' state (no kernel reads)
    verify_interval: float = 90.0  # a full sync that reads the kernel back and repairs drift
    mtu: int | None = None
    connection_limit: int = 16384  # tracked connections per pod source address
    source_verification: bool = True  # drop what a pod sends from addresses or MACs not its own
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClusterInformers:
    """One informer per kind, each object decoded once into what its readers use."""

    namespaces: Informer[Namespace]
    pods: Informer[PodSource]
    policies: Informer[PolicySource]
    endpoints: Informer[WorkloadEndpoint]
    nodes: Informer[NodeInfo]
    blocks: Informer[Block]
    pools: Informer[Pool]

    @classmethod
    def make(cls, datastore: Datastore) -> ClusterInformers:
        out = cls(
            namespaces=Informer(datastore, NAMESPACE, parse_namespace),
            pods=Informer(datastore, POD, decode_pod),
            policies=Informer(datastore, NETWORK_POLICY, decode_policy),
            endpoints=Informer(datastore, WORKLOAD_ENDPOINT, WorkloadEndpoint.from_object),
            nodes=Informer(datastore, NODE, node_info),
            blocks=Informer(datastore, IPAM_BLOCK, Block.from_object),
            pools=Informer(datastore, IP_POOL, parse_pool),
        )
        out.endpoints.add_index("node", lambda w: [w.node])
        out.endpoints.add_index("address", lambda w: list(w.ips))
        out.blocks.add_index("node", lambda b: [b.node])
        return out

    def all(self) -> list[Informer[Any]]:
        return [self.namespaces, self.pods, self.policies, self.endpoints, self.nodes, self.blocks, self.pools]


def datastore_addresses(url: str) -> tuple[str, ...]:
    """The addresses of the datastore's host, which pods may not reach on its ports."""
    parts = urlsplit(url)
    if not parts.hostname or parts.scheme == "memory":
        return ()
    try:
        found = socket.getaddrinfo(parts.hostname, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return ()
    return tuple(sorted({str(info[4][0]) for info in found}))


def protected_ports(url: str) -> tuple[tuple[int, int], ...]:
    """The ports pods may not open on any node or on the datastore: etcd's client port (the
    URL's) and peer port, and the VXLAN port (a pod's frame to another node's tunnel would leave
    masqueraded, from a node's address). Tulle's agent listens on a unix socket only."""
    ports = {(socket.IPPROTO_UDP, VXLAN_PORT)}
    parts = urlsplit(url)
    if parts.scheme != "memory":
        ports |= {(socket.IPPROTO_TCP, parts.port or 2379), (socket.IPPROTO_TCP, 2380)}
    return tuple(sorted(ports))


def limit_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own malloc arena and never shrinks them; the
    agent's short-lived threads (one per CNI request, one per namespace visit) would grow RSS
    with every pod. Two arenas are plenty for a control plane."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-8, 2)  # M_ARENA_MAX
    except OSError:
        pass


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        if config.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}")
        # Before anything is read or served: the agent's own surfaces are root's alone.
        prepare_state_dir(config.state_dir)
        prepare_socket_dir(config.socket)
        self.config = config
        if config.insecure_datastore and config.datastore.startswith(("http:", "etcd+http:")):
            log.warning(insecure_warning(config.datastore), extra={"datastore": config.datastore})
        self.datastore = open_datastore(
            config.datastore,
            config.prefix,
            tls=config.datastore_tls,
            login=config.datastore_login,
            insecure=config.insecure_datastore,
        )
        self.registry = EndpointRegistry(config.state_dir)
        self.pending = PendingDeletes(config.state_dir)
        self.informers = ClusterInformers.make(self.datastore)
        self.allocator = NodeAllocator(self.datastore, config.node, lambda: self.ipam.pools)
        self.stop_event = threading.Event()
        self.pod_mtu = 1500
        self.controllers: list[Controller] = []
        self._server: ApiServer | None = None

    # -- wiring ---------------------------------------------------------------------------------

    def _build(self, underlay: host.Underlay) -> None:
        cfg, inf = self.config, self.informers
        resync = cfg.resync_interval
        self.underlay = underlay
        self.ipam = IpamController(
            self.datastore,
            cfg.node,
            self.allocator,
            self.registry,
            inf.pools,
            tunnel_families=lambda: (
                [] if cfg.mode == "host-gw" else [f for f in self.ipam.families() if underlay.address(f)]
            ),
            on_tunnels=self._tunnels_changed,
            resync=resync,
        )
        self.removed_nodes = RemovedNodeController(
            self.datastore, cfg.node, inf.nodes, inf.blocks, node_grace=cfg.node_grace, resync=resync
        )
        self.cni_failures = CniFailureLog(on_change=lambda: self.node.enqueue(FULL))
        self.node = NodeController(
            self.datastore,
            cfg.node,
            cfg.mode,
            underlay,
            self.vxlan_endpoints,
            inf.nodes,
            cfg.lease_ttl,
            resync,
            report=self._node_report,
        )
        local = LocalNode(name=cfg.node, mode=cfg.mode, underlay=underlay.addresses)
        verify = cfg.verify_interval
        self.routes = RoutesController(
            local, underlay, inf.nodes, inf.blocks, lambda: self.ipam.tunnels, resync=resync, verify=verify
        )
        self.policy = PolicyController(
            cfg.node,
            cfg.mode,
            self.registry,
            inf.namespaces,
            inf.pods,
            inf.policies,
            inf.endpoints,
            inf.pools,
            lambda: self.ipam.pools,
            resync=resync,
            verify=verify,
        )
        self.cni = CniService(
            CniContext(
                node=cfg.node,
                datastore=self.datastore,
                registry=self.registry,
                allocator=self.allocator,
                pending=self.pending,
                families=self.ipam.families,
                pod_mtu=lambda: self.pod_mtu,
                address_holders=lambda address: inf.endpoints.by_index("address", address),
                sync_policy=self._protect_new_pod,
                endpoints_changed=self._endpoint_changed,
                readiness_problems=lambda: self.status.readiness_problems(),
                remove_stray_interfaces=lambda: self.endpoints.remove_stray_interfaces(),
                failed=self.cni_failures.record,
            )
        )
        self.guard = GuardController(
            GuardConfig(
                underlay=underlay.ifname,
                control_plane=datastore_addresses(self.datastore.url),
                protected_ports=protected_ports(self.datastore.url),
                connection_limit=cfg.connection_limit,
                verify_sources=cfg.source_verification,
            ),
            self.registry,
            inf.pods,
            inf.nodes,
            resync=resync,
            verify=verify,
        )
        self.endpoints = EndpointController(
            self.datastore,
            cfg.node,
            self.registry,
            self.pending,
            self.cni,
            inf.endpoints,
            resync,
            verify,
            problems=self.guard.problems_of,
        )
        # A pod's annotation the guards cannot use is shown on its endpoint.
        inf.pods.add_handler(lambda _k, _o, _n: self.endpoints.enqueue(PUBLISH))
        self.status = AgentStatus(
            node=cfg.node,
            mode=cfg.mode,
            datastore=self.datastore,
            registry=self.registry,
            underlay=lambda: list(underlay.addresses),
            families=self.ipam.families,
            mtu=lambda: self.pod_mtu,
            problem_sources=[self.ipam.problems, self.node.problems],
            reconcilers=[self.routes, self.policy, self.guard],
            drops=lambda: self.policy.drops() + self.guard.drops(),
            last_reconcile=lambda: self.routes.last_full,
        )
        self.controllers = [
            self.ipam,
            self.node,
            self.removed_nodes,
            self.routes,
            self.policy,
            self.guard,
            self.endpoints,
        ]

    def _node_report(self) -> dict[str, str]:
        """What readers learn from our Node (`tulle describe node`, `get nodes -o wide`): the
        readiness problems that a Node write can carry (not an outage of the datastore it is
        written to, nor that the node is unregistered, which this very write ends) and the
        pods' last CNI failures."""
        outage = self.datastore.reachability.describe()
        own = self.node.problems()
        problems = [p for p in self.status.readiness_problems() if p != outage and p not in own]
        return report_annotations(self.underlay.ifname, problems, self.cni_failures.snapshot())

    def vxlan_endpoints(self) -> list[VxlanEndpoint]:
        return [
            VxlanEndpoint(family=f, mac=vxlan_mac(self.config.node, f), tunnel_address=a)
            for f, a in sorted(self.ipam.tunnels.items())
        ]

    def _tunnels_changed(self, _tunnels: dict[int, str]) -> None:
        self.node.enqueue(FULL)
        self.routes.enqueue(FULL)

    def _endpoint_changed(self, _handle: str) -> None:
        self.policy.inputs_changed()
        self.guard.endpoints_changed()
        self.endpoints.enqueue(PUBLISH)

    def _protect_new_pod(self) -> None:
        """Before an ADD answers: the pod's veth guarded and the pod isolated by its policies."""
        self.guard.sync_now()
        self.policy.sync_now()

    # -- start and stop --------------------------------------------------------------------

    def _until_done(self, what: str, step: Callable[[], None]) -> bool:
        """Run a start-up step until the datastore lets it finish (or the agent stops)."""
        delay = 0.2
        while not self.stop_event.is_set():
            try:
                step()
                return True
            except DatastoreError as exc:
                self.status.note_error(f"{what}: {exc}")
                log.warning("waiting for the datastore", extra={"step": what, "error": str(exc)})
                self.stop_event.wait(delay)
                delay = min(delay * 2, 5.0)
        return False

    def _wait_for_pools(self) -> None:
        while not self.stop_event.is_set():
            if self.informers.pools.synced and self.ipam.load_pools():
                return
            if self.informers.pools.synced:
                log.warning("no IPPool exists yet; create one (tulle apply -f pool.yaml)")
            self.stop_event.wait(1.0)

    def _recover(self) -> None:
        """Everything that must hold before the agent takes an ADD: endpoints rolled back or
        repaired, DELs that waited carried out, running pods' addresses in IPAM, the node's
        blocks, registration and heartbeat, and every endpoint published."""
        self.endpoints.recover(startup=True)
        self.pending.replay(self.cni.delete_now)
        self.ipam.reclaim()
        self.ipam.collect_leaks()
        self.endpoints.remove_stray_interfaces()
        self.ipam.claim_blocks()
        self.node.register()
        self.node.start_heartbeat(self.stop_event)
        self.endpoints.sync_published()

    def _first_reconcile(self) -> None:
        self.routes.sync_all()
        self.guard.sync(VERIFY)
        self.policy.sync(VERIFY)

    def start(self) -> None:
        cfg = self.config
        limit_malloc_arenas()
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        host.enable_forwarding()
        self._build(host.detect_underlay(cfg.interface))
        for informer in self.informers.all():
            informer.start()
        while not all(i.wait_synced(5) for i in self.informers.all()):
            if self.stop_event.is_set():
                return
            log.warning("waiting for the datastore", extra={"url": self.datastore.url})
        self._wait_for_pools()
        self.pod_mtu = cfg.mtu or pod_mtu(cfg.mode, self.underlay.mtu, self.ipam.families())
        log.info(
            "starting",
            extra={"node": cfg.node, "mode": cfg.mode, "families": self.ipam.families(), "mtu": self.pod_mtu},
        )
        if not self._until_done("recovering endpoints", self._recover):
            return
        self._until_done("first reconcile", self._first_reconcile)
        for controller in self.controllers:
            controller.start()
        threading.Thread(target=self.policy.cutter.run, args=(self.stop_event,), name="conntrack", daemon=True).start()
        self.endpoints.watch_pending(self.stop_event)
        self._server = serve(cfg.socket, self.dispatch)

    def stop(self) -> None:
        """Stop serving; leave every pod, route and rule in place for the next start."""
        self.stop_event.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        for controller in self.controllers:
            controller.stop()
        for informer in self.informers.all():
            informer.stop()

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("command") == "AGENT_STATUS":
            return {"result": self.status.describe()}
        return self.cni.handle(request)


def run_agent(config: AgentConfig) -> None:
    try:
        agent = Agent(config)
    except (UnsafePermissions, DatastoreError) as exc:
        # One line naming the path and its mode, or the credential file and what is wrong with
        # it (or a plain-HTTP datastore not accepted): the operator's to fix, not a traceback.
        log.error("cannot start", extra={"error": str(exc)})
        raise SystemExit(1) from None

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping", extra={"signal": signum})
        agent.stop_event.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except (IpamError, RuntimeError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        raise SystemExit(1) from None
    while not agent.stop_event.wait(1.0):
        pass
    agent.stop()


__all__ = ["Agent", "AgentConfig", "run_agent"]
