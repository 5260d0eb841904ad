"""The lab's machines as network namespaces: an underlay router, nodes, an external host.

Address plan (the same in every lab; labs are apart because each lives in its own namespaces):
- underlay subnets 172.30.S.0/24 and fd30:S::/64, S = 1 and 2, router .1 / ::1 in the underlay
  namespace (it forwards between the subnets, like the switch and router of a small site);
- node i on subnet 1 or 2 at .10+i / ::a+i;
- the external host on its own subnet 172.30.100.0/24, fd30:100::/64, with routes to the
  underlay subnets only: it has no route back to the pods, so what it sees of pod traffic is
  the masqueraded node address.
Never the root namespace: every address and route here lives in a namespace the lab made.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,7}$")
NODE_RE = re.compile(r"^[a-z][a-z0-9-]{0,30}$")
EXT_SUBNET = 100
# Node i is at 172.30.S.(10 + i) (node_addresses): .254 is the last host address of the /24.
MAX_NODE_INDEX = 244


class TopologyError(Exception):
    pass


def ip(*args: str, netns: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = ["ip"] + (["-n", netns] if netns else []) + list(args)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise TopologyError(f"{' '.join(cmd)}: {proc.stderr.strip()}")
    return proc


def sysctl(netns: str, key: str, value: str) -> None:
    subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-qw", f"{key}={value}"], check=True, capture_output=True)


def netns_exists(name: str) -> bool:
    return os.path.exists(f"/run/netns/{name}")


def add_netns(name: str) -> None:
    if netns_exists(name):
        raise TopologyError(f"network namespace {name} exists already")
    ip("netns", "add", name)
    # Duplicate address detection would hold every new IPv6 address (and the neighbour
    # solicitations that need one) back for a second; in a lab nobody else has the address.
    for conf in ("all", "default"):
        sysctl(name, f"net.ipv6.conf.{conf}.accept_dad", "0")
    ip("link", "set", "lo", "up", netns=name)


def del_netns(name: str) -> None:
    if netns_exists(name):
        ip("netns", "del", name, check=False)


@dataclass(frozen=True)
class Names:
    lab: str

    @property
    def underlay(self) -> str:
        return f"{self.lab}-underlay"

    @property
    def external(self) -> str:
        return f"{self.lab}-ext"

    def node(self, node: str) -> str:
        return f"{self.lab}-{node}"

    def pod(self, namespace: str, pod: str) -> str:
        return f"{self.lab}-pod-{namespace}-{pod}"

    def switch(self, subnet: int) -> str:
        return f"{self.lab}-sw{subnet}"

    def switch_peer(self, subnet: int) -> str:
        return f"{self.lab}-sp{subnet}"

    def router_leg(self, subnet: int) -> str:
        return f"{self.lab}-g{subnet}"

    def uplink_outer(self, index: int) -> str:
        return f"{self.lab}-n{index}"

    @property
    def uplink(self) -> str:
        return f"{self.lab}-up"

    @property
    def external_outer(self) -> str:
        return f"{self.lab}-x"


def subnet_v4(subnet: int) -> str:
    return f"172.30.{subnet}"


def node_addresses(subnet: int, index: int) -> tuple[str, str]:
    return f"172.30.{subnet}.{10 + index}", f"fd30:{subnet}::{10 + index:x}"


def create_underlay(names: Names) -> None:
    """Two switches and a router between them, all in the underlay namespace.

    A switch is a veth pair whose one end is the parent of macvlan interfaces in bridge mode:
    one macvlan per node (moved into the node's namespace) and one for the router's leg, which
    holds the gateway address. Node to node on one switch is then a single hop, as on a real
    switch (a Linux bridge between veth pairs costs ~10% of throughput here), and the macvlans
    pass GSO UDP-tunnel (VXLAN) super-packets whole, as a routed bridge device would not."""
    add_netns(names.underlay)
    sysctl(names.underlay, "net.ipv4.ip_forward", "1")
    sysctl(names.underlay, "net.ipv6.conf.all.forwarding", "1")
    for subnet in (1, 2):
        switch, other_end = names.switch(subnet), names.switch_peer(subnet)
        gateway = names.router_leg(subnet)
        ip("link", "add", switch, "type", "veth", "peer", "name", other_end, netns=names.underlay)
        ip("link", "set", switch, "up", netns=names.underlay)
        ip("link", "set", other_end, "up", netns=names.underlay)
        ip("link", "add", gateway, "link", switch, "type", "macvlan", "mode", "bridge", netns=names.underlay)
        ip("addr", "add", f"{subnet_v4(subnet)}.1/24", "dev", gateway, netns=names.underlay)
        ip("addr", "add", f"fd30:{subnet}::1/64", "dev", gateway, "nodad", netns=names.underlay)
        ip("link", "set", gateway, "up", netns=names.underlay)


def create_external(names: Names) -> tuple[str, str]:
    add_netns(names.external)
    outer, inner = names.external_outer, names.uplink
    ip(
        "link",
        "add",
        outer,
        "netns",
        names.underlay,
        "type",
        "veth",
        "peer",
        "name",
        inner,
        "netns",
        names.external,
    )
    ip("addr", "add", f"172.30.{EXT_SUBNET}.1/24", "dev", outer, netns=names.underlay)
    ip("addr", "add", f"fd30:{EXT_SUBNET}::1/64", "dev", outer, "nodad", netns=names.underlay)
    ip("link", "set", outer, "up", netns=names.underlay)
    ip("addr", "add", f"172.30.{EXT_SUBNET}.2/24", "dev", inner, netns=names.external)
    ip("addr", "add", f"fd30:{EXT_SUBNET}::2/64", "dev", inner, "nodad", netns=names.external)
    ip("link", "set", inner, "up", netns=names.external)
    # Routes to the underlay subnets only: no route to any pod address.
    for subnet in (1, 2):
        ip("route", "add", f"{subnet_v4(subnet)}.0/24", "via", f"172.30.{EXT_SUBNET}.1", netns=names.external)
        ip("-6", "route", "add", f"fd30:{subnet}::/64", "via", f"fd30:{EXT_SUBNET}::1", netns=names.external)
    return f"172.30.{EXT_SUBNET}.2", f"fd30:{EXT_SUBNET}::2"


def create_node(names: Names, node: str, index: int, subnet: int) -> tuple[str, str]:
    ns = names.node(node)
    add_netns(ns)
    outer, inner = names.uplink_outer(index), names.uplink
    v4, v6 = node_addresses(subnet, index)
    # made on the switch in the underlay, then moved into the node under its final name
    ip("link", "add", outer, "link", names.switch(subnet), "type", "macvlan", "mode", "bridge", netns=names.underlay)
    ip("link", "set", outer, "netns", ns, netns=names.underlay)
    ip("link", "set", outer, "name", inner, netns=ns)
    ip("addr", "add", f"{v4}/24", "dev", inner, netns=ns)
    ip("addr", "add", f"{v6}/64", "dev", inner, "nodad", netns=ns)
    ip("link", "set", inner, "up", netns=ns)
    ip("route", "add", "default", "via", f"{subnet_v4(subnet)}.1", netns=ns)
    ip("-6", "route", "add", "default", "via", f"fd30:{subnet}::1", netns=ns)
    return v4, v6


def delete_node(names: Names, node: str, index: int) -> None:
    del_netns(names.node(node))  # its uplink (a macvlan) goes with the namespace


def lab_namespaces(lab: str) -> list[str]:
    """Every namespace on this machine whose name marks it as this lab's."""
    try:
        present = os.listdir("/run/netns")
    except FileNotFoundError:
        return []
    return sorted(n for n in present if n.startswith(f"{lab}-"))
