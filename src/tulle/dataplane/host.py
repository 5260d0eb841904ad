"""The node's own settings and links: forwarding, listing and deleting interfaces, its addresses.

Everything here acts on the network namespace of the calling thread (the node's).
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from tulle.dataplane.netlink import IPRoute

FORWARDING_SYSCTLS = ("/proc/sys/net/ipv4/ip_forward", "/proc/sys/net/ipv6/conf/all/forwarding")


def enable_forwarding() -> None:
    """Let the node route between its pods, its other nodes and the world, IPv4 and IPv6."""
    for path in FORWARDING_SYSCTLS:
        with open(path, "w") as f:
            f.write("1")


def link_names() -> list[str]:
    """The names of every interface of the node.

    >>> "lo" in link_names()  # doctest: +SKIP
    True
    """
    with IPRoute() as ipr:
        return [str(link.get("ifname")) for link in ipr.get_links()]


def delete_links(names: Iterable[str]) -> int:
    """Delete the interfaces (a veth takes its peer with it); return how many were deleted.

    One that is gone already (deleted meanwhile, or with its peer) is not an error.
    """
    deleted = 0
    with IPRoute() as ipr:
        for name in names:
            found = ipr.link_lookup(ifname=name)
            if not found:
                continue
            try:
                ipr.link("del", index=found[0])
            except NetlinkError as exc:
                if exc.code != errno.ENODEV:
                    raise
                continue
            deleted += 1
    return deleted


def node_addresses() -> list[str]:
    """Every address of the node: the node's own traffic comes from them."""
    with IPRoute() as ipr:
        return [str(a.get_attr("IFA_ADDRESS")) for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS")]


@dataclass(frozen=True)
class Underlay:
    """The interface the node's other nodes are reached through, its addresses and MTU."""

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
    """The named interface, or the one of the default route (IPv4 first)."""
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
