"""The pod's interface: a veth pair from the node into the pod's namespace (the only code that
plumbs pods into the kernel).

Routed, like Calico: the pod gets its addresses as /32 and /128 and a default route to a
link-local gateway (169.254.1.1, fe80::1) answered by the host side of the veth, whose MAC is
fixed. Both sides get permanent neighbour entries, so no ARP or NDP is needed before the first
packet; the node routes each pod address to its veth. No bridge: every pod has its own
interface on the node, which is where policy is enforced.
"""

from __future__ import annotations

import errno
import ipaddress
import socket
from dataclasses import dataclass

from pyroute2.netlink.exceptions import NetlinkError

from tulle.dataplane import host
from tulle.dataplane.netlink import IPRoute
from tulle.dataplane.netns import NetnsGone, run_in_netns

RTPROT_TULLE_POD = 212  # marks routes to pods (211 is for routes to other nodes, see dataplane/routing.py)
GATEWAY_V4 = "169.254.1.1"
GATEWAY_V6 = "fe80::1"
HOST_MAC = "ee:ee:ee:ee:ee:ee"
IFA_F_NODAD = 0x02
NUD_PERMANENT = 0x80


class PodNetError(Exception):
    pass


@dataclass(frozen=True)
class PodInterface:
    netns: str
    ifname: str
    host_ifname: str
    addresses: tuple[str, ...]  # pod addresses with prefix length: 10.244.1.5/32, fd00::5/128
    mtu: int


def _addresses(pod: PodInterface) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    return [ipaddress.ip_interface(a) for a in pod.addresses]


def _index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return int(found[0]) if found else None


def _pod_side(pod: PodInterface) -> str:
    """Configure the pod's end inside its namespace; return its MAC."""
    with IPRoute() as ipr:
        idx = _index(ipr, pod.ifname)
        if idx is None:
            raise PodNetError(f"interface {pod.ifname} did not arrive in {pod.netns}")
        for iface in _addresses(pod):
            flags = IFA_F_NODAD if iface.version == 6 else 0
            ipr.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, flags=flags)
        ipr.link("set", index=idx, state="up")
        families = {iface.version for iface in _addresses(pod)}
        if 4 in families:
            ipr.neigh("add", dst=GATEWAY_V4, lladdr=HOST_MAC, ifindex=idx, state=NUD_PERMANENT)
            ipr.route("add", dst=f"{GATEWAY_V4}/32", oif=idx, scope="link")
            ipr.route("add", dst="0.0.0.0/0", gateway=GATEWAY_V4, oif=idx)
        if 6 in families:
            ipr.neigh(
                "add",
                dst=GATEWAY_V6,
                lladdr=HOST_MAC,
                ifindex=idx,
                state=NUD_PERMANENT,
                family=socket.AF_INET6,
            )
            ipr.route("add", dst="::/0", gateway=GATEWAY_V6, oif=idx, family=socket.AF_INET6)
        link = ipr.get_links(idx)[0]
        return str(link.get("address"))


def _configure_host_side(ipr: IPRoute, idx: int, pod: PodInterface, pod_mac: str) -> None:
    """Write the node's end: up, the IPv6 gateway address, a route and a neighbour per address."""
    ipr.link("set", index=idx, state="up")
    if any(iface.version == 6 for iface in _addresses(pod)):
        try:
            ipr.addr("add", index=idx, address=GATEWAY_V6, prefixlen=64, flags=IFA_F_NODAD)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
    for iface in _addresses(pod):
        family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
        dst = str(iface.ip)
        ipr.route(
            "replace",
            dst=f"{dst}/{iface.max_prefixlen}",
            oif=idx,
            scope="link",
            proto=RTPROT_TULLE_POD,
            family=family,
        )
        ipr.neigh("replace", dst=dst, lladdr=pod_mac, ifindex=idx, state=NUD_PERMANENT, family=family)


def repair_host_sides(pods: list[tuple[PodInterface, str]]) -> dict[str, list[str]]:
    """Make the node's end of every pod's veth as it must be; return what had to change, per pod.

    Reads the kernel once (links, addresses, routes, neighbours) and writes only what is
    missing or wrong, so that a restarted agent brings back a route deleted while it was down
    and touches nothing that is right. Pods whose host interface is gone are reported as such.
    """
    changed: dict[str, list[str]] = {}
    if not pods:
        return changed
    with IPRoute() as ipr:
        links = {link.get("ifname"): link for link in ipr.get_links()}
        gw6 = {a["index"] for a in ipr.get_addr(family=socket.AF_INET6) if a.get("address") == GATEWAY_V6}
        routes = {
            (r["family"], r.get("dst"), r.get("oif"))
            for family in (socket.AF_INET, socket.AF_INET6)
            for r in ipr.get_routes(family=family, table=254, proto=RTPROT_TULLE_POD)
        }
        neighbours = {
            (n.get("ifindex"), n.get("dst")): (n.get("lladdr"), n["state"])
            for family in (socket.AF_INET, socket.AF_INET6)
            for n in ipr.get_neighbours(family=family)
        }
        for pod, mac in pods:
            link = links.get(pod.host_ifname)
            if link is None:
                changed[pod.host_ifname] = ["host interface missing"]
                continue
            idx = link["index"]
            todo = []
            if link.get("state") != "up":
                todo.append("link up")
            for iface in _addresses(pod):
                family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
                if iface.version == 6 and idx not in gw6:
                    todo.append(f"address {GATEWAY_V6}")
                if (family, str(iface.ip), idx) not in routes:
                    todo.append(f"route {iface.ip}")
                if neighbours.get((idx, str(iface.ip))) != (mac, NUD_PERMANENT):
                    todo.append(f"neighbour {iface.ip}")
            if todo:
                try:
                    _configure_host_side(ipr, idx, pod, mac)
                except NetlinkError as exc:  # deleted meanwhile by a DEL: nothing to repair
                    todo.append(f"failed: {exc}")
                changed[pod.host_ifname] = todo
    return changed


def create(pod: PodInterface) -> str:
    """Create the veth pair and configure both ends; return the pod side's MAC.

    All or nothing: on any failure the pair is deleted again.
    """

    def pod_has_ifname() -> bool:
        with IPRoute() as ipr:
            return _index(ipr, pod.ifname) is not None

    if run_in_netns(pod.netns, pod_has_ifname):
        raise PodNetError(f"interface {pod.ifname} already exists in {pod.netns}")
    with IPRoute() as ipr:
        if _index(ipr, pod.host_ifname) is not None:
            # Left over from an ADD that failed half-way for this very attachment.
            ipr.link("del", ifname=pod.host_ifname)
        with open(pod.netns) as ns:
            try:
                ipr.link(
                    "add",
                    ifname=pod.host_ifname,
                    kind="veth",
                    address=HOST_MAC,
                    mtu=pod.mtu,
                    peer={"ifname": pod.ifname, "net_ns_fd": ns.fileno(), "mtu": pod.mtu},
                )
            except NetlinkError as exc:
                raise PodNetError(f"cannot create the veth pair {pod.host_ifname}: {exc}") from exc
    try:
        mac = run_in_netns(pod.netns, lambda: _pod_side(pod))
        with IPRoute() as ipr:
            idx = _index(ipr, pod.host_ifname)
            if idx is None:
                raise PodNetError(f"host interface {pod.host_ifname} vanished while the pod was plumbed")
            _configure_host_side(ipr, idx, pod, mac)
        return mac
    except BaseException:
        delete(pod.host_ifname)
        raise


def delete(host_ifname: str) -> bool:
    """Delete the pair by its host side (the pod side goes with it); False if it was not there."""
    return host.delete_links([host_ifname]) == 1


def host_side_exists(host_ifname: str) -> bool:
    with IPRoute() as ipr:
        return _index(ipr, host_ifname) is not None


def check(pod: PodInterface, expect_routes: list[str]) -> list[str]:
    """What is missing or wrong, for CNI CHECK; an empty list means all is as the ADD left it."""
    problems: list[str] = []
    with IPRoute() as ipr:
        idx = _index(ipr, pod.host_ifname)
        if idx is None:
            return [f"host interface {pod.host_ifname} is missing"]
        for iface in _addresses(pod):
            family = socket.AF_INET if iface.version == 4 else socket.AF_INET6
            if not [
                r
                for r in ipr.get_routes(family=family, table=254, oif=idx)
                if r.get("dst") == str(iface.ip) and r.get("dst_len") == iface.max_prefixlen
            ]:
                problems.append(f"the node has no route to {iface.ip} via {pod.host_ifname}")

    def inside() -> list[str]:
        found: list[str] = []
        with IPRoute() as ipr:
            idx = _index(ipr, pod.ifname)
            if idx is None:
                return [f"interface {pod.ifname} is missing in {pod.netns}"]
            have = {f"{a.get('address')}/{a['prefixlen']}" for a in ipr.get_addr(index=idx)}
            for iface in _addresses(pod):
                if str(iface) not in have:
                    found.append(f"address {iface} is missing on {pod.ifname} in {pod.netns}")
            for dst in expect_routes:
                net = ipaddress.ip_network(dst)
                family = socket.AF_INET if net.version == 4 else socket.AF_INET6
                routes = [
                    r
                    for r in ipr.get_routes(family=family, table=254)
                    if r.get("dst_len") == net.prefixlen
                    and (net.prefixlen == 0 or r.get("dst") == str(net.network_address))
                ]
                if not routes:
                    found.append(f"route {dst} is missing in {pod.netns}")
        return found

    try:
        problems.extend(run_in_netns(pod.netns, inside))
    except NetnsGone:
        problems.append(f"network namespace {pod.netns} does not exist")
    return problems
