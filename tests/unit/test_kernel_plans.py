"""The reconcilers' plans, without root: pure `plan` functions, and whole reconciles against fake
executors (a fake nft runner, a fake IPRoute) that record what would be sent to the kernel."""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

import pytest

from tulle.dataplane.nft import NftReconciler, as_actual, plan, read_table
from tulle.dataplane.podnet import IFA_F_NODAD, NUD_PERMANENT
from tulle.dataplane.routing import (
    RTNH_F_ONLINK,
    RTPROT_TULLE_NODE,
    Diff,
    FdbReconciler,
    NeighbourReconciler,
    RouteReconciler,
    VxlanDeviceReconciler,
    VxlanLink,
    VxlanPlan,
    plan_device_entries,
    plan_routes,
    plan_vxlan,
)
from tulle.kernelstate.net import VXLAN_PORT, VXLAN_VNI, FdbEntry, Neighbour, Route, VxlanDevice
from tulle.kernelstate.nft import NftChain, NftError, NftSet, NftTable

# -- nftables ------------------------------------------------------------------------------------

UDP_ACCEPT = ({"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}}, {"accept": None})
DROP = ({"drop": None},)


def table(
    endpoints: Iterable[str] = ("10.0.0.2",),
    input_rules: tuple[Any, ...] = (UDP_ACCEPT,),
    counters: Iterable[str] = ("drop_x",),
) -> NftTable:
    return NftTable(
        chains={
            "input": NftChain("input", input_rules, ("filter", "input", 0, "accept")),
            "isolated": NftChain("isolated", (DROP,)),
        },
        sets={
            "endpoints": NftSet(
                "endpoints", ("ipv4_addr",), (), "verdict", frozenset(((a,), ("jump", "isolated")) for a in endpoints)
            ),
            "ports": NftSet(
                "ports",
                ("ipv4_addr", "inet_proto", "inet_service"),
                ("interval",),
                None,
                frozenset({(("10.0.0.2", "10.0.0.2"), ("tcp", "tcp"), (80, 90))}),
            ),
            "atoms": NftSet(
                "atoms", ("ipv4_addr",), ("interval",), "mark", frozenset({((("10.0.0.0", "10.0.0.255"),), 7)})
            ),
        },
        counters=frozenset(counters),
    )


# `nft -j list table inet tulle` (nft 1.0.6) after table() was applied: nft lists the interval
# as a prefix and the single values of the concatenation as plain values.
LISTING: list[dict[str, Any]] = [
    {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
    {"table": {"family": "inet", "name": "tulle", "handle": 1}},
    {"counter": {"family": "inet", "name": "drop_x", "table": "tulle", "handle": 1, "packets": 3, "bytes": 180}},
    {
        "map": {
            "family": "inet",
            "name": "atoms",
            "table": "tulle",
            "type": "ipv4_addr",
            "handle": 2,
            "map": "mark",
            "flags": ["interval"],
            "elem": [[{"prefix": {"addr": "10.0.0.0", "len": 24}}, 7]],
        }
    },
    {
        "map": {
            "family": "inet",
            "name": "endpoints",
            "table": "tulle",
            "type": "ipv4_addr",
            "handle": 3,
            "map": "verdict",
            "elem": [["10.0.0.2", {"jump": {"target": "isolated"}}]],
        }
    },
    {
        "set": {
            "family": "inet",
            "name": "ports",
            "table": "tulle",
            "type": ["ipv4_addr", "inet_proto", "inet_service"],
            "handle": 4,
            "flags": ["interval"],
            "elem": [{"concat": ["10.0.0.2", 6, {"range": [80, 90]}]}],
        }
    },
    {
        "chain": {
            "family": "inet",
            "table": "tulle",
            "name": "input",
            "handle": 5,
            "type": "filter",
            "hook": "input",
            "prio": 0,
            "policy": "accept",
        }
    },
    {"chain": {"family": "inet", "table": "tulle", "name": "isolated", "handle": 6}},
    {
        "rule": {
            "family": "inet",
            "table": "tulle",
            "chain": "input",
            "handle": 7,
            "comment": "t:ba5ea7fa9b734e06",
            "expr": [{"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": 17}}, {"accept": None}],
        }
    },
    {
        "rule": {
            "family": "inet",
            "table": "tulle",
            "chain": "isolated",
            "handle": 8,
            "comment": "t:44dcd83d9e9fa2b4",
            "expr": [{"drop": None}],
        }
    },
]


class FakeNft:
    """An NftRunner whose kernel is a listing; records every transaction it is sent."""

    def __init__(self, listing: list[dict[str, Any]] | None = None, refuse: bool = False) -> None:
        self.listing = listing
        self.refuse = refuse
        self.reads = 0
        self.sent: list[list[dict[str, Any]]] = []

    def list_table(self, family: str = "inet", name: str = "tulle") -> list[dict[str, Any]] | None:
        self.reads += 1
        return self.listing

    def run(self, commands: list[dict[str, Any]]) -> None:
        if self.refuse:
            raise NftError("nftables refused the transaction: test")
        self.sent.append(commands)


def verbs(commands: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """(verb, object kind, name) of each command: the shape of a transaction."""
    out = []
    for command in commands:
        ((verb, body),) = command.items()
        ((kind, obj),) = body.items()
        out.append((verb, kind, obj.get("name") or obj.get("chain", "")))
    return out


def test_a_real_listing_reads_as_what_was_applied_and_plans_nothing() -> None:
    actual = read_table(LISTING)
    assert actual.counters == {"drop_x": (3, 180)}
    assert {n: s.elements for n, s in actual.sets.items()} == {
        n: s.elements for n, s in as_actual(table()).sets.items()
    }
    assert actual.chains == as_actual(table()).chains
    assert plan(table(), actual) == []


def test_no_table_plans_the_whole_table_in_dependency_order() -> None:
    got = verbs(plan(table(), read_table(None)))
    assert got[0] == ("add", "table", "tulle")
    # Objects before the elements and rules that reference them.
    first_rule = got.index(("add", "rule", "input"))
    assert got.index(("add", "chain", "isolated")) < got.index(("add", "element", "endpoints")) < first_rule
    assert got.index(("add", "map", "endpoints")) < got.index(("add", "element", "endpoints"))
    assert got.index(("add", "counter", "drop_x")) < first_rule


def test_an_element_change_touches_only_elements() -> None:
    commands = plan(table(endpoints=["10.0.0.3"]), read_table(LISTING))
    assert verbs(commands) == [("delete", "element", "endpoints"), ("add", "element", "endpoints")]
    assert commands[0]["delete"]["element"]["elem"] == [["10.0.0.2", {"jump": {"target": "isolated"}}]]
    assert commands[1]["add"]["element"]["elem"] == [["10.0.0.3", {"jump": {"target": "isolated"}}]]


def test_a_changed_chain_is_flushed_and_refilled_and_nothing_else() -> None:
    commands = plan(table(input_rules=(UDP_ACCEPT, DROP)), read_table(LISTING))
    assert verbs(commands) == [("flush", "chain", "input"), ("add", "rule", "input"), ("add", "rule", "input")]


def test_what_is_no_longer_wanted_is_deleted_after_what_references_it() -> None:
    want = NftTable(chains={"input": NftChain("input", (UDP_ACCEPT,), ("filter", "input", 0, "accept"))})
    got = verbs(plan(want, read_table(LISTING)))
    assert ("delete", "chain", "isolated") in got
    assert ("delete", "map", "endpoints") in got and ("delete", "set", "ports") in got
    assert ("delete", "counter", "drop_x") in got
    # The chain that jumps into the map's verdicts is emptied before the map goes.
    assert got.index(("flush", "chain", "isolated")) < got.index(("delete", "chain", "isolated"))
    assert not [v for v in got if v[0] == "add"]


def test_a_set_whose_definition_changed_is_recreated_with_its_elements() -> None:
    old = table()
    ports = old.sets["ports"]
    changed = NftTable(
        chains=old.chains,
        sets={**old.sets, "ports": NftSet("ports", ports.type, (), None, frozenset({("10.0.0.2", "tcp", 80)}))},
        counters=old.counters,
    )
    got = verbs(plan(changed, read_table(LISTING)))
    assert got.index(("delete", "set", "ports")) < got.index(("add", "set", "ports"))
    assert got.index(("add", "set", "ports")) < got.index(("add", "element", "ports"))


def test_reconciler_sends_only_the_difference_and_trusts_its_last_apply_when_not_verifying() -> None:
    nft = FakeNft(listing=None)
    reconciler = NftReconciler(nft)
    first = reconciler.apply(table())
    assert nft.sent == [first] and verbs(first)[0] == ("add", "table", "tulle")
    # Unverified: diffed against what the last apply left, without reading the kernel.
    reads = nft.reads
    assert reconciler.apply(table(), verify=False) == []
    second = reconciler.apply(table(endpoints=["10.0.0.3"]), verify=False)
    assert nft.reads == reads
    assert verbs(second) == [("delete", "element", "endpoints"), ("add", "element", "endpoints")]
    assert len(nft.sent) == 2  # an empty plan sends nothing
    # Verified: the kernel is read (here it has what LISTING lists), so drift is repaired.
    nft.listing = LISTING
    assert verbs(reconciler.apply(table(endpoints=["10.0.0.3"]))) == verbs(second)


def test_a_refused_transaction_makes_the_next_apply_read_the_kernel() -> None:
    nft = FakeNft(listing=LISTING, refuse=True)
    reconciler = NftReconciler(nft)
    with pytest.raises(NftError):
        reconciler.apply(table(endpoints=["10.0.0.3"]))
    nft.refuse = False
    reads = nft.reads
    reconciler.apply(table(endpoints=["10.0.0.3"]), verify=False)
    assert nft.reads == reads + 1


# -- a fake IPRoute ------------------------------------------------------------------------------


class FakeNetlink:
    """Just enough of pyroute2's IPRoute for the routing reconcilers; messages are plain dicts
    (pyroute2's messages answer `msg.get(...)` and `msg[...]` the same way). Records writes."""

    def __init__(self, links: dict[str, int] | None = None) -> None:
        self.links = dict(links or {})
        self.link_messages: dict[int, dict[Any, Any]] = {}
        self.addresses: dict[int, list[dict[str, Any]]] = {}
        self.routes: list[dict[str, Any]] = []
        self.neighbours: dict[int, list[dict[str, Any]]] = {}
        self.fdb_entries: list[dict[str, Any]] = []
        self.calls: list[tuple[str, str, dict[str, Any]]] = []

    def __enter__(self) -> FakeNetlink:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def link_lookup(self, **kwargs: Any) -> list[int]:
        return [self.links[kwargs["ifname"]]] if kwargs["ifname"] in self.links else []

    def get_links(self, *args: Any, **kwargs: Any) -> Any:
        return [self.link_messages.get(args[0], {"ifname": {v: k for k, v in self.links.items()}.get(args[0])})]

    def get_addr(self, **kwargs: Any) -> Any:
        return self.addresses.get(kwargs["index"], [])

    def get_routes(self, **kwargs: Any) -> Any:
        assert kwargs["proto"] == RTPROT_TULLE_NODE  # only Tulle's routes are read
        return [r for r in self.routes if r["family"] == kwargs["family"]]

    def get_neighbours(self, **kwargs: Any) -> Any:
        return self.neighbours.get(kwargs["ifindex"], [])

    def fdb(self, command: str, **kwargs: Any) -> Any:
        if command == "dump":
            return self.fdb_entries
        self.calls.append(("fdb", command, kwargs))
        return []

    def _record(self, what: str) -> Any:
        def record(command: str, **kwargs: Any) -> Any:
            self.calls.append((what, command, kwargs))
            if what == "link" and command == "add":
                self.links[kwargs["ifname"]] = 100
            return []

        return record

    def __getattr__(self, name: str) -> Any:
        if name in ("link", "addr", "route", "neigh"):
            return self._record(name)
        raise AttributeError(name)


def route_msg(dst: str, dst_len: int, **attrs: Any) -> dict[str, Any]:
    family = socket.AF_INET6 if ":" in dst else socket.AF_INET
    flags = RTNH_F_ONLINK if attrs.pop("onlink", False) else 0
    return {"family": family, "dst_len": dst_len, "flags": flags, "type": attrs.pop("type", 1), "dst": dst, **attrs}


# -- routes --------------------------------------------------------------------------------------


def test_route_plan_replaces_in_place_and_deletes_only_destinations_no_longer_wanted() -> None:
    old_gw = Route("10.244.1.0/26", gateway="172.30.1.3")
    new_gw = Route("10.244.1.0/26", gateway="10.244.1.0", dev="tulle-vxlan4", onlink=True)
    gone = Route("10.244.2.0/26", gateway="172.30.1.4")
    same = Route("10.244.0.0/26", blackhole=True)
    change = plan_routes({new_gw, same}, {old_gw, gone, same})
    assert change == Diff(add=[new_gw], remove=[gone])
    assert not plan_routes({same}, {same})


def test_route_reconciler_reads_tulle_routes_and_writes_the_difference() -> None:
    ipr = FakeNetlink(links={"eth0": 2, "tulle-vxlan4": 7})
    ipr.routes = [
        route_msg("10.244.0.0", 26, type=6),  # our blackhole
        route_msg("10.244.1.0", 26, gateway="10.244.1.0", oif=7, onlink=True),
        route_msg("10.244.2.0", 26, gateway="172.30.1.4", oif=2),
    ]
    want = {
        Route("10.244.0.0/26", blackhole=True),
        Route("10.244.1.0/26", gateway="10.244.1.0", dev="tulle-vxlan4", onlink=True),
        Route("fd00::100/122", gateway="fd30:1::c"),
    }
    assert RouteReconciler.read(ipr) == {
        Route("10.244.0.0/26", blackhole=True),
        Route("10.244.1.0/26", gateway="10.244.1.0", dev="tulle-vxlan4", onlink=True),
        Route("10.244.2.0/26", gateway="172.30.1.4"),
    }
    change = RouteReconciler(lambda: ipr).apply(want)
    assert change == Diff(
        add=[Route("fd00::100/122", gateway="fd30:1::c")], remove=[Route("10.244.2.0/26", "172.30.1.4")]
    )
    base = {"proto": RTPROT_TULLE_NODE, "table": 254}
    assert ipr.calls == [
        ("route", "del", {"dst": "10.244.2.0/26", **base, "family": socket.AF_INET, "gateway": "172.30.1.4"}),
        ("route", "replace", {"dst": "fd00::100/122", **base, "family": socket.AF_INET6, "gateway": "fd30:1::c"}),
    ]


def test_an_onlink_route_is_written_through_its_device() -> None:
    ipr = FakeNetlink(links={"tulle-vxlan4": 7})
    RouteReconciler(lambda: ipr).apply({Route("10.244.1.0/26", gateway="10.244.1.0", dev="tulle-vxlan4", onlink=True)})
    ((_, verb, args),) = ipr.calls
    assert verb == "replace" and args["oif"] == 7 and args["flags"] == RTNH_F_ONLINK


# -- neighbours and FDB entries: one diff ----------------------------------------------------------


def test_device_entry_plan_leaves_entries_of_missing_devices_waiting() -> None:
    here = Neighbour("tulle-vxlan4", "10.244.1.0", "02:00:00:00:00:01")
    moved = Neighbour("tulle-vxlan4", "10.244.1.0", "02:00:00:00:00:02")
    later = Neighbour("tulle-vxlan6", "fd00::100", "02:00:00:00:00:03")
    stray = Neighbour("tulle-vxlan4", "10.244.9.0", "02:00:00:00:00:09")
    change = plan_device_entries({moved, later}, {here, stray}, ["tulle-vxlan4"])
    assert change == Diff(add=[moved], remove=[here, stray])
    fdb = FdbEntry("tulle-vxlan4", "02:00:00:00:00:01", "172.30.2.13")
    assert plan_device_entries({fdb}, set(), []) == Diff(add=[], remove=[])
    assert plan_device_entries({fdb}, set(), ["tulle-vxlan4"]) == Diff(add=[fdb], remove=[])


def test_neighbour_reconciler_keeps_permanent_entries_that_are_right() -> None:
    ipr = FakeNetlink(links={"tulle-vxlan4": 7})
    ipr.neighbours[7] = [
        {"state": NUD_PERMANENT, "dst": "10.244.1.0", "lladdr": "02:00:00:00:00:01"},
        {"state": NUD_PERMANENT, "dst": "10.244.2.0", "lladdr": "02:00:00:00:00:02"},
        {"state": 0x02, "dst": "10.244.3.0", "lladdr": "02:00:00:00:00:03"},  # learnt, not ours
    ]
    keep = Neighbour("tulle-vxlan4", "10.244.1.0", "02:00:00:00:00:01")
    new = Neighbour("tulle-vxlan4", "10.244.4.0", "02:00:00:00:00:04")
    change = NeighbourReconciler(lambda: ipr).apply({keep, new}, ["tulle-vxlan4", "tulle-vxlan6"])
    assert change == Diff(add=[new], remove=[Neighbour("tulle-vxlan4", "10.244.2.0", "02:00:00:00:00:02")])
    assert ipr.calls == [
        ("neigh", "del", {"dst": "10.244.2.0", "ifindex": 7, "family": socket.AF_INET}),
        (
            "neigh",
            "replace",
            {
                "dst": "10.244.4.0",
                "lladdr": "02:00:00:00:00:04",
                "ifindex": 7,
                "state": NUD_PERMANENT,
                "family": socket.AF_INET,
            },
        ),
    ]


def test_fdb_reconciler_reads_only_its_devices_entries() -> None:
    ipr = FakeNetlink(links={"tulle-vxlan4": 7})
    ipr.fdb_entries = [
        {"ifindex": 7, "lladdr": "02:00:00:00:00:01", "dst": "172.30.2.13"},
        {"ifindex": 7, "lladdr": "02:00:00:00:00:02", "dst": "172.30.2.14"},
        {"ifindex": 3, "lladdr": "02:00:00:00:00:05", "dst": "172.30.2.15"},  # another device's
        {"ifindex": 7, "lladdr": "33:33:00:00:00:01"},  # no destination: the kernel's own
    ]
    keep = FdbEntry("tulle-vxlan4", "02:00:00:00:00:01", "172.30.2.13")
    moved = FdbEntry("tulle-vxlan4", "02:00:00:00:00:02", "172.30.1.14")
    change = FdbReconciler(lambda: ipr).apply({keep, moved}, ["tulle-vxlan4"])
    assert change == Diff(add=[moved], remove=[FdbEntry("tulle-vxlan4", "02:00:00:00:00:02", "172.30.2.14")])
    assert ipr.calls == [
        ("fdb", "del", {"ifindex": 7, "lladdr": "02:00:00:00:00:02", "dst": "172.30.2.14"}),
        ("fdb", "append", {"ifindex": 7, "lladdr": "02:00:00:00:00:02", "dst": "172.30.1.14", "state": NUD_PERMANENT}),
    ]


# -- VXLAN devices -------------------------------------------------------------------------------

WANT = VxlanDevice("tulle-vxlan4", 4, "172.30.1.2", "eth0", "02:00:00:00:00:01", 1450, "10.244.0.0")
V6 = VxlanDevice("tulle-vxlan6", 6, "fd30:1::2", "eth0", "02:00:00:00:00:02", 1430, "fd00::")


def link(want: VxlanDevice, **changes: Any) -> VxlanLink:
    have = {
        "vni": want.vni,
        "port": want.port,
        "local": want.local,
        "learning": False,
        "mtu": want.mtu,
        "mac": want.mac,
        "up": True,
        "addresses": frozenset({(want.tunnel_address, want.tunnel_prefixlen)}),
    }
    return VxlanLink(**{**have, **changes})


def test_vxlan_plan_creates_a_missing_device_and_leaves_a_right_one_alone() -> None:
    assert plan_vxlan(WANT, None) == VxlanPlan(create=True, add_address=("10.244.0.0", 32), up=True)
    assert not plan_vxlan(WANT, link(WANT))
    link_local = link(V6, addresses=frozenset({("fd00::", 128), ("fe80::1", 64)}))
    assert not plan_vxlan(V6, link_local)


@pytest.mark.parametrize(
    "changes",
    [{"vni": 1}, {"port": 8472}, {"local": "172.30.1.9"}, {"learning": True}, {"vni": None, "port": None}],
)
def test_vxlan_plan_recreates_a_device_whose_identity_differs(changes: dict[str, Any]) -> None:
    assert plan_vxlan(WANT, link(WANT, **changes)) == VxlanPlan(
        delete=True, create=True, add_address=("10.244.0.0", 32), up=True
    )


def test_vxlan_plan_repairs_drift_in_place() -> None:
    have = link(WANT, mtu=1500, mac="02:00:00:00:00:09", up=False, addresses=frozenset({("10.244.9.0", 32)}))
    assert plan_vxlan(WANT, have) == VxlanPlan(
        mtu=1450,
        mac="02:00:00:00:00:01",
        remove_addresses=(("10.244.9.0", 32),),
        add_address=("10.244.0.0", 32),
        up=True,
    )


def test_vxlan_reconciler_creates_with_identity_mtu_and_mac() -> None:
    ipr = FakeNetlink(links={"eth0": 2})
    VxlanDeviceReconciler(lambda: ipr).apply(WANT)
    assert [(what, verb) for what, verb, _ in ipr.calls] == [("link", "add"), ("addr", "add"), ("link", "set")]
    _, _, args = ipr.calls[0]
    assert args["vxlan_id"] == VXLAN_VNI and args["vxlan_port"] == VXLAN_PORT and args["vxlan_link"] == 2
    assert args["vxlan_local"] == "172.30.1.2" and args["vxlan_learning"] == 0
    assert (args["mtu"], args["address"]) == (1450, "02:00:00:00:00:01")
    assert ipr.calls[1][2] == {"index": 100, "address": "10.244.0.0", "prefixlen": 32, "flags": IFA_F_NODAD}


def test_vxlan_reconciler_reads_the_device_and_touches_nothing_that_is_right() -> None:
    ipr = FakeNetlink(links={"eth0": 2, "tulle-vxlan4": 7})
    info = {"IFLA_VXLAN_ID": VXLAN_VNI, "IFLA_VXLAN_PORT": VXLAN_PORT, "IFLA_VXLAN_LOCAL": "172.30.1.2"}
    ipr.link_messages[7] = {
        ("linkinfo", "data"): {**info, "IFLA_VXLAN_LEARNING": 0},
        "mtu": 1450,
        "address": "02:00:00:00:00:01",
        "state": "up",
    }
    ipr.addresses[7] = [{"address": "10.244.0.0", "prefixlen": 32}]
    assert not VxlanDeviceReconciler(lambda: ipr).apply(WANT)
    assert ipr.calls == []
    ipr.link_messages[7]["mtu"] = 1500
    assert VxlanDeviceReconciler(lambda: ipr).apply(WANT) == VxlanPlan(mtu=1450)
    assert ipr.calls == [("link", "set", {"index": 7, "mtu": 1450})]


def test_vxlan_reconciler_refuses_a_missing_underlay() -> None:
    with pytest.raises(RuntimeError, match="underlay interface eth0 does not exist"):
        VxlanDeviceReconciler(lambda: FakeNetlink()).apply(WANT)
