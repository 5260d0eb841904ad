"""The agent's side of the CNI commands: ADD, DEL, CHECK, GC and STATUS (spec 1.1.0).

The plugin binary has already checked the environment and the configuration; here the work
is done: addresses from IPAM, the veth into the pod, the endpoint record on disk and in the
datastore. ADD is all or nothing, and a failed ADD leaves nothing behind (what the datastore
could not take back is recorded as a pending DEL); DEL is idempotent and never fails for lack
of state. No address a live endpoint holds is ever given to another pod.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from tulle.agent.endpoints import Endpoint, handle_for, host_ifname_for
from tulle.cni import spec
from tulle.cni.spec import CniError
from tulle.dataplane import podnet
from tulle.dataplane.netns import NetnsGone
from tulle.datastore.base import DatastoreError
from tulle.ipam.allocator import IpamError
from tulle.model.kinds import WORKLOAD_ENDPOINT

if TYPE_CHECKING:
    from tulle.agent.daemon import Agent

log = logging.getLogger(__name__)

TUNNEL_HANDLE_PREFIX = "tulle-tunnel/"
_HOST_VETH = re.compile(r"^tl[0-9a-f]{11}$")


class Stopwatch:
    """Milliseconds per step, for the log line of a command."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round((now - self._last) * 1000, 1)
        self._last = now


def wep_name(pod: str, handle: str) -> str:
    return f"{pod}.{hashlib.sha256(handle.encode()).hexdigest()[:8]}"


def wep_object(ep: Endpoint, node: str) -> dict[str, Any]:
    return {
        "apiVersion": WORKLOAD_ENDPOINT.api_version,
        "kind": WORKLOAD_ENDPOINT.kind,
        "metadata": {"name": wep_name(ep.pod, ep.handle), "namespace": ep.namespace},
        "spec": {
            "node": node,
            "pod": ep.pod,
            "containerID": ep.container_id,
            "ifname": ep.ifname,
            "network": ep.network,
            "ips": [a.split("/")[0] for a in ep.ips],
            "hostInterface": ep.host_ifname,
            "mac": ep.mac,
        },
    }


def deferred_del(ep: Endpoint) -> dict[str, Any]:
    """The DEL request that gives back what `ep` holds in the datastore, to be replayed later."""
    return {
        "command": "DEL",
        "containerID": ep.container_id,
        "ifname": ep.ifname,
        "netns": ep.netns,
        "args": {"K8S_POD_NAMESPACE": ep.namespace, "K8S_POD_NAME": ep.pod},
        "config": {"name": ep.network},
    }


def pod_identity(request: dict[str, Any]) -> tuple[str, str]:
    """(namespace, pod) from CNI_ARGS; namespace `default` when absent, as podman sends it."""
    args = request.get("args") or {}
    namespace = args.get("K8S_POD_NAMESPACE") or "default"
    pod = args.get("K8S_POD_NAME") or request["containerID"][:63]
    return namespace, pod


def build_result(ep: Endpoint) -> dict[str, Any]:
    """The ADD result in the 1.1.0 form; the plugin converts it to the version asked for."""
    ips = []
    routes = []
    for address in ep.ips:
        v6 = ":" in address
        gateway = podnet.GATEWAY_V6 if v6 else podnet.GATEWAY_V4
        ips.append({"address": address, "gateway": gateway, "interface": 1})
        routes.append({"dst": "::/0" if v6 else "0.0.0.0/0", "gw": gateway})
    return {
        "cniVersion": spec.SPEC_VERSION,
        # The host side is listed (without sandbox) so chained plugins such as bandwidth find it.
        "interfaces": [
            {"name": ep.host_ifname, "mac": ep.host_mac or podnet.HOST_MAC, "mtu": ep.mtu},
            {"name": ep.ifname, "mac": ep.mac, "sandbox": ep.netns, "mtu": ep.mtu},
        ],
        "ips": ips,
        "routes": routes,
        "dns": {},
    }


class CniService:
    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def lock(self, handle: str) -> threading.Lock:
        # The runtime never runs two commands for one attachment at once (spec: "must not invoke
        # parallel operations for the same container"), but GC and pending DELs may.
        with self._locks_guard:
            return self._locks[handle]

    # -- dispatch ---------------------------------------------------------------------------

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        command = request.get("command")
        handlers = {
            "ADD": self.add,
            "DEL": self.delete,
            "CHECK": self.check,
            "GC": self.gc,
            "STATUS": self.status,
        }
        handler = handlers.get(str(command))
        try:
            if handler is None:
                raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"the agent does not know the command {command!r}")
            return {"result": handler(request)}
        except CniError as exc:
            return {"error": exc.to_dict()}
        except DatastoreError as exc:
            return {"error": CniError(spec.ERR_TRY_AGAIN_LATER, "the datastore is not reachable", str(exc)).to_dict()}
        except Exception as exc:
            log.exception("CNI command failed", extra={"command": command})
            return {"error": CniError(spec.ERR_INTERNAL, f"the tulle agent failed: {exc}").to_dict()}

    # -- ADD --------------------------------------------------------------------------------

    def add(self, request: dict[str, Any]) -> dict[str, Any]:
        agent = self.agent
        network = request["config"]["name"]
        container_id, ifname, netns = request["containerID"], request["ifname"], request["netns"]
        handle = handle_for(network, container_id, ifname)
        if not os.path.exists(netns):
            raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"CNI_NETNS {netns} does not exist")
        namespace, pod = pod_identity(request)
        with self.lock(handle):
            existing = agent.registry.get(network, container_id, ifname)
            intact = existing is not None and existing.state == "ready" and existing.netns == netns
            if existing is not None and intact and not podnet.check(self._pod_interface(existing), []):
                return build_result(existing)  # a repeated ADD: answer as before
            if existing is not None:
                self._teardown(existing)
            ep = Endpoint(
                network=network,
                container_id=container_id,
                ifname=ifname,
                netns=netns,
                namespace=namespace,
                pod=pod,
                host_ifname=host_ifname_for(network, container_id, ifname),
                mtu=int(request["config"].get("mtu") or agent.pod_mtu),
            )
            steps = Stopwatch()
            agent.registry.put(ep)  # state "adding": rolled back on start if we die half-way
            conflicts: list[str] = []
            try:
                attrs = {"pod": f"{namespace}/{pod}", "node": agent.config.node}
                ips = agent.allocator.allocate(handle, agent.families, attrs, self._held_by_other(handle, conflicts))
                if conflicts:
                    self._refuse_for_conflicts(f"{namespace}/{pod}", conflicts)
                steps.lap("ipam")
                ep.ips = [f"{ip}/{ip.max_prefixlen}" for ip in ips]
                ep.mac = podnet.create(self._pod_interface(ep))
                steps.lap("interface")
                ep.host_mac = podnet.HOST_MAC
                ep.state = "ready"
                agent.registry.put(ep)
                self.publish(ep)
                steps.lap("publish")
            except BaseException as exc:
                self.teardown_or_defer(ep)
                if isinstance(exc, IpamError):
                    raise CniError(spec.ERR_IPAM_EXHAUSTED, str(exc))
                if isinstance(exc, NetnsGone):
                    raise CniError(spec.ERR_INVALID_ENVIRONMENT, str(exc))
                if isinstance(exc, podnet.PodNetError):
                    raise CniError(spec.ERR_IO_FAILURE, str(exc))
                raise
        # Policy for the new pod is in place before the runtime starts its containers.
        agent.sync_policy()
        steps.lap("dataplane")
        log.info(
            "pod added",
            extra={"pod": f"{namespace}/{pod}", "ips": ep.ips, "iface": ep.host_ifname, "ms": steps.laps},
        )
        return build_result(ep)

    def _pod_interface(self, ep: Endpoint) -> podnet.PodInterface:
        return podnet.PodInterface(
            netns=ep.netns, ifname=ep.ifname, host_ifname=ep.host_ifname, addresses=tuple(ep.ips), mtu=ep.mtu
        )

    def _held_by_other(self, handle: str, conflicts: list[str]) -> Callable[[str], bool]:
        """For IPAM: whether an endpoint other than `handle` holds an address (this node's
        registry, or any node's WorkloadEndpoint), noting each such address in `conflicts`."""
        agent = self.agent

        def held(address: str) -> bool:
            for ep in agent.registry.all():
                if ep.handle != handle and address in ep.addresses():
                    conflicts.append(f"{address} is held by pod {ep.namespace}/{ep.pod} on this node")
                    agent.allocator.reclaim(
                        [(ep.handle, ep.addresses(), {"pod": f"{ep.namespace}/{ep.pod}", "node": agent.config.node})]
                    )
                    return True
            for holder in agent.cache.address_holders(address):
                # This node's endpoints are judged by its registry above: the cache may still
                # hold one that a DEL has just deleted, which must not stop the next ADD.
                if holder.handle != handle and holder.node != agent.config.node:
                    conflicts.append(f"{address} is held by {holder.description}")
                    agent.allocator.reclaim([(holder.handle, [address], {"pod": f"{holder.namespace}/{holder.pod}"})])
                    return True
            return False

        return held

    def _refuse_for_conflicts(self, pod: str, conflicts: list[str]) -> None:
        """IPAM offered an address that a live endpoint holds: its records had lost the holder.
        They are repaired now (`_held_by_other` recorded the holder again); this ADD is refused
        loudly rather than quietly given another address, so the fault is seen, and the runtime's
        retry gets a clean allocation."""
        log.error("IPAM offered an address a live pod holds", extra={"pod": pod, "conflicts": conflicts})
        raise CniError(
            spec.ERR_TRY_AGAIN_LATER,
            f"IPAM offered {pod} an address that another pod holds; its record is repaired: try again",
            "; ".join(conflicts),
        )

    def publish(self, ep: Endpoint) -> None:
        """The WorkloadEndpoint: tells every node which pod has which addresses."""
        self.agent.store.put(wep_object(ep, self.agent.config.node))

    def _teardown(self, ep: Endpoint) -> None:
        """Undo everything an endpoint may hold; idempotent. Raises DatastoreError if it cannot release.
        The WorkloadEndpoint goes before the addresses: an address is never free in IPAM while
        an endpoint still says it is held."""
        podnet.delete(ep.host_ifname)
        self.agent.store.delete(WORKLOAD_ENDPOINT, wep_name(ep.pod, ep.handle), ep.namespace)
        self.agent.allocator.release(ep.handle)
        self.agent.registry.remove(ep)

    def teardown_or_defer(self, ep: Endpoint) -> None:
        """Undo an endpoint now; what the datastore cannot take now (its addresses, its
        WorkloadEndpoint) is left to a pending DEL, so no state file is left behind and nothing
        is lost. Never raises DatastoreError."""
        try:
            self._teardown(ep)
        except DatastoreError:
            self.agent.defer_delete(deferred_del(ep))
            self.agent.registry.remove(ep)
            log.warning(
                "the datastore is away: releasing the addresses later",
                extra={"pod": f"{ep.namespace}/{ep.pod}", "handle": ep.handle},
            )

    # -- DEL --------------------------------------------------------------------------------

    def delete(self, request: dict[str, Any]) -> None:
        # With the datastore away the interface is gone at once and the addresses are given back
        # when the agent replays the recorded DEL: the runtime sees success, as the spec wants.
        self._delete(request, defer=True)
        self.agent.request_reconcile()

    def delete_now(self, request: dict[str, Any]) -> None:
        """A DEL that waited (a pending one): raises DatastoreError if the datastore is still away."""
        self._delete(request, defer=False)

    def _delete(self, request: dict[str, Any], defer: bool) -> None:
        """Tear the attachment down, deferring what the datastore cannot take now if `defer`."""
        agent = self.agent
        network = request["config"]["name"]
        container_id, ifname = request["containerID"], request["ifname"]
        handle = handle_for(network, container_id, ifname)
        with self.lock(handle):
            ep = agent.registry.get(network, container_id, ifname)
            if ep is None:
                # Spec: a DEL for an unknown container, or one without netns, succeeds; still give
                # back whatever an interrupted ADD may have left behind.
                namespace, pod = pod_identity(request)
                ep = Endpoint(
                    network=network,
                    container_id=container_id,
                    ifname=ifname,
                    netns=request.get("netns", ""),
                    namespace=namespace,
                    pod=pod,
                    host_ifname=host_ifname_for(network, container_id, ifname),
                )
            if defer:
                self.teardown_or_defer(ep)
            else:
                self._teardown(ep)
        log.info("pod deleted", extra={"pod": f"{ep.namespace}/{ep.pod}", "handle": handle})

    # -- CHECK ------------------------------------------------------------------------------

    def check(self, request: dict[str, Any]) -> None:
        agent = self.agent
        config = request["config"]
        network = config["name"]
        container_id, ifname = request["containerID"], request["ifname"]
        prev = config.get("prevResult")
        if not isinstance(prev, dict):
            raise CniError(spec.ERR_INVALID_CONFIG, "CHECK needs prevResult in the configuration", "field: prevResult")
        ep = agent.registry.get(network, container_id, ifname)
        if ep is None or ep.state != "ready":
            raise CniError(
                spec.ERR_UNKNOWN_CONTAINER,
                f"container {container_id} ({ifname}) is not known to the tulle agent on node {agent.config.node}",
            )
        problems = []
        expected = sorted(spec.result_addresses(prev))
        have = sorted(a.split("/")[0] for a in ep.ips)
        if expected != have:
            problems.append(f"prevResult lists {expected} but the endpoint has {have}")
        held = agent.allocator.allocations().get(ep.handle, [])
        for address in have:
            if address not in held:
                problems.append(f"the address {address} is not reserved for this container in IPAM")
        routes = [r["dst"] for r in prev.get("routes", []) if isinstance(r, dict) and "dst" in r]
        problems.extend(podnet.check(self._pod_interface(ep), routes))
        if problems:
            raise CniError(
                spec.ERR_CHECK_MISMATCH, "the container's network is not as ADD left it", "; ".join(problems)
            )

    # -- GC ---------------------------------------------------------------------------------

    def gc(self, request: dict[str, Any]) -> None:
        agent = self.agent
        config = request["config"]
        network = config["name"]
        # libcni sends both names: the spec's and the one an earlier spec text used.
        raw = config.get("cni.dev/valid-attachments", config.get("cni.dev/attachments", []))
        if not isinstance(raw, list):
            raise CniError(spec.ERR_INVALID_CONFIG, "cni.dev/valid-attachments must be a list")
        valid = set()
        for item in raw:
            if not isinstance(item, dict) or "containerID" not in item or "ifname" not in item:
                raise CniError(
                    spec.ERR_INVALID_CONFIG,
                    "each valid attachment needs containerID and ifname",
                    f"got {item!r}",
                )
            valid.add((str(item["containerID"]), str(item["ifname"])))
        removed = 0
        for ep in agent.registry.all():
            if ep.network == network and (ep.container_id, ep.ifname) not in valid:
                with self.lock(ep.handle):
                    self.teardown_or_defer(ep)
                removed += 1

        def keep(handle: str) -> bool:
            if handle.startswith(TUNNEL_HANDLE_PREFIX):
                return True
            parts = handle.rsplit("/", 2)
            if len(parts) != 3 or parts[0] != network:
                return True  # another network's: not ours to judge
            return (parts[1], parts[2]) in valid

        released = agent.allocator.release_unless(keep)
        stray = agent.remove_stray_interfaces()
        log.info("GC done", extra={"endpoints": removed, "handles": len(released), "interfaces": stray})
        agent.request_reconcile()

    # -- STATUS -----------------------------------------------------------------------------

    def status(self, request: dict[str, Any]) -> None:
        problems = self.agent.readiness_problems()
        if problems:
            raise CniError(spec.ERR_PLUGIN_NOT_AVAILABLE, "the tulle agent is not ready", "; ".join(problems))


def is_host_veth(name: str) -> bool:
    return bool(_HOST_VETH.match(name))
