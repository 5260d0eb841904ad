"""The physical limit here: two namespaces joined by one veth pair."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from tulle.lab import topology

from .common import bench_name


@contextmanager
def direct_veth_pair() -> Iterator[tuple[str, str, str]]:
    """(client netns path, server netns path, server address), removed at the end."""
    name = bench_name("vp")
    a, b = f"{name}-a", f"{name}-b"
    try:
        topology.add_netns(a)
        topology.add_netns(b)
        topology.ip("link", "add", f"{name}a", "netns", a, "type", "veth", "peer", "name", f"{name}b", "netns", b)
        topology.ip("addr", "add", "10.99.0.1/24", "dev", f"{name}a", netns=a)
        topology.ip("addr", "add", "10.99.0.2/24", "dev", f"{name}b", netns=b)
        topology.ip("link", "set", f"{name}a", "up", netns=a)
        topology.ip("link", "set", f"{name}b", "up", netns=b)
        yield f"/run/netns/{a}", f"/run/netns/{b}", "10.99.0.2"
    finally:
        topology.del_netns(a)
        topology.del_netns(b)
