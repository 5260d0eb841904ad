"""The agent's side of the CNI commands: ADD, DEL, CHECK, GC and STATUS (spec 1.1.0).

The plugin binary has already checked the environment and the configuration; here the work
is done: addresses from IPAM, the veth into the pod, the endpoint record on disk and in the
datastore. ADD is all or nothing, and a failed ADD leaves nothing behind (what the datastore
could not take back is recorded as a pending DEL); DEL is idempotent and never fails for lack
of state. No address a live endpoint holds is ever given to another pod.

Every request is checked again here, as the plugin checks it and more: the socket is root's, but
what a request carries comes from a pod's runtime and its CNI_ARGS. A pod's namespace and name
become the WorkloadEndpoint's key in the datastore (`<prefix>/resources/workloadendpoints/<ns>/<name>`),
so they are held to the API server's rules for those names; a `/` or `..` could otherwise write
another kind's key. A request that fails these checks is refused before anything is touched.

The service is handed what it works with (`CniContext`), so it is tested without root with
the in-memory datastore and a pod network that records what it is asked to do.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from tulle.agent.endpoints import Endpoint, EndpointRegistry, host_ifname_for
from tulle.agent.pending import PendingDeletes, deferred_del
from tulle.cni import spec
from tulle.cni.spec import CniError
from tulle.dataplane import podnet
from tulle.dataplane.netns import NetnsGone
from tulle.dataplane.podnet import PodInterface
from tulle.datastore.base import AlreadyExists, Datastore, DatastoreError
from tulle.ipam.allocator import IpamError, NodeAllocator
from tulle.model.endpoints import TUNNEL_HANDLE_PREFIX, WorkloadEndpoint, handle_for
from tulle.model.kinds import WORKLOAD_ENDPOINT
from tulle.model.validation import dns1123_label, dns1123_subdomain

log = logging.getLogger(__name__)

_HOST_VETH = re.compile(r"^tl[0-9a-f]{11}$")


def is_host_veth(name: str) -> bool:
    return bool(_HOST_VETH.match(name))


class PodNetwork(Protocol):
    """The kernel side of a pod's interface (`tulle.dataplane.podnet`; a fake in unit tests)."""

    def create(self, pod: PodInterface) -> str: ...

    def delete(self, host_ifname: str) -> bool: ...

    def check(self, pod: PodInterface, expect_routes: list[str]) -> list[str]: ...


class Stopwatch:
    """Milliseconds per step, for the log line of a command."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round((now - self._last) * 1000, 1)
        self._last = now


def _name_from_container_id(container_id: str) -> str:
    """A pod name for a runtime that sends none: the container ID, lower case, with what a pod
    name cannot hold made '-' (an ID is [A-Za-z0-9_.-], a pod name [a-z0-9.-])."""
    lowered = container_id[:63].lower().replace("_", "-")
    return lowered.strip(".-")


def pod_identity(request: dict[str, Any]) -> tuple[str, str]:
    """(namespace, pod) from CNI_ARGS; namespace `default` when absent, as podman sends it.

    Raises CniError 4 naming the argument when either is not a name the API server would take
    (a namespace is an RFC 1123 label, a pod name an RFC 1123 subdomain).

    >>> pod_identity({"containerID": "c1", "args": {"K8S_POD_NAMESPACE": "../ipamblocks"}})
    Traceback (most recent call last):
    ...
    tulle.cni.spec.CniError: K8S_POD_NAMESPACE '../ipamblocks' is not a valid namespace name: ...
    """
    args = request.get("args") or {}
    if not isinstance(args, dict):
        raise CniError(spec.ERR_INVALID_ENVIRONMENT, "the request's args (CNI_ARGS) must be an object")
    namespace = args.get("K8S_POD_NAMESPACE") or "default"
    pod = args.get("K8S_POD_NAME") or _name_from_container_id(str(request.get("containerID", "")))
    for arg, value, check, what in (
        ("K8S_POD_NAMESPACE", namespace, dns1123_label, "namespace name"),
        ("K8S_POD_NAME", pod, dns1123_subdomain, "pod name"),
    ):
        problems = check(value) if isinstance(value, str) else ["it must be a string"]
        if problems:
            shown = spec.shown(value) if isinstance(value, str) else type(value).__name__
            raise CniError(
                spec.ERR_INVALID_ENVIRONMENT,
                f"{arg} {shown} is not a valid {what}: {problems[0]}",
                f"field: CNI_ARGS {arg}",
            )
    return namespace, pod


def _check_network(request: dict[str, Any]) -> None:
    """The network configuration's fields the agent reads: error 7 naming the field."""
    config = request.get("config")
    if not isinstance(config, dict):
        raise CniError(spec.ERR_INVALID_CONFIG, "the request has no network configuration", "field: config")
    name = config.get("name")
    if not isinstance(name, str) or not name:
        raise CniError(spec.ERR_INVALID_CONFIG, "network configuration has no 'name'", "field: name")
    spec.validate_config_name("name", name)
    mtu = config.get("mtu")
    if mtu is not None and (isinstance(mtu, bool) or not isinstance(mtu, int) or not 576 <= mtu <= 65535):
        raise CniError(spec.ERR_INVALID_CONFIG, "'mtu' must be a whole number from 576 to 65535", "field: mtu")


def _check_attachment(command: str, request: dict[str, Any]) -> None:
    """CNI_CONTAINERID, CNI_IFNAME and CNI_NETNS as the plugin checks them: error 4 naming the variable."""
    for field, variable in (("containerID", "CNI_CONTAINERID"), ("ifname", "CNI_IFNAME"), ("netns", "CNI_NETNS")):
        if not isinstance(request.get(field, ""), str):
            raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"{variable} must be a string", f"field: {variable}")
    spec.validate_container_id(request.get("containerID", ""))
    spec.validate_ifname(request.get("ifname", ""))
    netns = request.get("netns", "")
    # DEL may come without a netns (spec: "When CNI_NETNS ... not provided, clean up").
    if netns or command != "DEL":
        problem = spec.path_problem(netns) if netns else "it is missing"
        if problem:
            raise CniError(
                spec.ERR_INVALID_ENVIRONMENT,
                f"CNI_NETNS {spec.shown(netns)} is not valid: {problem}",
                "field: CNI_NETNS",
            )


def check_request(command: str, request: dict[str, Any]) -> None:
    """Refuse (CniError 4 or 7, naming the field) a request the service cannot carry out safely."""
    _check_network(request)
    if command in ("ADD", "DEL", "CHECK"):
        _check_attachment(command, request)
    if command == "ADD":
        pod_identity(request)


def pod_interface(ep: Endpoint) -> PodInterface:
    return PodInterface(
        netns=ep.netns, ifname=ep.ifname, host_ifname=ep.host_ifname, addresses=tuple(ep.ips), mtu=ep.mtu
    )


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


@dataclass
class CniContext:
    """What the CNI service works with; each piece owned by the controller named."""

    node: str
    datastore: Datastore
    registry: EndpointRegistry
    allocator: NodeAllocator  # the IPAM controller's
    pending: PendingDeletes
    families: Callable[[], list[int]]  # the IPAM controller's, from the pools
    pod_mtu: Callable[[], int]
    # Who holds an address, any node's WorkloadEndpoints (the endpoint informer's index).
    address_holders: Callable[[str], list[WorkloadEndpoint]]
    sync_policy: Callable[[], None]  # the policy controller's: a new pod isolated before ADD returns
    endpoints_changed: Callable[[str], None]  # a local endpoint came or went (its handle)
    readiness_problems: Callable[[], list[str]]
    remove_stray_interfaces: Callable[[], int]
    podnet: PodNetwork = podnet
    # Told every error answered, with its request: the pod's last CNI failure, for its Node.
    failed: Callable[[dict[str, Any], dict[str, Any]], None] = lambda _request, _error: None


def _prev_result_addresses(prev: dict[str, Any]) -> list[str]:
    """The addresses a CHECK's prevResult lists; error 7 if its `ips` are not the spec's."""
    ips = prev.get("ips", [])
    if not isinstance(ips, list) or not all(isinstance(ip, dict) and isinstance(ip.get("address"), str) for ip in ips):
        raise CniError(
            spec.ERR_INVALID_CONFIG, "prevResult's ips must be a list of objects with an address", "field: prevResult"
        )
    try:
        return spec.result_addresses(prev)
    except ValueError as exc:
        raise CniError(spec.ERR_INVALID_CONFIG, f"prevResult lists an address that is not one: {exc}") from None


def _prev_result_routes(prev: dict[str, Any]) -> list[str]:
    routes = prev.get("routes", [])
    if not isinstance(routes, list):
        raise CniError(spec.ERR_INVALID_CONFIG, "prevResult's routes must be a list", "field: prevResult")
    return [r["dst"] for r in routes if isinstance(r, dict) and isinstance(r.get("dst"), str)]


class CniService:
    def __init__(self, ctx: CniContext) -> None:
        self.ctx = ctx
        self._locks: dict[str, threading.Lock] = defaultdict(threading.Lock)
        self._locks_guard = threading.Lock()

    def lock(self, handle: str) -> threading.Lock:
        # The runtime never runs two commands for one attachment at once (spec: "must not invoke
        # parallel operations for the same container"), but GC, resyncs and pending DELs may.
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
        handler = handlers.get(command) if isinstance(command, str) else None
        try:
            if handler is None:
                shown = spec.shown(command) if isinstance(command, str) else type(command).__name__
                raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"the agent does not know the command {shown}")
            check_request(str(command), request)
            return {"result": handler(request)}
        except CniError as exc:
            error = exc.to_dict()
        except DatastoreError as exc:
            error = CniError(spec.ERR_TRY_AGAIN_LATER, "the datastore is not reachable", str(exc)).to_dict()
        except Exception as exc:
            log.exception("CNI command failed", extra={"command": command})
            error = CniError(spec.ERR_INTERNAL, f"the tulle agent failed: {exc}").to_dict()
        try:
            self.ctx.failed(request, error)
        except Exception:  # the answer to the runtime matters more than the record of it
            log.exception("could not record a CNI failure", extra={"command": command})
        return {"error": error}

    # -- ADD --------------------------------------------------------------------------------

    def add(self, request: dict[str, Any]) -> dict[str, Any]:
        ctx = self.ctx
        network = request["config"]["name"]
        container_id, ifname, netns = request["containerID"], request["ifname"], request["netns"]
        handle = handle_for(network, container_id, ifname)
        if not os.path.exists(netns):
            raise CniError(spec.ERR_INVALID_ENVIRONMENT, f"CNI_NETNS {netns} does not exist")
        namespace, pod = pod_identity(request)
        with self.lock(handle):
            existing = ctx.registry.get(network, container_id, ifname)
            intact = existing is not None and existing.state == "ready" and existing.netns == netns
            if existing is not None and intact and not ctx.podnet.check(pod_interface(existing), []):
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
                mtu=int(request["config"].get("mtu") or ctx.pod_mtu()),
            )
            steps = Stopwatch()
            ctx.registry.put(ep)  # state "adding": rolled back on start if we die half-way
            conflicts: list[str] = []
            try:
                attrs = {"pod": f"{namespace}/{pod}", "node": ctx.node}
                ips = ctx.allocator.allocate(handle, ctx.families(), attrs, self._held_by_other(handle, conflicts))
                if conflicts:
                    self._refuse_for_conflicts(f"{namespace}/{pod}", conflicts)
                steps.lap("ipam")
                ep.ips = [f"{ip}/{ip.max_prefixlen}" for ip in ips]
                ep.mac = ctx.podnet.create(pod_interface(ep))
                steps.lap("interface")
                ep.host_mac = podnet.HOST_MAC
                ep.state = "ready"
                ctx.registry.put(ep)
                self.publish(ep)
                steps.lap("publish")
            except BaseException as exc:
                self.teardown_or_defer(ep)
                if isinstance(exc, IpamError):
                    raise CniError(spec.ERR_IPAM_EXHAUSTED, str(exc)) from exc
                if isinstance(exc, NetnsGone):
                    raise CniError(spec.ERR_INVALID_ENVIRONMENT, str(exc)) from exc
                if isinstance(exc, podnet.PodNetError):
                    raise CniError(spec.ERR_IO_FAILURE, str(exc)) from exc
                raise
        ctx.endpoints_changed(handle)
        # Policy for the new pod is in place before the runtime starts its containers.
        ctx.sync_policy()
        steps.lap("dataplane")
        log.info(
            "pod added",
            extra={"pod": f"{namespace}/{pod}", "ips": ep.ips, "iface": ep.host_ifname, "ms": steps.laps},
        )
        return build_result(ep)

    def _held_by_other(self, handle: str, conflicts: list[str]) -> Callable[[str], bool]:
        """For IPAM: whether an endpoint other than `handle` holds an address (this node's
        registry, or another node's WorkloadEndpoint), noting each such address in `conflicts`
        and recording its holder in IPAM again."""
        ctx = self.ctx

        def held(address: str) -> bool:
            for ep in ctx.registry.all():
                if ep.handle != handle and address in ep.addresses():
                    conflicts.append(f"{address} is held by pod {ep.namespace}/{ep.pod} on this node")
                    ctx.allocator.reclaim(
                        [(ep.handle, ep.addresses(), {"pod": f"{ep.namespace}/{ep.pod}", "node": ctx.node})]
                    )
                    return True
            for holder in ctx.address_holders(address):
                # This node's endpoints are judged by its registry above: the informer may still
                # hold one that a DEL has just deleted, which must not stop the next ADD.
                if holder.handle != handle and holder.node != ctx.node:
                    conflicts.append(f"{address} is held by pod {holder.namespace}/{holder.pod} on node {holder.node}")
                    ctx.allocator.reclaim([(holder.handle, [address], {"pod": f"{holder.namespace}/{holder.pod}"})])
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

    def publish(self, ep: Endpoint, problems: tuple[str, ...] = ()) -> None:
        """The WorkloadEndpoint: tells every node which pod has which addresses. Created, or
        replaced whatever is stored (this node alone writes its endpoints)."""
        obj = ep.workload(self.ctx.node, problems).to_object()
        try:
            self.ctx.datastore.create(obj)
        except AlreadyExists:  # a repeated ADD, or a publish again after a restart
            self.ctx.datastore.update(obj)

    def _teardown(self, ep: Endpoint) -> None:
        """Undo everything an endpoint may hold; idempotent. Raises DatastoreError if it cannot release.
        The WorkloadEndpoint goes before the addresses: an address is never free in IPAM while
        an endpoint still says it is held."""
        self.ctx.podnet.delete(ep.host_ifname)
        self.ctx.datastore.delete(WORKLOAD_ENDPOINT, ep.workload(self.ctx.node).name, ep.namespace)
        self.ctx.allocator.release(ep.handle)
        self.ctx.registry.remove(ep)

    def teardown_or_defer(self, ep: Endpoint) -> None:
        """Undo an endpoint now; what the datastore cannot take now (its addresses, its
        WorkloadEndpoint) is left to a pending DEL, so no state file is left behind and nothing
        is lost. Never raises DatastoreError."""
        try:
            self._teardown(ep)
        except DatastoreError:
            self.ctx.pending.record(deferred_del(ep))
            self.ctx.registry.remove(ep)
            log.warning(
                "the datastore is away: releasing the addresses later",
                extra={"pod": f"{ep.namespace}/{ep.pod}", "handle": ep.handle},
            )
        self.ctx.endpoints_changed(ep.handle)

    # -- DEL --------------------------------------------------------------------------------

    def delete(self, request: dict[str, Any]) -> None:
        # With the datastore away the interface is gone at once and the addresses are given back
        # when the agent replays the recorded DEL: the runtime sees success, as the spec wants.
        self._delete(request, defer=True)

    def delete_now(self, request: dict[str, Any]) -> None:
        """A DEL that waited (a pending one): raises DatastoreError if the datastore is still away."""
        self._delete(request, defer=False)

    def _delete(self, request: dict[str, Any], defer: bool) -> None:
        """Tear the attachment down, deferring what the datastore cannot take now if `defer`."""
        ctx = self.ctx
        network = request["config"]["name"]
        container_id, ifname = request["containerID"], request["ifname"]
        handle = handle_for(network, container_id, ifname)
        with self.lock(handle):
            ep = ctx.registry.get(network, container_id, ifname)
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
        ctx.endpoints_changed(handle)
        log.info("pod deleted", extra={"pod": f"{ep.namespace}/{ep.pod}", "handle": handle})

    # -- CHECK ------------------------------------------------------------------------------

    def check(self, request: dict[str, Any]) -> None:
        ctx = self.ctx
        config = request["config"]
        network = config["name"]
        container_id, ifname = request["containerID"], request["ifname"]
        prev = config.get("prevResult")
        if not isinstance(prev, dict):
            raise CniError(spec.ERR_INVALID_CONFIG, "CHECK needs prevResult in the configuration", "field: prevResult")
        expected = sorted(_prev_result_addresses(prev))
        routes = _prev_result_routes(prev)
        ep = ctx.registry.get(network, container_id, ifname)
        if ep is None or ep.state != "ready":
            raise CniError(
                spec.ERR_UNKNOWN_CONTAINER,
                f"container {container_id} ({ifname}) is not known to the tulle agent on node {ctx.node}",
            )
        problems = []
        have = sorted(ep.addresses())
        if expected != have:
            problems.append(f"prevResult lists {expected} but the endpoint has {have}")
        held = ctx.allocator.allocations().get(ep.handle, [])
        for address in have:
            if address not in held:
                problems.append(f"the address {address} is not reserved for this container in IPAM")
        problems.extend(ctx.podnet.check(pod_interface(ep), routes))
        if problems:
            raise CniError(
                spec.ERR_CHECK_MISMATCH, "the container's network is not as ADD left it", "; ".join(problems)
            )

    # -- GC ---------------------------------------------------------------------------------

    def gc(self, request: dict[str, Any]) -> None:
        ctx = self.ctx
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
        for ep in ctx.registry.all():
            if ep.network == network and (ep.container_id, ep.ifname) not in valid:
                with self.lock(ep.handle):
                    self.teardown_or_defer(ep)
                ctx.endpoints_changed(ep.handle)
                removed += 1

        def keep(handle: str) -> bool:
            if handle.startswith(TUNNEL_HANDLE_PREFIX):
                return True
            parts = handle.rsplit("/", 2)
            if len(parts) != 3 or parts[0] != network:
                return True  # another network's: not ours to judge
            return (parts[1], parts[2]) in valid

        released = ctx.allocator.release_unless(keep)
        stray = ctx.remove_stray_interfaces()
        log.info("GC done", extra={"endpoints": removed, "handles": len(released), "interfaces": stray})

    # -- STATUS -----------------------------------------------------------------------------

    def status(self, request: dict[str, Any]) -> None:
        problems = self.ctx.readiness_problems()
        if problems:
            raise CniError(spec.ERR_PLUGIN_NOT_AVAILABLE, "the tulle agent is not ready", "; ".join(problems))
