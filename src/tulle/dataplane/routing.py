"""Netlink reconcilers for node routing: VXLAN devices, routes, neighbours, FDB entries.

Each reconciler reads what the kernel has (only what Tulle owns), compares it with what is
desired and applies the difference, never touching what is already right: a restart of the
agent changes nothing that is correct, and repairs what is not.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from dataclasses import dataclass
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from tulle.dataplane.podnet import IFA_F_NODAD, NUD_PERMANENT
from tulle.routing.compile import VXLAN_PORT, VXLAN_VNI, FdbEntry, Neighbour, Route

log = logging.getLogger(__name__)

RTPROT_TULLE_NODE = 211  # routes to other nodes' blocks and blackholes for ours
RTN_BLACKHOLE = 6
RTNH_F_ONLINK = 4
NTF_SELF = 0x02


@dataclass(frozen=True)
class Diff:
    add: list[Any]
    remove: list[Any]

    def __bool__(self) -> bool:
        return bool(self.add or self.remove)


def diff(desired: set[Any], actual: set[Any]) -> Diff:
    return Diff(add=sorted(desired - actual), remove=sorted(actual - desired))


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


# -- VXLAN devices -----------------------------------------------------------------------------


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    family: int
    local: str  # our underlay address
    underlay_ifname: str
    mac: str
    mtu: int
    tunnel_address: str


def ensure_vxlan(dev: VxlanDevice) -> list[str]:
    """Create or repair the VXLAN device; recreate it only if its identity (VNI, port, local) differs."""
    changed: list[str] = []
    with IPRoute() as ipr:
        underlay = _index(ipr, dev.underlay_ifname)
        if underlay is None:
            raise RuntimeError(f"underlay interface {dev.underlay_ifname} does not exist")
        idx = _index(ipr, dev.name)
        if idx is not None:
            link = ipr.get_links(idx)[0]
            info = link.get(("linkinfo", "data")) or link.get_nested("IFLA_LINKINFO", "IFLA_INFO_DATA")
            local_attr = "IFLA_VXLAN_LOCAL" if dev.family == 4 else "IFLA_VXLAN_LOCAL6"
            same = (
                info is not None
                and info.get("IFLA_VXLAN_ID") == VXLAN_VNI
                and info.get("IFLA_VXLAN_PORT") == VXLAN_PORT
                and info.get(local_attr) == dev.local
                and info.get("IFLA_VXLAN_LEARNING") == 0
            )
            if not same:
                ipr.link("del", index=idx)
                idx = None
                changed.append(f"recreated {dev.name}")
        if idx is None:
            attrs: dict[str, Any] = {
                "ifname": dev.name,
                "kind": "vxlan",
                "vxlan_id": VXLAN_VNI,
                "vxlan_port": VXLAN_PORT,
                "vxlan_link": underlay,
                "vxlan_learning": 0,
                "vxlan_udp_csum": 0,
                "address": dev.mac,
                "mtu": dev.mtu,
            }
            attrs["vxlan_local" if dev.family == 4 else "vxlan_local6"] = dev.local
            ipr.link("add", **attrs)
            idx = _index(ipr, dev.name)
            assert idx is not None
            changed.append(f"created {dev.name}")
        link = ipr.get_links(idx)[0]
        if link.get("mtu") != dev.mtu:
            ipr.link("set", index=idx, mtu=dev.mtu)
            changed.append(f"mtu {dev.mtu}")
        if str(link.get("address")) != dev.mac:
            ipr.link("set", index=idx, address=dev.mac)
            changed.append(f"mac {dev.mac}")
        family = socket.AF_INET if dev.family == 4 else socket.AF_INET6
        plen = 32 if dev.family == 4 else 128
        have = {(a.get("address"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=family)}
        want = (dev.tunnel_address, plen)
        for address, prefixlen in have:
            if (address, prefixlen) != want and not str(address).startswith("fe80:"):
                ipr.addr("del", index=idx, address=address, prefixlen=prefixlen)
                changed.append(f"removed address {address}")
        if want not in have:
            ipr.addr("add", index=idx, address=dev.tunnel_address, prefixlen=plen, flags=IFA_F_NODAD)
            changed.append(f"address {dev.tunnel_address}")
        if link.get("state") != "up":
            ipr.link("set", index=idx, state="up")
            changed.append("up")
    return changed


def remove_vxlan(name: str) -> bool:
    with IPRoute() as ipr:
        idx = _index(ipr, name)
        if idx is None:
            return False
        ipr.link("del", index=idx)
        return True


# -- routes ------------------------------------------------------------------------------------


def _route_from_msg(ipr: IPRoute, msg: Any, names: dict[int, str]) -> Route:
    family = 4 if msg["family"] == socket.AF_INET else 6
    dst = msg.get("dst") or ("0.0.0.0" if family == 4 else "::")
    oif = msg.get("oif")
    return Route(
        dst=str(ipaddress.ip_network(f"{dst}/{msg['dst_len']}")),
        gateway=msg.get("gateway") or "",
        dev=names.get(oif, "") if msg.get("gateway") and msg["flags"] & RTNH_F_ONLINK else "",
        onlink=bool(msg["flags"] & RTNH_F_ONLINK),
        blackhole=msg["type"] == RTN_BLACKHOLE,
    )


def actual_routes(ipr: IPRoute) -> set[Route]:
    msgs = [
        msg
        for family in (socket.AF_INET, socket.AF_INET6)
        for msg in ipr.get_routes(family=family, table=254, proto=RTPROT_TULLE_NODE)
    ]
    # Names only for the few devices our onlink routes use (dumping every link costs O(pods)).
    names: dict[int, str] = {}
    for oif in {m.get("oif") for m in msgs if m["flags"] & RTNH_F_ONLINK and m.get("oif")}:
        names[oif] = ipr.get_links(oif)[0].get("ifname")
    return {_route_from_msg(ipr, msg, names) for msg in msgs}


def _route_args(ipr: IPRoute, route: Route) -> dict[str, Any]:
    args: dict[str, Any] = {
        "dst": route.dst,
        "proto": RTPROT_TULLE_NODE,
        "table": 254,
        "family": socket.AF_INET if route.family == 4 else socket.AF_INET6,
    }
    if route.blackhole:
        args["type"] = "blackhole"
        return args
    if route.gateway:
        args["gateway"] = route.gateway
    if route.dev:
        idx = _index(ipr, route.dev)
        if idx is None:
            raise RuntimeError(f"device {route.dev} for route {route.dst} does not exist")
        args["oif"] = idx
    if route.onlink:
        args["flags"] = RTNH_F_ONLINK
    return args


def reconcile_routes(desired: set[Route]) -> Diff:
    """Make the kernel's Tulle node routes equal to desired; return what changed."""
    with IPRoute() as ipr:
        change = diff(desired, actual_routes(ipr))
        desired_dsts = {r.dst for r in desired}
        for route in change.remove:
            if route.dst in desired_dsts:
                continue  # replaced below, without a moment with no route
            try:
                ipr.route("del", **_route_args(ipr, route))
            except NetlinkError as exc:
                if exc.code != 3:  # ESRCH: gone already
                    raise
        for route in change.add:
            try:
                ipr.route("replace", **_route_args(ipr, route))
            except NetlinkError as exc:
                log.warning("cannot install route", extra={"route": route.dst, "error": str(exc)})
    return change


# -- neighbours and FDB entries on the VXLAN devices --------------------------------------------


def reconcile_neighbours(desired: set[Neighbour], devices: list[str]) -> Diff:
    with IPRoute() as ipr:
        actual: set[Neighbour] = set()
        indexes = {}
        for dev in devices:
            idx = _index(ipr, dev)
            if idx is None:
                continue
            indexes[dev] = idx
            for msg in ipr.get_neighbours(ifindex=idx):
                if msg["state"] & NUD_PERMANENT and msg.get("lladdr") and msg.get("dst"):
                    actual.add(Neighbour(dev=dev, address=msg.get("dst"), mac=msg.get("lladdr")))
        change = diff({n for n in desired if n.dev in indexes}, actual)
        for n in change.remove:
            family = socket.AF_INET if ipaddress.ip_address(n.address).version == 4 else socket.AF_INET6
            try:
                ipr.neigh("del", dst=n.address, ifindex=indexes[n.dev], family=family)
            except NetlinkError:
                pass
        for n in change.add:
            family = socket.AF_INET if ipaddress.ip_address(n.address).version == 4 else socket.AF_INET6
            ipr.neigh(
                "replace",
                dst=n.address,
                lladdr=n.mac,
                ifindex=indexes[n.dev],
                state=NUD_PERMANENT,
                family=family,
            )
    return change


def reconcile_fdb(desired: set[FdbEntry], devices: list[str]) -> Diff:
    with IPRoute() as ipr:
        actual: set[FdbEntry] = set()
        indexes = {}
        for dev in devices:
            idx = _index(ipr, dev)
            if idx is None:
                continue
            indexes[dev] = idx
            for msg in ipr.fdb("dump", ifindex=idx):
                if msg.get("ifindex") == idx and msg.get("dst") and msg.get("lladdr"):
                    actual.add(FdbEntry(dev=dev, mac=msg.get("lladdr"), dst=msg.get("dst")))
        change = diff({f for f in desired if f.dev in indexes}, actual)
        for f in change.remove:
            try:
                ipr.fdb("del", ifindex=indexes[f.dev], lladdr=f.mac, dst=f.dst)
            except NetlinkError:
                pass
        for f in change.add:
            ipr.fdb("append", ifindex=indexes[f.dev], lladdr=f.mac, dst=f.dst, state=NUD_PERMANENT)
    return change
