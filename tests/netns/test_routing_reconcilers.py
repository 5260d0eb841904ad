"""The routing reconcilers in a real kernel: what they read back is what they wrote, so a second
reconcile changes nothing, and drift is repaired by exactly the difference.

Everything happens in one namespace named `trr...`, created and removed here; its underlay is a
veth pair whose far end stays inside the same namespace.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tulle.dataplane.netlink import IPRoute
from tulle.dataplane.netns import run_in_netns
from tulle.dataplane.routing import (
    Diff,
    EntryChange,
    FdbReconciler,
    NeighbourReconciler,
    NodeChangeWriter,
    RouteReconciler,
    VxlanDeviceReconciler,
    VxlanPlan,
)
from tulle.kernelstate.net import FdbEntry, Neighbour, Route, VxlanDevice

pytestmark = pytest.mark.root

UNDERLAY = "trr-eth0"
DEV4 = VxlanDevice("tulle-vxlan4", 4, "172.30.1.2", UNDERLAY, "02:00:00:00:01:04", 1450, "10.244.0.0")
DEV6 = VxlanDevice("tulle-vxlan6", 6, "fd30:1::2", UNDERLAY, "02:00:00:00:01:06", 1430, "fd00:10:244::")
ROUTES = {
    Route("10.244.0.0/26", blackhole=True),
    Route("fd00:10:244::/122", blackhole=True),
    Route("10.244.1.0/26", gateway="172.30.1.3"),
    Route("fd00:10:244::40/122", gateway="fd30:1::3"),
    Route("10.244.2.0/26", gateway="10.244.2.0", dev="tulle-vxlan4", onlink=True),
    Route("fd00:10:244::80/122", gateway="fd00:10:244::80", dev="tulle-vxlan6", onlink=True),
}
NEIGHBOURS = {
    Neighbour("tulle-vxlan4", "10.244.2.0", "02:00:00:00:02:04"),
    Neighbour("tulle-vxlan6", "fd00:10:244::80", "02:00:00:00:02:06"),
}
FDB = {
    FdbEntry("tulle-vxlan4", "02:00:00:00:02:04", "172.30.2.3"),
    FdbEntry("tulle-vxlan6", "02:00:00:00:02:06", "fd30:2::3"),
}
DEVICES = ["tulle-vxlan4", "tulle-vxlan6"]
Inside = Callable[[Callable[[], Any]], Any]  # runs a function in the test's namespace


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture()
def inside() -> Iterator[Inside]:
    """Runs a function inside a fresh namespace with an underlay link that has addresses."""
    name = f"trr{secrets.token_hex(3)}"
    _ip("netns", "add", name)
    path = f"/run/netns/{name}"
    try:

        def setup() -> None:
            _ip("link", "set", "lo", "up")
            _ip("link", "add", UNDERLAY, "type", "veth", "peer", "name", "trr-peer")
            _ip("addr", "add", "172.30.1.2/24", "dev", UNDERLAY)
            _ip("-6", "addr", "add", "fd30:1::2/64", "dev", UNDERLAY, "nodad")
            _ip("link", "set", "trr-peer", "up")
            _ip("link", "set", UNDERLAY, "up")

        run_in_netns(path, setup)
        yield lambda fn: run_in_netns(path, fn)
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def reconcile() -> tuple[VxlanPlan, VxlanPlan, Diff[Route], Diff[Neighbour], Diff[FdbEntry]]:
    plans = VxlanDeviceReconciler().apply(DEV4), VxlanDeviceReconciler().apply(DEV6)
    return (
        *plans,
        RouteReconciler().apply(ROUTES),
        NeighbourReconciler().apply(NEIGHBOURS, DEVICES),
        FdbReconciler().apply(FDB, DEVICES),
    )


def test_a_second_reconcile_changes_nothing(inside: Inside) -> None:
    first = inside(reconcile)
    assert all(first)
    assert first[2] == Diff(add=sorted(ROUTES), remove=[])
    again = inside(reconcile)
    assert not any(again), again


def test_drift_is_repaired_by_exactly_the_difference(inside: Inside) -> None:
    inside(reconcile)

    def drift() -> None:
        _ip("link", "set", "tulle-vxlan4", "mtu", "1400")
        _ip("addr", "add", "10.244.9.9/32", "dev", "tulle-vxlan4")
        _ip("route", "del", "10.244.1.0/26", "proto", "211")
        _ip("neigh", "replace", "10.244.2.0", "lladdr", "02:00:00:00:09:09", "dev", "tulle-vxlan4", "nud", "permanent")
        _ip("route", "add", "10.244.7.0/26", "via", "172.30.1.7", "proto", "211")

    inside(drift)
    dev4, dev6, routes, neighbours, fdb = inside(reconcile)
    assert dev4 == VxlanPlan(mtu=1450, remove_addresses=(("10.244.9.9", 32),))
    assert not dev6 and not fdb
    assert routes == Diff(
        add=[Route("10.244.1.0/26", gateway="172.30.1.3")], remove=[Route("10.244.7.0/26", "172.30.1.7")]
    )
    assert neighbours.add == [Neighbour("tulle-vxlan4", "10.244.2.0", "02:00:00:00:02:04")]
    assert not any(inside(reconcile))


def test_a_device_with_another_identity_is_recreated_and_removal_is_idempotent(
    inside: Inside,
) -> None:
    inside(reconcile)
    moved = VxlanDevice(DEV4.name, 4, DEV4.local, UNDERLAY, DEV4.mac, DEV4.mtu, DEV4.tunnel_address, vni=4097)
    assert inside(lambda: VxlanDeviceReconciler().apply(moved)).delete
    assert not inside(lambda: VxlanDeviceReconciler().apply(moved))
    assert inside(lambda: VxlanDeviceReconciler().remove(DEV4.name)) is True
    assert inside(lambda: VxlanDeviceReconciler().remove(DEV4.name)) is False


def test_one_nodes_change_written_as_a_batch_reads_back_as_the_full_reconcile_wants(inside: Inside) -> None:
    """The per-node writer and the full reconcilers agree: after the writer adds a node's entries
    a full reconcile of the same desired state changes nothing, and after it removes them nothing
    of that node is left; a delete of a route another node took over leaves that route alone."""
    remote = (
        {r for r in ROUTES if not r.blackhole},
        NEIGHBOURS,
        FDB,
    )

    def scenario() -> tuple[Any, ...]:
        VxlanDeviceReconciler().apply(DEV4)
        VxlanDeviceReconciler().apply(DEV6)
        writer = NodeChangeWriter()
        routes, neighbours, fdb = remote
        writer.write(EntryChange(tuple(sorted(routes)), (), tuple(sorted(neighbours)), (), tuple(sorted(fdb)), ()))
        again = (
            RouteReconciler().apply(set(routes)),
            NeighbourReconciler().apply(set(neighbours), DEVICES),
            FdbReconciler().apply(set(fdb), DEVICES),
        )
        taken_over = Route("10.244.1.0/26", gateway="172.30.1.9")  # the block moved to another node
        writer.write(EntryChange(routes_add=(taken_over,)))
        writer.write(EntryChange((), tuple(sorted(routes)), (), tuple(sorted(neighbours)), (), tuple(sorted(fdb))))
        with IPRoute() as ipr:
            left_routes = RouteReconciler.read(ipr)
            devices = {dev: socket.if_nametoindex(dev) for dev in DEVICES}
            left_neighbours = {n for dev, i in devices.items() for n in NeighbourReconciler().read(ipr, dev, i)}
            left_fdb = {f for dev, i in devices.items() for f in FdbReconciler().read(ipr, dev, i)}
        return again, left_routes, left_neighbours, left_fdb

    again, left_routes, left_neighbours, left_fdb = inside(scenario)
    assert not any(again), again
    assert left_routes == {Route("10.244.1.0/26", gateway="172.30.1.9")}
    assert left_neighbours == set() and left_fdb == set()
