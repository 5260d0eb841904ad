"""Netlink reconcilers for node routing: VXLAN devices, routes, neighbours, FDB entries.

Each reconciler reads what the kernel has (only what Tulle owns), plans the difference with a
pure function and applies it, never touching what is already right: a restart of the agent
changes nothing that is correct, and repairs what is not. The netlink socket is injected (a
factory of IPRoute-like objects, pyroute2's IPRoute by default), so a reconcile runs in tests
against a fake that records the calls.

>>> RouteReconciler().apply({Route("10.244.1.0/26", gateway="172.30.1.3")})  # doctest: +SKIP
Diff(add=[Route(dst='10.244.1.0/26', gateway='172.30.1.3', ...)], remove=[])
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import socket
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import RTM_DELNEIGH, RTM_DELROUTE, RTM_NEWNEIGH, RTM_NEWROUTE
from pyroute2.netlink.rtnl.ndmsg import ndmsg
from pyroute2.netlink.rtnl.rtmsg import rtmsg

from tulle.dataplane.netlink import IPRoute
from tulle.dataplane.podnet import IFA_F_NODAD, NUD_PERMANENT
from tulle.kernelstate.net import FdbEntry, Neighbour, Route, VxlanDevice

log = logging.getLogger(__name__)

RTPROT_TULLE_NODE = 211  # routes to other nodes' blocks and blackholes for ours
MAIN_TABLE = 254
RTN_BLACKHOLE = 6
RTNH_F_ONLINK = 4
AF_BRIDGE = 7


class Netlink(Protocol):
    """The part of pyroute2's IPRoute the reconcilers use (a context manager, as IPRoute is)."""

    def __enter__(self) -> Netlink: ...
    def __exit__(self, *exc: object) -> Any: ...
    def link_lookup(self, **kwargs: Any) -> list[int]: ...
    def get_links(self, *args: Any, **kwargs: Any) -> Any: ...
    def get_addr(self, **kwargs: Any) -> Any: ...
    def get_routes(self, **kwargs: Any) -> Any: ...
    def get_neighbours(self, **kwargs: Any) -> Any: ...
    def link(self, command: str, **kwargs: Any) -> Any: ...
    def addr(self, command: str, **kwargs: Any) -> Any: ...
    def route(self, command: str, **kwargs: Any) -> Any: ...
    def neigh(self, command: str, **kwargs: Any) -> Any: ...
    def fdb(self, command: str, **kwargs: Any) -> Any: ...


NetlinkFactory = Callable[[], AbstractContextManager[Netlink]]  # IPRoute, or a shared socket


class _Ordered(Protocol):
    def __lt__(self, other: Any, /) -> bool: ...


T = TypeVar("T", bound=_Ordered)


@dataclass(frozen=True)
class Diff(Generic[T]):
    add: list[T]
    remove: list[T]

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def diff(desired: set[T], actual: set[T]) -> Diff[T]:
    return Diff(add=sorted(desired - actual), remove=sorted(actual - desired))


def _index(ipr: Netlink, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _family(address: str) -> int:
    return socket.AF_INET if ipaddress.ip_address(address).version == 4 else socket.AF_INET6


# -- VXLAN devices -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VxlanLink:
    """A device as the kernel has it under a VXLAN device's name (the attributes Tulle sets)."""

    vni: int | None
    port: int | None
    local: str | None
    learning: bool | None
    mtu: int
    mac: str
    up: bool
    addresses: frozenset[tuple[str, int]]  # (address, prefix length) of the device's family


@dataclass(frozen=True)
class VxlanPlan:
    """What to do to a VXLAN device; an empty plan (False) leaves it alone."""

    delete: bool = False  # its identity (VNI, port, local address, learning) differs
    create: bool = False
    mtu: int | None = None
    mac: str | None = None
    remove_addresses: tuple[tuple[str, int], ...] = ()
    add_address: tuple[str, int] | None = None
    up: bool = False

    def __bool__(self) -> bool:
        return self != VxlanPlan()


def plan_vxlan(want: VxlanDevice, have: VxlanLink | None) -> VxlanPlan:
    """The steps from the device the kernel has (None: no device of that name) to the one wanted.

    The device is recreated only if its identity differs; the rest is repaired in place. The
    kernel's own IPv6 link-local address stays.
    """
    address = (want.tunnel_address, want.tunnel_prefixlen)
    identity = (want.vni, want.port, want.local, False)  # never learning: peers come from the FDB
    if have is None or (have.vni, have.port, have.local, have.learning) != identity:
        # A new device is created with its MAC and MTU, down and without addresses.
        return VxlanPlan(delete=have is not None, create=True, add_address=address, up=True)
    stale = tuple(sorted(a for a in have.addresses if a != address and not a[0].startswith("fe80:")))
    return VxlanPlan(
        mtu=want.mtu if have.mtu != want.mtu else None,
        mac=want.mac if have.mac != want.mac else None,
        remove_addresses=stale,
        add_address=address if address not in have.addresses else None,
        up=not have.up,
    )


def _read_vxlan(ipr: Netlink, index: int, family: int) -> VxlanLink:
    link = ipr.get_links(index)[0]
    info = link.get(("linkinfo", "data"))  # None for a device of another kind

    def attr(name: str) -> Any:
        return None if info is None else info.get(name)

    learning = attr("IFLA_VXLAN_LEARNING")
    addresses = ipr.get_addr(index=index, family=socket.AF_INET if family == 4 else socket.AF_INET6)
    return VxlanLink(
        vni=attr("IFLA_VXLAN_ID"),
        port=attr("IFLA_VXLAN_PORT"),
        local=attr("IFLA_VXLAN_LOCAL") or attr("IFLA_VXLAN_LOCAL6"),
        learning=None if learning is None else bool(learning),
        mtu=int(link.get("mtu")),
        mac=str(link.get("address")),
        up=link.get("state") == "up",
        addresses=frozenset((str(a.get("address")), int(a["prefixlen"])) for a in addresses),
    )


class VxlanDeviceReconciler:
    """Creates, repairs and removes Tulle's VXLAN devices.

    >>> VxlanDeviceReconciler().apply(VxlanDevice("tulle-vxlan4", 4, "172.30.1.2", "eth0",
    ...     "02:00:00:00:00:01", 1450, "10.244.0.0"))  # doctest: +SKIP
    VxlanPlan(delete=False, create=True, ...)
    """

    def __init__(self, netlink: NetlinkFactory = IPRoute) -> None:
        self._netlink = netlink

    def apply(self, want: VxlanDevice) -> VxlanPlan:
        with self._netlink() as ipr:
            underlay = _index(ipr, want.underlay_ifname)
            if underlay is None:
                raise RuntimeError(f"underlay interface {want.underlay_ifname} does not exist")
            index = _index(ipr, want.name)
            change = plan_vxlan(want, None if index is None else _read_vxlan(ipr, index, want.family))
            if change.delete:
                ipr.link("del", index=index)
            if change.create:
                ipr.link("add", **self._create_args(want, underlay))
                index = _index(ipr, want.name)
                if index is None:
                    raise RuntimeError(f"VXLAN device {want.name} vanished right after it was created")
            if change.mtu is not None:
                ipr.link("set", index=index, mtu=change.mtu)
            if change.mac is not None:
                ipr.link("set", index=index, address=change.mac)
            for address, prefixlen in change.remove_addresses:
                ipr.addr("del", index=index, address=address, prefixlen=prefixlen)
            if change.add_address is not None:
                address, prefixlen = change.add_address
                ipr.addr("add", index=index, address=address, prefixlen=prefixlen, flags=IFA_F_NODAD)
            if change.up:
                ipr.link("set", index=index, state="up")
        return change

    @staticmethod
    def _create_args(want: VxlanDevice, underlay: int) -> dict[str, Any]:
        args: dict[str, Any] = {
            "ifname": want.name,
            "kind": "vxlan",
            "vxlan_id": want.vni,
            "vxlan_port": want.port,
            "vxlan_link": underlay,
            "vxlan_learning": 0,
            "vxlan_udp_csum": 0,
            "address": want.mac,
            "mtu": want.mtu,
        }
        args["vxlan_local" if want.family == 4 else "vxlan_local6"] = want.local
        return args

    def remove(self, name: str) -> bool:
        """Delete the device; False if there was none."""
        with self._netlink() as ipr:
            index = _index(ipr, name)
            if index is None:
                return False
            try:
                ipr.link("del", index=index)
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
            return True


# -- routes ------------------------------------------------------------------------------------


def plan_routes(desired: set[Route], actual: set[Route]) -> Diff[Route]:
    """Routes to replace (add) and to delete (remove).

    A destination that stays wanted is never deleted: its new route replaces the old one, so
    there is no moment without a route.
    """
    change = diff(desired, actual)
    kept = {r.dst for r in desired}
    return Diff(add=change.add, remove=[r for r in change.remove if r.dst not in kept])


def _route_from_msg(msg: Any, names: dict[int, str]) -> Route:
    family = 4 if msg["family"] == socket.AF_INET else 6
    dst = msg.get("dst") or ("0.0.0.0" if family == 4 else "::")
    onlink = bool(msg["flags"] & RTNH_F_ONLINK)
    return Route(
        dst=str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}")),
        gateway=msg.get("gateway") or "",
        dev=names.get(msg.get("oif"), "") if msg.get("gateway") and onlink else "",
        onlink=onlink,
        blackhole=msg["type"] == RTN_BLACKHOLE,
    )


class RouteReconciler:
    """Tulle's routes to other nodes' blocks (and blackholes for ours): protocol 211, main table."""

    def __init__(self, netlink: NetlinkFactory = IPRoute) -> None:
        self._netlink = netlink

    @staticmethod
    def read(ipr: Netlink) -> set[Route]:
        msgs = [
            msg
            for family in (socket.AF_INET, socket.AF_INET6)
            for msg in ipr.get_routes(family=family, table=MAIN_TABLE, proto=RTPROT_TULLE_NODE)
        ]
        # Names only for the few devices our onlink routes use (dumping every link costs O(pods)).
        names: dict[int, str] = {}
        for oif in {m.get("oif") for m in msgs if m["flags"] & RTNH_F_ONLINK and m.get("oif")}:
            names[oif] = ipr.get_links(oif)[0].get("ifname")
        return {_route_from_msg(msg, names) for msg in msgs}

    def apply(self, desired: set[Route]) -> Diff[Route]:
        """Make the kernel's Tulle node routes equal to desired; return what changed."""
        with self._netlink() as ipr:
            change = plan_routes(desired, self.read(ipr))
            for route in change.remove:
                try:
                    ipr.route("del", **self._args(ipr, route))
                except NetlinkError as exc:
                    if exc.code != errno.ESRCH:  # gone already
                        raise
            for route in change.add:
                try:
                    ipr.route("replace", **self._args(ipr, route))
                except NetlinkError as exc:
                    log.warning("cannot install route", extra={"route": route.dst, "error": str(exc)})
        return change

    @staticmethod
    def _args(ipr: Netlink, route: Route) -> dict[str, Any]:
        args: dict[str, Any] = {
            "dst": route.dst,
            "proto": RTPROT_TULLE_NODE,
            "table": MAIN_TABLE,
            "family": socket.AF_INET if route.family == 4 else socket.AF_INET6,
        }
        if route.blackhole:
            args["type"] = "blackhole"
            return args
        if route.gateway:
            args["gateway"] = route.gateway
        if route.dev:
            index = _index(ipr, route.dev)
            if index is None:
                raise RuntimeError(f"device {route.dev} for route {route.dst} does not exist")
            args["oif"] = index
        if route.onlink:
            args["flags"] = RTNH_F_ONLINK
        return args


# -- neighbours and FDB entries on the VXLAN devices --------------------------------------------


class _OnDevice(_Ordered, Protocol):
    @property
    def dev(self) -> str: ...


E = TypeVar("E", bound=_OnDevice)


def plan_device_entries(desired: set[E], actual: set[E], devices: Iterable[str]) -> Diff[E]:
    """Entries to add and delete on the devices that exist; an entry for a missing device waits."""
    present = set(devices)
    return diff({e for e in desired if e.dev in present}, {e for e in actual if e.dev in present})


class DeviceEntryReconciler(ABC, Generic[E]):
    """Permanent entries Tulle owns on its devices: read per device, diffed, written one by one.

    Neighbours and FDB entries share this; they differ only in how an entry is read and written.
    """

    def __init__(self, netlink: NetlinkFactory = IPRoute) -> None:
        self._netlink = netlink

    @abstractmethod
    def read(self, ipr: Netlink, dev: str, index: int) -> Iterable[E]: ...

    @abstractmethod
    def add(self, ipr: Netlink, index: int, entry: E) -> None: ...

    @abstractmethod
    def delete(self, ipr: Netlink, index: int, entry: E) -> None: ...

    def apply(self, desired: set[E], devices: Iterable[str]) -> Diff[E]:
        with self._netlink() as ipr:
            indexes = {dev: index for dev in devices if (index := _index(ipr, dev)) is not None}
            actual = {e for dev, index in indexes.items() for e in self.read(ipr, dev, index)}
            change = plan_device_entries(desired, actual, indexes)
            for entry in change.remove:
                try:
                    self.delete(ipr, indexes[entry.dev], entry)
                except NetlinkError:
                    pass  # gone already
            for entry in change.add:
                self.add(ipr, indexes[entry.dev], entry)
        return change


class NeighbourReconciler(DeviceEntryReconciler[Neighbour]):
    def read(self, ipr: Netlink, dev: str, index: int) -> Iterable[Neighbour]:
        for msg in ipr.get_neighbours(ifindex=index):
            if msg["state"] & NUD_PERMANENT and msg.get("lladdr") and msg.get("dst"):
                yield Neighbour(dev=dev, address=msg.get("dst"), mac=msg.get("lladdr"))

    def add(self, ipr: Netlink, index: int, entry: Neighbour) -> None:
        family = _family(entry.address)
        ipr.neigh("replace", dst=entry.address, lladdr=entry.mac, ifindex=index, state=NUD_PERMANENT, family=family)

    def delete(self, ipr: Netlink, index: int, entry: Neighbour) -> None:
        ipr.neigh("del", dst=entry.address, ifindex=index, family=_family(entry.address))


class FdbReconciler(DeviceEntryReconciler[FdbEntry]):
    def read(self, ipr: Netlink, dev: str, index: int) -> Iterable[FdbEntry]:
        for msg in ipr.fdb("dump", ifindex=index):
            # The dump also lists entries of other devices (the bridge's, the default ones).
            if msg.get("ifindex") == index and msg.get("dst") and msg.get("lladdr"):
                yield FdbEntry(dev=dev, mac=msg.get("lladdr"), dst=msg.get("dst"))

    def add(self, ipr: Netlink, index: int, entry: FdbEntry) -> None:
        ipr.fdb("append", ifindex=index, lladdr=entry.mac, dst=entry.dst, state=NUD_PERMANENT)

    def delete(self, ipr: Netlink, index: int, entry: FdbEntry) -> None:
        ipr.fdb("del", ifindex=index, lladdr=entry.mac, dst=entry.dst)


# -- one node's change, as one batch ------------------------------------------------------------


class NodeChangeWriter:
    """Writes one node's change (routes, neighbours, FDB entries to add and to delete) as one
    batch of netlink requests, without reading the kernel's tables: the work of a node that
    joins, leaves or moves, whatever the size of the cluster (docs/design/routing.md).

    The requests are pyroute2's own messages, built here and sent with its async API in one
    event-loop run: pyroute2's keyword-argument layer and its event loop per synchronous call
    cost ~0.6 ms a request, a built message ~0.08 ms. A delete of something gone already is not
    an error (a route delete names the gateway it expects, so a route another node took over is
    left alone); a device that does not exist yet leaves its entries to the next full reconcile.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ipr: Any = None
        self._lock = threading.Lock()

    def write(self, change: EntryChange) -> None:
        with self._lock:
            try:
                self._loop.run_until_complete(self._write(change))
            except OSError:
                self._ipr = None  # a broken socket: a new one next time
                raise

    async def _write(self, change: EntryChange) -> None:
        from pyroute2 import AsyncIPRoute

        if self._ipr is None:
            self._ipr = AsyncIPRoute()
            await self._ipr.setup_endpoint()
        for msg_type, msg in _messages(change, removing=True):
            try:
                await self._ipr.nlm_request(msg, msg_type=msg_type, msg_flags=_DELETE)
            except NetlinkError:
                pass  # gone already, or replaced by another node's entry
        for msg_type, msg in _messages(change, removing=False):
            flags = _APPEND if msg_type == RTM_NEWNEIGH and msg["family"] == AF_BRIDGE else _REPLACE
            await self._ipr.nlm_request(msg, msg_type=msg_type, msg_flags=flags)


_DELETE = NLM_F_REQUEST | NLM_F_ACK
_REPLACE = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_REPLACE
_APPEND = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_APPEND
_NUD_NOARP = 0x40
_NTF_SELF = 0x02
_RTN_UNICAST = 1


def _messages(change: EntryChange, removing: bool) -> list[tuple[int, Any]]:
    """The requests for one side of a change; entries whose device is missing are left out."""
    routes = change.routes_remove if removing else change.routes_add
    neighbours = change.neighbours_remove if removing else change.neighbours_add
    fdb = change.fdb_remove if removing else change.fdb_add
    out: list[tuple[int, Any]] = []
    for route in routes:
        if (msg := _route_msg(route)) is not None:
            out.append((RTM_DELROUTE if removing else RTM_NEWROUTE, msg))
    entries: list[Neighbour | FdbEntry] = [*neighbours, *fdb]
    for entry in entries:
        if (msg := _neighbour_msg(entry)) is not None:
            out.append((RTM_DELNEIGH if removing else RTM_NEWNEIGH, msg))
    return out


def _route_msg(route: Route) -> Any:
    net = ipaddress.ip_network(route.dst)
    msg = rtmsg()
    msg["family"] = socket.AF_INET if net.version == 4 else socket.AF_INET6
    msg["dst_len"] = net.prefixlen
    msg["table"] = MAIN_TABLE
    msg["proto"] = RTPROT_TULLE_NODE
    msg["scope"] = 0  # universe
    msg["type"] = RTN_BLACKHOLE if route.blackhole else _RTN_UNICAST
    msg["flags"] = RTNH_F_ONLINK if route.onlink else 0
    attrs: list[tuple[str, Any]] = [("RTA_TABLE", MAIN_TABLE), ("RTA_DST", str(net.network_address))]
    if route.gateway:
        attrs.append(("RTA_GATEWAY", route.gateway))
    if route.dev:
        index = _device_index(route.dev)
        if index is None:
            return None
        attrs.append(("RTA_OIF", index))
    msg["attrs"] = attrs
    return msg


def _neighbour_msg(entry: Neighbour | FdbEntry) -> Any:
    index = _device_index(entry.dev)
    if index is None:
        return None
    msg = ndmsg()
    msg["ifindex"] = index
    if isinstance(entry, FdbEntry):  # the VXLAN device's FDB: inner MAC -> outer destination
        msg["family"] = AF_BRIDGE
        msg["state"] = NUD_PERMANENT | _NUD_NOARP
        msg["flags"] = _NTF_SELF
        msg["attrs"] = [("NDA_LLADDR", entry.mac), ("NDA_DST", entry.dst)]
    else:
        msg["family"] = socket.AF_INET if ipaddress.ip_address(entry.address).version == 4 else socket.AF_INET6
        msg["state"] = NUD_PERMANENT
        msg["attrs"] = [("NDA_DST", entry.address), ("NDA_LLADDR", entry.mac)]
    return msg


@dataclass(frozen=True)
class EntryChange:
    """What to add and delete for one node."""

    routes_add: tuple[Route, ...] = ()
    routes_remove: tuple[Route, ...] = ()
    neighbours_add: tuple[Neighbour, ...] = ()
    neighbours_remove: tuple[Neighbour, ...] = ()
    fdb_add: tuple[FdbEntry, ...] = ()
    fdb_remove: tuple[FdbEntry, ...] = ()

    def __bool__(self) -> bool:
        return self != EntryChange()


def _device_index(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None
