"""Reference paths measured in the same run as Tulle's: the physical limit here (two namespaces
joined by one veth pair), and the same pod-node-node-pod shape as a lab built by hand from
kernel parts only (static routes or a static VXLAN, no agent, no nftables), which tells what
the machine itself costs for that shape and so what is Tulle's own cost on top."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

from tulle.lab import topology

from .common import bench_name

ip = topology.ip


def _link_address(netns: str, dev: str) -> str:
    return str(json.loads(ip("-j", "link", "show", dev, netns=netns).stdout)[0]["address"])


def _fdb_add(netns: str, mac: str, dev: str, dst: str) -> None:
    subprocess.run(["bridge", "-n", netns, "fdb", "add", mac, "dev", dev, "dst", dst], check=True, capture_output=True)


@contextmanager
def direct_veth_pair() -> Iterator[tuple[str, str, str]]:
    """(client netns path, server netns path, server address), removed at the end."""
    name = bench_name("vp")
    a, b = f"{name}-a", f"{name}-b"
    try:
        topology.add_netns(a)
        topology.add_netns(b)
        ip("link", "add", f"{name}a", "netns", a, "type", "veth", "peer", "name", f"{name}b", "netns", b)
        ip("addr", "add", "10.99.0.1/24", "dev", f"{name}a", netns=a)
        ip("addr", "add", "10.99.0.2/24", "dev", f"{name}b", netns=b)
        ip("link", "set", f"{name}a", "up", netns=a)
        ip("link", "set", f"{name}b", "up", netns=b)
        yield f"/run/netns/{a}", f"/run/netns/{b}", "10.99.0.2"
    finally:
        topology.del_netns(a)
        topology.del_netns(b)


@contextmanager
def kernel_only_path(vxlan: bool) -> Iterator[tuple[str, str, str]]:
    """Two pods on two nodes, the nodes' uplinks macvlans on one switch as in the lab; between
    the nodes either host routes (host-gw) or a VXLAN device with static FDB and neighbour
    entries (pod MTU 1450). (client netns path, server netns path, server address)."""
    name = bench_name("vx" if vxlan else "rt")
    underlay = f"{name}-u"
    nodes = {i: f"{name}-n{i}" for i in (1, 2)}
    pods = {i: f"{name}-p{i}" for i in (1, 2)}
    namespaces = [underlay, *nodes.values(), *pods.values()]
    mtu = "1450" if vxlan else "1500"
    try:
        for netns in namespaces:
            topology.add_netns(netns)
        ip("link", "add", f"{name}sw", "type", "veth", "peer", "name", f"{name}sp", netns=underlay)
        for dev in (f"{name}sw", f"{name}sp"):
            ip("link", "set", dev, "up", netns=underlay)
        for i, node in nodes.items():
            uplink = f"{name}u{i}"
            ip("link", "add", uplink, "link", f"{name}sw", "type", "macvlan", "mode", "bridge", netns=underlay)
            ip("link", "set", uplink, "netns", node, netns=underlay)
            ip("addr", "add", f"172.31.0.{i}/24", "dev", uplink, netns=node)
            ip("link", "set", uplink, "up", netns=node)
            topology.sysctl(node, "net.ipv4.ip_forward", "1")
            host, pod = f"{name}h{i}", f"{name}e{i}"
            ip("link", "add", host, "mtu", mtu, "type", "veth", "peer", "name", pod, "netns", pods[i], netns=node)
            ip("link", "set", pod, "mtu", mtu, "up", netns=pods[i])
            ip("addr", "add", f"10.77.{i}.2/32", "dev", pod, netns=pods[i])
            ip("route", "add", "169.254.1.1", "dev", pod, "scope", "link", netns=pods[i])
            ip("route", "add", "default", "via", "169.254.1.1", "dev", pod, netns=pods[i])
            ip("link", "set", host, "up", netns=node)
            ip("addr", "add", "169.254.1.1/32", "dev", host, netns=node)
            ip("route", "add", f"10.77.{i}.2/32", "dev", host, netns=node)
            if vxlan:
                ip("link", "add", f"{name}v", "type", "vxlan", "id", "42", "local", f"172.31.0.{i}", "dstport",
                   "4789", "nolearning", "dev", uplink, netns=node)  # fmt: skip
                ip("link", "set", f"{name}v", "mtu", "1450", "up", netns=node)
                ip("addr", "add", f"10.77.{i}.0/32", "dev", f"{name}v", netns=node)
        for i, node in nodes.items():
            j = 3 - i
            if vxlan:
                peer_mac = _link_address(nodes[j], f"{name}v")
                ip("neigh", "add", f"10.77.{j}.0", "lladdr", peer_mac, "dev", f"{name}v", netns=node)
                _fdb_add(node, peer_mac, f"{name}v", f"172.31.0.{j}")
                ip("route", "add", f"10.77.{j}.0/24", "via", f"10.77.{j}.0", "dev", f"{name}v", "onlink", netns=node)
            else:
                ip("route", "add", f"10.77.{j}.0/24", "via", f"172.31.0.{j}", netns=node)
        yield f"/run/netns/{pods[1]}", f"/run/netns/{pods[2]}", "10.77.2.2"
    finally:
        for netns in namespaces:
            topology.del_netns(netns)
