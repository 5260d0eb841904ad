"""The node agent: wiring, start-up recovery, the reconcile loop and the local API.

Start-up is built so that a restart changes nothing for running pods: endpoints are read back
from disk, their host side is checked and only what is missing is repaired, their addresses are
recorded in IPAM again and their WorkloadEndpoints published again before any new ADD is taken;
routes, neighbours, FDB entries and the nftables table are reconciled (diffed), never flushed.

The node's registration outlives the agent; only its heartbeat expires with it. So an agent that
is down, restarting or cut off from the datastore costs its node nothing: other nodes keep their
routes to it, its blocks stay its own, and a datastore that comes back after an outage changes
nothing in any kernel.
"""

from __future__ import annotations

import ctypes
import hashlib
import ipaddress
import json
import logging
import os
import signal
import socket
import socketserver
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pyroute2 import IPRoute

from tulle.agent.cache import ClusterCache, Snapshot
from tulle.agent.cni_service import TUNNEL_HANDLE_PREFIX, CniService, is_host_veth, wep_name, wep_object
from tulle.agent.endpoints import Endpoint, EndpointRegistry, handle_for
from tulle.agent.node import merge_registration, node_info, node_object
from tulle.cni.plugin import record_pending_del
from tulle.dataplane import podnet
from tulle.dataplane.nft import NftReconciler, NftTable
from tulle.dataplane.routing import (
    VxlanDevice,
    ensure_vxlan,
    reconcile_fdb,
    reconcile_neighbours,
    reconcile_routes,
    remove_vxlan,
)
from tulle.datastore.base import DatastoreError
from tulle.datastore.etcd import EtcdDatastore
from tulle.datastore.heartbeat import NodeHeartbeat
from tulle.ipam.allocator import IpamError, NodeAllocator, release_node_blocks
from tulle.ipam.pools import Pool, PoolError, check_no_overlap, parse_pool
from tulle.model.kinds import IP_POOL, NAMESPACE, NETWORK_POLICY, NODE, POD, WORKLOAD_ENDPOINT
from tulle.model.store import DEFAULT_PREFIX, Conflict, ResourceStore
from tulle.routing.compile import (
    MODES,
    BlockInfo,
    LocalNode,
    VxlanEndpoint,
    compile_routing,
    pod_mtu,
    vxlan_device,
    vxlan_mac,
)
from tulle.routing.nat import nat_table
from tulle.routing.untracked import tunnel_notrack_table

log = logging.getLogger("tulle.agent")


@dataclass
class AgentConfig:
    node: str
    datastore: str
    mode: str = "vxlan"
    prefix: str = DEFAULT_PREFIX
    state_dir: str = "/var/lib/tulle"
    socket: str = "/run/tulle/agent.sock"
    interface: str | None = None  # the underlay; default: the interface of the default route
    lease_ttl: int = 15  # the heartbeat's: how long a silent agent still counts as alive
    node_grace: float = 60.0  # how long a removed node's endpoints and blocks stay
    resync_interval: float = 30.0
    mtu: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Underlay:
    ifname: str
    addresses: tuple[str, ...]  # with prefix length
    mtu: int

    def address(self, family: int) -> str | None:
        for a in self.addresses:
            iface = ipaddress.ip_interface(a)
            if iface.version == family:
                return str(iface.ip)
        return None


def detect_underlay(ifname: str | None) -> Underlay:
    with IPRoute() as ipr:
        if ifname is None:
            for family in (socket.AF_INET, socket.AF_INET6):
                defaults = [r for r in ipr.get_routes(family=family, table=254) if r["dst_len"] == 0 and r.get("oif")]
                if defaults:
                    ifname = ipr.get_links(defaults[0].get("oif"))[0].get("ifname")
                    break
        if ifname is None:
            raise RuntimeError("cannot find the underlay interface: there is no default route; use --interface")
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            raise RuntimeError(f"underlay interface {ifname} does not exist")
        idx = found[0]
        link = ipr.get_links(idx)[0]
        addresses = []
        for a in ipr.get_addr(index=idx):
            if a["scope"] != 0:  # global scope only: no link-local
                continue
            addresses.append(f"{a.get('address')}/{a['prefixlen']}")
        return Underlay(ifname=ifname, addresses=tuple(sorted(addresses)), mtu=int(link.get("mtu")))


def limit_malloc_arenas() -> None:
    """glibc gives each thread that allocates its own malloc arena and never shrinks them; the
    agent's short-lived threads (one per CNI request, one per namespace visit) would grow RSS
    with every pod. Two arenas are plenty for a control plane."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-8, 2)  # M_ARENA_MAX
    except OSError:
        pass


def trim_memory() -> None:
    """Give freed heap back to the system (glibc keeps it otherwise)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def enable_forwarding() -> None:
    for path in ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding"):
        with open(path, "w") as f:
            f.write("1")


class _ApiHandler(socketserver.StreamRequestHandler):
    server: _ApiServer

    def handle(self) -> None:
        data = self.rfile.read()
        try:
            request = json.loads(data)
        except ValueError:
            answer: dict[str, Any] = {"error": {"code": 6, "msg": "the agent could not decode the request"}}
        else:
            answer = self.server.agent.dispatch(request)
        self.wfile.write(json.dumps(answer).encode())


class _ApiServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    # socketserver's default queue of 5 refuses a runtime's burst of parallel CNI calls with EAGAIN.
    request_queue_size = socket.SOMAXCONN
    agent: Agent


class Agent:
    def __init__(self, config: AgentConfig) -> None:
        if config.mode not in MODES:
            raise ValueError(f"--mode must be one of {', '.join(MODES)}")
        self.config = config
        self.datastore = EtcdDatastore(config.datastore)
        self.store = ResourceStore(self.datastore, config.prefix)
        self.registry = EndpointRegistry(config.state_dir)
        self.pools: list[Pool] = []
        self.allocator = NodeAllocator(self.datastore, config.prefix, config.node, lambda: self.pools)
        self.cni = CniService(self)
        self.nft = NftReconciler()
        self.cache = ClusterCache(self.datastore, config.prefix, self.request_reconcile)
        self.families: list[int] = []
        self.pod_mtu = 1500
        self.underlay: Underlay | None = None
        self.tunnels: dict[int, str] = {}
        self.heartbeat = NodeHeartbeat(self.datastore, config.prefix, config.node, config.lease_ttl)
        self.registered = False
        self._stop = threading.Event()
        self._wake = threading.Condition()
        self._requested = 0
        self._done = 0
        self._full_wanted = True
        self._gone_since: dict[str, float] = {}
        self._last_error = ""
        self._last_reconcile = 0.0
        self._policy_digest = ""
        self._policy_model: Any = None
        self._pending_cut: tuple[Any, list[str]] | None = None
        self._cut_wanted: tuple[Any, list[str]] | None = None
        self._ipam_errors: list[str] = []
        self._address_conflicts: list[str] = []
        self._noted_error: tuple[float, str] = (0.0, "")
        self._server: _ApiServer | None = None
        self._nft_lock = threading.Lock()
        self._policy_pass_started = 0.0
        self._applied_routing: Any = None
        self._policy_warnings: list[Any] = []
        self._policy_addresses: dict[str, str] = {}

    # -- start-up ---------------------------------------------------------------------------

    def _wait_for_datastore(self) -> None:
        delay = 0.2
        while not self._stop.is_set():
            try:
                self.datastore.revision()
                return
            except DatastoreError as exc:
                log.warning("waiting for the datastore", extra={"error": str(exc)})
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)

    def load_pools(self) -> list[Pool]:
        objects, _ = self.store.list(IP_POOL)
        pools = []
        for obj in objects:
            try:
                pools.append(parse_pool(obj))
            except PoolError as exc:
                log.error("ignoring an invalid IPPool", extra={"error": str(exc)})
        check_no_overlap(pools)
        return pools

    def _wait_for_pools(self) -> None:
        while not self._stop.is_set():
            self.pools = self.load_pools()
            if self.pools:
                return
            log.warning("no IPPool exists yet; create one (tulle apply -f pool.yaml)")
            self._stop.wait(1.0)

    def _recover_endpoints(self, startup: bool) -> None:
        """Forget endpoints whose pod is gone and repair the rest; at start-up also roll back ADDs
        that an earlier agent left half-done (later, an endpoint being added is an ADD in flight)."""
        ready = []
        for ep in self.registry.all():
            if ep.state == "ready":
                ready.append(ep)
            elif startup:
                log.info("rolling back a half-done ADD", extra={"pod": f"{ep.namespace}/{ep.pod}"})
                self.cni.teardown_or_defer(ep)
        changed = podnet.repair_host_sides([(self.cni._pod_interface(ep), ep.mac) for ep in ready])
        for ep in ready:
            what = changed.get(ep.host_ifname)
            if not what:
                continue
            if what == ["host interface missing"]:
                with self.cni.lock(ep.handle):
                    current = self.registry.get(ep.network, ep.container_id, ep.ifname)
                    if current is not None and current.state == "ready" and not podnet.host_side_exists(ep.host_ifname):
                        log.info(
                            "removing an endpoint whose pod is gone",
                            extra={"pod": f"{ep.namespace}/{ep.pod}"},
                        )
                        self.cni.teardown_or_defer(current)
                continue
            log.info("repaired a pod's host side", extra={"pod": f"{ep.namespace}/{ep.pod}", "changed": what})

    def pending_dir(self) -> str:
        return os.path.join(self.config.state_dir, "pending-del")

    def defer_delete(self, request: dict[str, Any]) -> None:
        record_pending_del(self.config.state_dir, request)

    def replay_pending_deletes(self) -> int:
        """Carry out DELs that arrived while the agent (or the datastore) was away."""
        folder = self.pending_dir()
        try:
            names = sorted(n for n in os.listdir(folder) if n.endswith(".json"))
        except FileNotFoundError:
            return 0
        done = 0
        for name in names:
            path = os.path.join(folder, name)
            try:
                with open(path) as f:
                    request = json.load(f)
                self.cni.delete_now(request)
            except DatastoreError:
                break  # still away: the rest would only wait for the same timeout
            except (OSError, ValueError, KeyError) as exc:
                log.error("dropping an unreadable pending DEL", extra={"file": path, "error": str(exc)})
            os.unlink(path)
            done += 1
        if done:
            log.info("carried out pending DELs", extra={"count": done})
        return done

    def reclaim_addresses(self) -> None:
        """Every ready endpoint's addresses recorded as its own in IPAM: a restart (or an
        outage in which its node was wrongly thought gone) must never let an address be given
        twice. A conflict is an error in the log and in the status, never taken over."""
        holdings = [
            (ep.handle, ep.addresses(), {"pod": f"{ep.namespace}/{ep.pod}", "node": self.config.node})
            for ep in self.registry.all()
            if ep.state == "ready"
        ]
        recorded, conflicts = self.allocator.reclaim(holdings)
        if recorded:
            log.warning("recorded running pods' addresses in IPAM again", extra={"addresses": recorded})
        for conflict in conflicts:
            if conflict not in self._address_conflicts:
                log.error("an address of a running pod is claimed twice", extra={"error": conflict})
        self._address_conflicts = conflicts

    def sync_endpoints(self, snap: Snapshot) -> None:
        """Our WorkloadEndpoints in the datastore are exactly our ready endpoints: publish what
        is missing or differs (after a restart, or deleted behind our back), delete what no
        endpoint of ours has. The registry is read after the snapshot, and each change is made
        under the endpoint's lock after looking again, so an ADD or DEL in flight is not undone."""
        node = self.config.node
        published = {}
        for obj in snap.objects(self.config.prefix, WORKLOAD_ENDPOINT):
            if obj.get("spec", {}).get("node") == node:
                published[(obj["metadata"].get("namespace"), obj["metadata"]["name"])] = obj
        endpoints = {}
        for ep in self.registry.all():
            if ep.state == "ready":
                want = wep_object(ep, node)
                endpoints[(want["metadata"]["namespace"], want["metadata"]["name"])] = (ep, want)
        for key, (ep, want) in endpoints.items():
            have = published.get(key)
            if have is not None and have.get("spec") == want["spec"]:
                continue
            with self.cni.lock(ep.handle):
                current = self.registry.get(ep.network, ep.container_id, ep.ifname)
                if current is not None and current.state == "ready":
                    log.info("publishing an endpoint again", extra={"pod": f"{ep.namespace}/{ep.pod}"})
                    self.cni.publish(current)
        for key, obj in published.items():
            if key in endpoints:
                continue
            spec = obj.get("spec", {})
            handle = handle_for(str(spec.get("network")), str(spec.get("containerID")), str(spec.get("ifname")))
            with self.cni.lock(handle):
                if any(wep_name(ep.pod, ep.handle) == key[1] for ep in self.registry.all() if ep.state == "ready"):
                    continue
                log.info("deleting an endpoint no pod of this node has", extra={"endpoint": f"{key[0]}/{key[1]}"})
                self.store.delete(WORKLOAD_ENDPOINT, key[1], key[0])

    def _collect_leaked_addresses(self) -> None:
        known = {ep.handle for ep in self.registry.all()}
        released = self.allocator.release_unless(lambda h: h in known or h.startswith(TUNNEL_HANDLE_PREFIX))
        if released:
            log.info("released leaked addresses", extra={"handles": sorted(released)})

    def remove_stray_interfaces(self) -> int:
        known = {ep.host_ifname for ep in self.registry.all()}
        removed = 0
        with IPRoute() as ipr:
            for link in ipr.get_links():
                name = link.get("ifname")
                if is_host_veth(name) and name not in known:
                    ipr.link("del", index=link["index"])
                    removed += 1
        return removed

    def _claim_blocks(self) -> None:
        """A block per family and the tunnel addresses; a full pool is reported, not fatal: the
        node stays up, STATUS says why it is not ready, and it tries again on every resync."""
        errors = []
        for family in self.families:
            try:
                self.allocator.ensure_block(family)
            except IpamError as exc:
                errors.append(str(exc))
                log.error("cannot claim a block", extra={"error": str(exc)})
        if not errors:
            try:
                self._setup_tunnels()
            except IpamError as exc:
                errors.append(str(exc))
        self._ipam_errors = errors

    def _setup_tunnels(self) -> None:
        assert self.underlay is not None
        self.tunnels = {}
        if self.config.mode == "host-gw":
            for family in (4, 6):
                remove_vxlan(vxlan_device(family))
            return
        for family in self.families:
            if self.underlay.address(family) is None:
                log.warning("no underlay address for VXLAN", extra={"family": family})
                continue
            handle = f"{TUNNEL_HANDLE_PREFIX}{self.config.node}/v{family}"
            (address,) = self.allocator.allocate(handle, [family], {"node": self.config.node})
            self.tunnels[family] = str(address)

    def vxlan_endpoints(self) -> list[VxlanEndpoint]:
        return [
            VxlanEndpoint(family=f, mac=vxlan_mac(self.config.node, f), tunnel_address=a)
            for f, a in self.tunnels.items()
        ]

    def register_node(self) -> None:
        """Our Node object as routing needs it, written only where it differs (compare-and-swap,
        keeping what others set on it): a restart that changes nothing writes nothing."""
        assert self.underlay is not None
        addresses = [str(ipaddress.ip_interface(a).ip) for a in self.underlay.addresses]
        wanted = node_object(self.config.node, self.config.mode, addresses, self.vxlan_endpoints())
        for _attempt in range(10):
            current = self.store.get(NODE, self.config.node)
            if current is None:
                if self.store.create(wanted) is None:
                    continue
                log.info("registered node", extra={"node": self.config.node, "addresses": addresses})
            else:
                merged = merge_registration(current, wanted)
                if merged != current:
                    try:
                        self.store.update(merged)
                    except Conflict:
                        continue
                    log.info("updated the node's registration", extra={"addresses": addresses})
            self.registered = True
            return
        raise DatastoreError(f"Node {self.config.node} keeps changing; will register on the next pass")

    def _note_error(self, message: str) -> None:
        self._noted_error = (time.time(), message)

    def _until_done(self, what: str, step: Callable[[], None]) -> bool:
        """Run a start-up step until the datastore lets it finish (or the agent stops)."""
        delay = 0.2
        while not self._stop.is_set():
            try:
                step()
                return True
            except DatastoreError as exc:
                self._note_error(f"{what}: {exc}")
                log.warning("waiting for the datastore", extra={"step": what, "error": str(exc)})
                self._stop.wait(delay)
                delay = min(delay * 2, 5.0)
        return False

    def _recover(self) -> None:
        """Everything that must hold before the agent takes an ADD: endpoints rolled back or
        repaired, DELs that waited carried out, running pods' addresses in IPAM, the node's
        blocks, registration and heartbeat, and every endpoint published."""
        self._recover_endpoints(startup=True)
        self.replay_pending_deletes()
        self.reclaim_addresses()
        self._collect_leaked_addresses()
        self.remove_stray_interfaces()
        self._claim_blocks()
        self.register_node()
        self.heartbeat.start()
        self.sync_endpoints(self.cache.snapshot())

    def start(self) -> None:
        cfg = self.config
        limit_malloc_arenas()
        os.makedirs(cfg.state_dir, mode=0o700, exist_ok=True)
        enable_forwarding()
        self.underlay = detect_underlay(cfg.interface)
        self._wait_for_datastore()
        self._wait_for_pools()
        self.families = sorted({p.family for p in self.pools})
        self.pod_mtu = cfg.mtu or pod_mtu(cfg.mode, self.underlay.mtu, self.families)
        log.info(
            "starting",
            extra={"node": cfg.node, "mode": cfg.mode, "families": self.families, "mtu": self.pod_mtu},
        )
        self.cache.start()
        self.cache.wait_synced(30)
        if not self._until_done("recovering endpoints", self._recover):
            return
        threading.Thread(
            target=self.heartbeat.keep_alive, args=(self._stop.wait,), name="heartbeat", daemon=True
        ).start()
        self._until_done("first reconcile", lambda: self.reconcile(full=True))
        threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True).start()
        threading.Thread(target=self._cut_loop, name="conntrack", daemon=True).start()
        self._serve()

    def _serve(self) -> None:
        path = self.config.socket
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        server = _ApiServer(path, _ApiHandler)
        os.chmod(path, 0o600)
        server.agent = self
        self._server = server
        threading.Thread(target=server.serve_forever, name="api", daemon=True).start()
        log.info("ready", extra={"socket": path})

    def stop(self) -> None:
        """Stop serving; leave every pod, route and rule in place for the next start."""
        self._stop.set()
        with self._wake:
            self._wake.notify_all()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        self.cache.stop()

    # -- the local API ----------------------------------------------------------------------

    def dispatch(self, request: dict[str, Any]) -> dict[str, Any]:
        if request.get("command") == "AGENT_STATUS":
            return {"result": self.describe()}
        return self.cni.handle(request)

    def readiness_problems(self) -> list[str]:
        """Why the agent is not ready, from what it knows already: a status report never waits
        on the datastore, which may be the thing that is down."""
        problems = []
        outage = self.datastore.reachability.describe()
        if outage:
            problems.append(outage)
        if not self.pools:
            problems.append("no IPPool is configured")
        if not self.registered:
            problems.append("the node is not registered")
        problems.extend(self._ipam_errors)
        problems.extend(self._address_conflicts)
        if self._last_error:
            problems.append(f"last reconcile failed: {self._last_error}")
        return problems

    def last_error(self) -> str:
        """The newest error the agent met, with its time ('' if none yet)."""
        reach = self.datastore.reachability
        noted = self._noted_error
        when, message = (reach.since, reach.error) if not reach.reachable and reach.since >= noted[0] else noted
        if not message:
            return ""
        return f"{time.strftime('%H:%M:%S', time.localtime(when))} {message}"

    def describe(self) -> dict[str, Any]:
        endpoints = [
            {"pod": f"{ep.namespace}/{ep.pod}", "ips": ep.ips, "interface": ep.host_ifname, "state": ep.state}
            for ep in self.registry.all()
        ]
        drops = []
        if self._policy_model is not None:
            try:
                from tulle.policy.datapath import drop_counters

                names = drop_counters(self._policy_model, self.local_ips())
                counters = self.nft.counters()
                for counter, (pod, direction) in sorted(names.items()):
                    packets, _bytes = counters.get(counter, (0, 0))
                    family = 6 if "_v6_" in counter else 4
                    drops.append({"pod": pod, "direction": direction, "family": family, "packets": packets})
            except Exception as exc:  # status must answer even if policy is broken
                drops.append({"error": str(exc)})
        problems = self.readiness_problems()
        return {
            "node": self.config.node,
            "mode": self.config.mode,
            "families": self.families,
            "mtu": self.pod_mtu,
            "underlay": list(self.underlay.addresses) if self.underlay else [],
            "endpoints": endpoints,
            "drops": drops,
            "lastReconcile": self._last_reconcile,
            "lastError": self.last_error(),
            "problems": problems,
            "ready": not problems,
        }

    # -- reconciling ------------------------------------------------------------------------

    def request_reconcile(self, policy_only: bool = False) -> int:
        """Ask the loop for a pass; several requests before it runs make one pass."""
        with self._wake:
            self._requested += 1
            if not policy_only:
                self._full_wanted = True
            self._wake.notify_all()
            return self._requested

    def sync_policy(self) -> None:
        """Bring the nftables table up to date now, in the caller's thread.

        An ADD calls this, so a new pod is isolated by its policies before the runtime starts
        its containers. Cheap (only the table); callers queued on the lock share one pass: a
        pass that started after a caller arrived covers it."""
        arrived = time.monotonic()
        with self._nft_lock:
            if self._policy_pass_started > arrived:
                return
            self._apply_nft_locked(self.cache.snapshot())

    def sync_dataplane(self, timeout: float) -> bool:
        """Ask for a full reconcile and wait until one that started after this call has finished."""
        wanted = self.request_reconcile()
        deadline = time.monotonic() + timeout
        with self._wake:
            while self._done < wanted and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._wake.wait(left)
        return True

    def _reconcile_loop(self) -> None:
        last_full = time.monotonic()
        while not self._stop.is_set():
            with self._wake:
                if self._requested <= self._done:
                    wait = self.config.resync_interval - (time.monotonic() - last_full)
                    if self._gone_since:  # wake when a gone node's grace period ends
                        ends = min(self._gone_since.values()) + self.config.node_grace - time.monotonic()
                        wait = min(wait, ends + 0.05)
                    self._wake.wait(timeout=max(0.1, wait))
                target = self._requested
                full_wanted, self._full_wanted = self._full_wanted, False
            if self._stop.is_set():
                return
            full = time.monotonic() - last_full >= self.config.resync_interval
            try:
                if full or full_wanted or target == self._done:
                    self.reconcile(full=full)
                else:
                    self.reconcile_policy()
                self._last_error = ""
            except Exception as exc:
                self._last_error = str(exc)
                self._note_error(f"reconcile failed: {exc}")
                log.exception("reconcile failed")
                self._stop.wait(0.5)
            if full:
                last_full = time.monotonic()
                trim_memory()
            with self._wake:
                self._done = max(self._done, target)
                self._wake.notify_all()

    def local_ips(self) -> list[str]:
        return [a.split("/")[0] for ep in self.registry.all() if ep.state == "ready" for a in ep.ips]

    def reconcile(self, full: bool = False) -> None:
        """Make the kernel match the cluster: routes, VXLAN, nftables; free gone nodes' blocks."""
        assert self.underlay is not None
        snap = self.cache.snapshot()
        started = time.monotonic()
        self.replay_pending_deletes()  # cheap when there are none; soon after an outage ends
        if full:
            self.pools = self.load_pools() or self.pools
            self._recover_endpoints(startup=False)
            self.reclaim_addresses()
            self.sync_endpoints(snap)
            if self._ipam_errors:
                had_tunnels = dict(self.tunnels)
                self._claim_blocks()
                if self.tunnels != had_tunnels:
                    self.register_node()
        nodes = [n for n in (node_info(o) for o in snap.objects(self.config.prefix, NODE)) if n is not None]
        if self.registered and not any(n.name == self.config.node for n in nodes) and snap.revision > 0:
            log.warning("our Node object is gone from the datastore; registering again")
            self.register_node()
        blocks = [BlockInfo(cidr=b["cidr"], node=b["node"]) for b in snap.blocks(self.config.prefix)]
        local = LocalNode(name=self.config.node, mode=self.config.mode, underlay=self.underlay.addresses)
        desired = compile_routing(local, nodes, blocks)
        route_change = None
        # An event-driven pass touches the kernel only if what we want changed; the periodic
        # (full) pass compares with the kernel itself and repairs drift.
        if full or desired != self._applied_routing:
            devices = []
            for family, tunnel in self.tunnels.items():
                underlay_address = self.underlay.address(family)
                assert underlay_address is not None
                dev = VxlanDevice(
                    name=vxlan_device(family),
                    family=family,
                    local=underlay_address,
                    underlay_ifname=self.underlay.ifname,
                    mac=vxlan_mac(self.config.node, family),
                    mtu=self.underlay.mtu - (50 if family == 4 else 70),
                    tunnel_address=tunnel,
                )
                ensure_vxlan(dev)
                devices.append(dev.name)
            self._applied_routing = None
            route_change = reconcile_routes(desired.routes)
            reconcile_neighbours(desired.neighbours, devices)
            reconcile_fdb(desired.fdb, devices)
            self._applied_routing = desired
        commands = self._apply_nft(snap, verify=full)
        self._collect_gone_nodes(snap, {n.name for n in nodes})
        self._last_reconcile = time.time()
        if route_change or commands:
            log.info(
                "reconciled",
                extra={
                    "routes_added": len(route_change.add) if route_change else 0,
                    "routes_removed": len(route_change.remove) if route_change else 0,
                    "nft_commands": len(commands),
                    "seconds": round(time.monotonic() - started, 3),
                },
            )
        for reason in desired.unreachable:
            log.warning("no route", extra={"reason": reason})

    def _apply_nft(self, snap: Snapshot, verify: bool = False) -> list[dict[str, Any]]:
        with self._nft_lock:
            return self._apply_nft_locked(snap, verify)

    def _apply_nft_locked(self, snap: Snapshot, verify: bool = False) -> list[dict[str, Any]]:
        self._policy_pass_started = time.monotonic()
        table = nat_table(self.pools).merge(self._policy_table(snap))
        if self.config.mode != "host-gw":
            table = table.merge(tunnel_notrack_table())
        commands = self.nft.apply(table, verify=verify)
        self.cut_denied()
        return commands

    def reconcile_policy(self) -> None:
        """The cheap pass: only the nftables table (policy for new or changed endpoints)."""
        self._apply_nft(self.cache.snapshot())

    def _policy_table(self, snap: Snapshot) -> NftTable:
        """The NetworkPolicy part of the table (and cutting connections a change denies)."""
        try:
            from tulle.policy.compiler import compile_policies
            from tulle.policy.datapath import policy_table
            from tulle.policy.inputs import inputs_from_objects
        except ImportError:
            return NftTable()
        prefix = self.config.prefix
        objects = (
            snap.objects(prefix, NAMESPACE),
            snap.objects(prefix, POD),
            snap.objects(prefix, NETWORK_POLICY),
            self._endpoint_objects(snap),
        )
        inputs = inputs_from_objects(*objects)
        model = compile_policies(inputs, self._policy_model)
        warnings = list(model.warnings)
        if warnings != self._policy_warnings:
            for warning in warnings:
                log.warning("ignoring part of a resource", extra={"reason": str(warning)})
            self._policy_warnings = warnings
        local = self.local_ips()
        table = policy_table(model, local)
        # Connections can only become denied when policies, labels or named ports change, or
        # when an address moves to another pod; a new pod alone denies nothing that exists.
        rules = (
            objects[0],
            [(o.get("metadata", {}).get("labels"), o.get("spec")) for o in objects[1]],
            objects[2],
        )
        digest = hashlib.sha256(json.dumps(rules, sort_keys=True, default=str).encode()).hexdigest()
        addresses = {
            ip: f"{o['metadata'].get('namespace')}/{o.get('spec', {}).get('pod')}"
            for o in objects[3]
            for ip in o.get("spec", {}).get("ips", [])
        }
        moved = any(addresses.get(ip) != owner for ip, owner in self._policy_addresses.items())
        self._policy_addresses = addresses
        changed = digest != self._policy_digest or moved
        self._policy_model = model
        self._policy_digest = digest
        if changed:
            self._pending_cut = (model, local)
        return table

    def _endpoint_objects(self, snap: Snapshot) -> list[dict[str, Any]]:
        """All WorkloadEndpoints: the datastore's, with this node's taken from our own registry,
        which knows a new pod before the watch brings its endpoint back."""
        local = {}
        for ep in self.registry.all():
            if ep.state == "ready":
                obj = wep_object(ep, self.config.node)
                local[(obj["metadata"]["namespace"], obj["metadata"]["name"])] = obj
        out = list(local.values())
        for obj in snap.objects(self.config.prefix, WORKLOAD_ENDPOINT):
            meta = obj.get("metadata", {})
            if obj.get("spec", {}).get("node") == self.config.node:
                continue  # ours come from the registry (a deleted one must not linger)
            if (meta.get("namespace"), meta.get("name")) not in local:
                out.append(obj)
        return out

    def cut_denied(self) -> None:
        """Hand the latest policy change to the cutter thread (the newest model wins)."""
        with self._wake:
            if self._pending_cut is not None:
                self._cut_wanted = self._pending_cut
                self._pending_cut = None
                self._wake.notify_all()

    def _cut_loop(self) -> None:
        """Cut established connections a policy change denies, after the new rules are in place,
        in a thread of its own: a table of thousands of entries never delays enforcement."""
        from tulle.dataplane.conntrack import cut_denied_connections

        while not self._stop.is_set():
            with self._wake:
                while self._cut_wanted is None and not self._stop.is_set():
                    self._wake.wait(1.0)
                wanted, self._cut_wanted = self._cut_wanted, None
            if wanted is None:
                continue
            try:
                cut = cut_denied_connections(*wanted)
                if cut:
                    log.info("cut connections a policy change denies", extra={"count": cut})
            except Exception as exc:
                log.error("cannot cut denied connections", extra={"error": str(exc)})

    def _collect_gone_nodes(self, snap: Snapshot, registered: set[str]) -> None:
        """Forget nodes that were removed (their Node object deleted) a grace period ago. A node
        whose agent is merely silent keeps its Node object, and so its blocks and endpoints."""
        owners = {b["node"] for b in snap.blocks(self.config.prefix)}
        now = time.monotonic()
        for owner in owners:
            if owner == self.config.node or owner in registered:
                self._gone_since.pop(owner, None)
                continue
            since = self._gone_since.setdefault(owner, now)
            if now - since < self.config.node_grace:
                continue
            self._forget_node(owner)
            self._gone_since.pop(owner, None)

    def _forget_node(self, node: str) -> None:
        """A removed node's endpoints go (its pods went with it), then its blocks, each only if
        no endpoint in the datastore holds an address in it; read afresh, not from the cache."""
        if self.store.get(NODE, node) is not None:
            return  # it came back
        endpoints, _ = self.store.list(WORKLOAD_ENDPOINT)
        for wep in endpoints:
            if wep.get("spec", {}).get("node") == node:
                meta = wep["metadata"]
                self.store.delete(WORKLOAD_ENDPOINT, meta["name"], meta.get("namespace"))
        endpoints, _ = self.store.list(WORKLOAD_ENDPOINT)
        held = {ip for wep in endpoints for ip in wep.get("spec", {}).get("ips", [])}
        freed = release_node_blocks(self.datastore, self.config.prefix, node, held.__contains__)
        if freed:
            log.info("freed the blocks of a removed node", extra={"node": node, "blocks": freed})


def run_agent(config: AgentConfig) -> None:
    agent = Agent(config)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping", extra={"signal": signum})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except (IpamError, RuntimeError) as exc:
        log.error("cannot start", extra={"error": str(exc)})
        raise SystemExit(1)
    stop.wait()
    agent.stop()


__all__ = ["Agent", "AgentConfig", "Endpoint", "run_agent", "wep_name"]
