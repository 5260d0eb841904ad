"""A node's routing state as plain data: routes, neighbours, FDB entries, VXLAN devices (pure).

routing/compile.py computes them from the cluster; dataplane/routing.py makes the kernel match.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

VXLAN_VNI = 4096
VXLAN_PORT = 4789  # IANA's
VXLAN_OVERHEAD = {4: 50, 6: 70}  # per underlay family: outer IP + UDP + VXLAN + inner Ethernet


@dataclass(frozen=True, order=True)
class Route:
    """A route in the main table: via a gateway, onlink through a device, or a blackhole."""

    dst: str
    gateway: str = ""
    dev: str = ""
    onlink: bool = False
    blackhole: bool = False

    @property
    def family(self) -> int:
        return ipaddress.ip_network(self.dst).version


@dataclass(frozen=True, order=True)
class Neighbour:
    """A permanent neighbour entry: address -> MAC on a device."""

    dev: str
    address: str
    mac: str


@dataclass(frozen=True, order=True)
class FdbEntry:
    """A permanent FDB entry of a VXLAN device: inner MAC -> outer (underlay) destination."""

    dev: str
    mac: str
    dst: str


@dataclass(frozen=True)
class VxlanDevice:
    """A VXLAN device as Tulle wants it: no learning, no multicast; peers come from FDB entries."""

    name: str
    family: int
    local: str  # our underlay address
    underlay_ifname: str
    mac: str
    mtu: int
    tunnel_address: str  # the node's address on the device, from its own block
    vni: int = VXLAN_VNI
    port: int = VXLAN_PORT

    @property
    def tunnel_prefixlen(self) -> int:
        return 32 if self.family == 4 else 128
