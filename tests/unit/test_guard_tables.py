"""The guard tables as data (no root): what they hold, and that their rules never grow.

Invariants (docs/design/guard.md):
- the chains are fixed: pods and nodes are set elements, so a packet's cost is the same few
  lookups whatever the number of pods and nodes;
- a pod's sources are its own addresses and its allowed prefixes, nothing else;
- every drop chain counts in one rule and drops in the next, so a missing counter never lets a
  packet through;
- with source verification off, only the address and MAC checks go.
"""

from __future__ import annotations

import json

from tulle.guard.tables import (
    REASONS,
    GuardedEndpoint,
    GuardSettings,
    arp_guard,
    drop_counters,
    inet_guard,
)

SETTINGS = GuardSettings(
    underlay="uplink",
    cluster_nodes=("172.30.1.2", "172.30.1.3", "fd30:1::2"),
    control_plane=("172.30.1.1",),
    protected_ports=((6, 2379), (6, 2380), (17, 4789)),
    connection_limit=500,
)


def endpoint(i: int, prefixes: tuple[str, ...] = ()) -> GuardedEndpoint:
    return GuardedEndpoint(
        f"tl{i:011x}",
        f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
        (f"10.244.{i // 200}.{i % 200}", f"fd00::{i:x}"),
        prefixes,
    )


def test_rules_stay_the_same_whatever_the_number_of_pods_and_nodes() -> None:
    small = inet_guard([endpoint(1)], SETTINGS)
    many_nodes = GuardSettings(
        **{**SETTINGS.__dict__, "cluster_nodes": tuple(f"172.30.{i // 250}.{i % 250}" for i in range(1000))}
    )
    large = inet_guard([endpoint(i) for i in range(500)], many_nodes)
    assert small.chains == large.chains
    assert arp_guard([endpoint(1)], SETTINGS).chains == arp_guard([endpoint(i) for i in range(500)], SETTINGS).chains
    assert len(large.sets["guarded"].elements) == 500
    assert len(large.sets["cluster_nodes_v4"].elements) == 1000


def test_a_pods_sources_are_its_addresses_and_its_allowed_prefixes() -> None:
    table = inet_guard([endpoint(1, ("192.168.0.0/16",)), endpoint(2)], SETTINGS)
    v4 = sorted(table.sets["pod_sources_v4"].elements)
    assert v4 == [
        ("tl00000000001", ("10.244.0.1", "10.244.0.1")),
        ("tl00000000001", ("192.168.0.0", "192.168.255.255")),
        ("tl00000000002", ("10.244.0.2", "10.244.0.2")),
    ]
    assert sorted(table.sets["pod_sources_v6"].elements) == [
        ("tl00000000001", ("fd00::1", "fd00::1")),
        ("tl00000000002", ("fd00::2", "fd00::2")),
    ]
    assert arp_guard([endpoint(1, ("192.168.0.0/16",))], SETTINGS).sets["pod_sources_v4"].elements == frozenset(v4[:2])


def test_every_drop_chain_counts_and_then_drops_in_a_rule_of_its_own() -> None:
    table = inet_guard([endpoint(1)], SETTINGS)
    drops = {n: c for n, c in table.chains.items() if n.startswith("drop_")}
    assert set(drops) == {"drop_source", "drop_mac", "drop_nd", "drop_control", "drop_limit", "drop_tunnel"}
    for chain in drops.values():
        assert [list(r[0]) for r in chain.rules] == [["counter"], ["drop"]]
    arp = arp_guard([endpoint(1)], SETTINGS).chains["drop_arp"]
    assert [list(r[0]) for r in arp.rules] == [["counter"], ["drop"]]


def test_each_local_pod_has_a_counter_per_reason() -> None:
    eps = [endpoint(1), endpoint(2)]
    names = set(drop_counters(eps))
    tables = inet_guard(eps, SETTINGS).counters | arp_guard(eps, SETTINGS).counters
    assert names == tables - {"foreign_tunnel"}
    assert len(names) == 2 * len(REASONS)


def test_tunnel_packets_are_untracked_only_between_cluster_nodes() -> None:
    table = inet_guard([], SETTINGS)
    output = json.dumps(table.chains["raw_output"].rules)
    assert "@cluster_nodes_v4" in output and "notrack" in output
    tunnel_in = table.chains["tunnel_in"].rules
    assert '"right": "uplink"' in json.dumps(tunnel_in[0]) and '"op": "!="' in json.dumps(tunnel_in[0])
    assert all("notrack" not in json.dumps(r) or "@cluster_nodes" in json.dumps(r) for r in tunnel_in)


def test_connection_limit_counts_in_a_set_the_kernel_fills() -> None:
    table = inet_guard([endpoint(1)], SETTINGS)
    assert table.sets["connections_v4"].filled_by_kernel and not table.sets["connections_v4"].elements
    assert '"val": 500' in json.dumps(table.chains["connection_limit"].rules)


def test_with_verification_off_only_the_address_and_mac_checks_go() -> None:
    off = GuardSettings(**{**SETTINGS.__dict__, "verify_sources": False})
    rules = json.dumps(inet_guard([endpoint(1)], off).chains["from_pods"].rules)
    assert "drop_source" not in rules and "drop_mac" not in rules and "drop_nd" not in rules
    assert "drop_control" in rules
    assert "drop_arp" not in json.dumps(arp_guard([endpoint(1)], off).chains["input"].rules)
