"""The node's guards, as nftables tables (pure): no pod impersonates another, floods the node's
connection tracking, injects tunnel packets, or reaches the control plane.

Two tables of Tulle's own, apart from `inet tulle` (NAT and NetworkPolicy), so that a node
joining or a pod coming costs a small transaction on a small table:

    inet tulle_guard
      raw_prerouting (prerouting, -300: before conntrack, routing and policy)
        iifname @guarded jump from_pods                     a local pod's veth
        udp dport 4789 fib daddr type local jump tunnel_in  VXLAN to this node
      from_pods
        iifname . ether saddr != @pod_macs            -> drop_mac       its own MAC only
        icmpv6 type nd-router-advert                  -> drop_nd        pods advertise no routers
        icmpv6 type nd-neighbor-advert, S flag unset  -> drop_nd        nor addresses unasked
        fib daddr type local, proto . port @protected -> drop_control   not the node's control plane
        ip daddr @control_plane_v4, proto . port @protected -> drop_control (likewise v6)
        ip6 saddr { fe80::/10, :: } return                              link-local plumbing
        iifname . ip saddr != @pod_sources_v4         -> drop_source    its own addresses only
        iifname . ip6 saddr != @pod_sources_v6        -> drop_source
      tunnel_in
        iifname != <underlay>                         -> drop_tunnel    never from a pod
        ip saddr @cluster_nodes_v4 notrack accept                       from a node of the cluster
        ip6 saddr @cluster_nodes_v6 notrack accept
        -> drop_tunnel
      raw_output (output, -300)
        udp dport 4789 ip daddr @cluster_nodes_v4 notrack               our own tunnel packets only
      connection_limit (prerouting, -150: after conntrack)
        iifname @guarded ct state new add @connections_v4 { ip saddr ct count over N } -> drop_limit
    arp tulle_guard
      input (input, 0)
        iifname @guarded arp operation request arp daddr ip != 169.254.1.1 drop   only the gateway
        iifname @guarded iifname . arp saddr ip != @pod_sources_v4 -> drop_arp      no claims

Every check is one set lookup whatever the number of pods or nodes; what changes is elements.
A `drop_*` chain counts the packet per pod (`counter name iifname map @drops_*`) in one rule
and drops it in the next: a pod whose counter is not there yet is still dropped.

Only interfaces in `guarded` are checked: a pod's veth joins it when its ADD writes the guard
tables, before the runtime starts the pod's containers. Link-local IPv6 sources pass the address
check (neighbour discovery needs them, and the kernel never forwards them), after the checks
that matter to neighbour discovery itself.

Connection tracking is counted per source address (`ct count` in a dynamic set the kernel fills):
a pod over its limit has its new connections dropped, and other pods keep theirs.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tulle.kernelstate.net import VXLAN_PORT
from tulle.kernelstate.nft import NftChain, NftSet, NftTable, Rule

TABLE = "tulle_guard"
RAW_PRIORITY = -300  # before conntrack (-200)
AFTER_CONNTRACK = -150
GATEWAY_V4 = "169.254.1.1"

# Why a packet from a pod was dropped: the reason's code names its counter map and drop chain.
REASONS = {
    "source": "source address is not the pod's",
    "mac": "source MAC is not the pod's",
    "nd": "router or unsolicited neighbour advertisement",
    "control": "to the control plane",
    "limit": "over the pod's connection limit",
    "arp": "ARP claiming another address",
}
FOREIGN_TUNNEL = "foreign_tunnel"  # the counter of VXLAN packets from outside the cluster


@dataclass(frozen=True)
class GuardedEndpoint:
    """A local pod, as its guards know it."""

    interface: str  # the node's end of its veth
    mac: str
    addresses: tuple[str, ...]  # its own, without prefix length
    allowed_prefixes: tuple[str, ...] = ()  # further sources it may send from (an annotation)


@dataclass(frozen=True)
class GuardSettings:
    underlay: str  # the interface other nodes' tunnel packets arrive on
    cluster_nodes: tuple[str, ...] = ()  # every node's underlay addresses: tunnel peers
    control_plane: tuple[str, ...] = ()  # addresses whose protected ports pods may not open
    protected_ports: tuple[tuple[int, int], ...] = ()  # (protocol number, port)
    connection_limit: int = 16384  # tracked connections per pod source address
    verify_sources: bool = True


# -- JSON expressions --------------------------------------------------------------------------


def _meta(key: str) -> dict[str, Any]:
    return {"meta": {"key": key}}


def _payload(protocol: str, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": protocol, "field": field}}


def _match(left: Any, right: Any, op: str = "==") -> dict[str, Any]:
    return {"match": {"op": op, "left": left, "right": right}}


def _concat(*parts: Any) -> dict[str, Any]:
    return {"concat": list(parts)}


_IIF = _meta("iifname")
_L4PROTO = _meta("l4proto")
_DPORT = {"payload": {"protocol": "th", "field": "dport"}}
_GUARDED = _match(_IIF, "@guarded")
_ADDR = {4: ("ip", "ipv4_addr"), 6: ("ip6", "ipv6_addr")}


def _nfproto(family: int) -> dict[str, Any]:
    return _match(_meta("nfproto"), "ipv4" if family == 4 else "ipv6")


def _jump(chain: str) -> dict[str, Any]:
    return {"jump": {"target": chain}}


def _drop_chain(reason: str) -> NftChain:
    return NftChain(
        f"drop_{reason}",
        (({"counter": {"map": {"key": _IIF, "data": f"@drops_{reason}"}}},), ({"drop": None},)),
    )


def counter_name(reason: str, interface: str) -> str:
    return f"{reason}_{interface}"


# -- the inet table --------------------------------------------------------------------------------


def _from_pods(settings: GuardSettings) -> NftChain:
    rules: list[Rule] = []
    if settings.verify_sources:
        rules += [
            (_match(_concat(_IIF, _payload("ether", "saddr")), "@pod_macs", "!="), _jump("drop_mac")),
            (_match(_payload("icmpv6", "type"), "nd-router-advert"), _jump("drop_nd")),
            (
                _match(_payload("icmpv6", "type"), "nd-neighbor-advert"),
                # the Solicited flag: bit 33 of the ICMPv6 header; an unsolicited advertisement
                # is how an address is claimed
                _match({"payload": {"base": "th", "offset": 33, "len": 1}}, 0),
                _jump("drop_nd"),
            ),
        ]
    protected = _match(_concat(_L4PROTO, _DPORT), "@protected_ports")
    rules.append((_match({"fib": {"result": "type", "flags": ["daddr"]}}, "local"), protected, _jump("drop_control")))
    for family, (proto, _) in _ADDR.items():
        dst = _match(_payload(proto, "daddr"), f"@control_plane_v{family}")
        rules.append((_nfproto(family), dst, protected, _jump("drop_control")))
    if settings.verify_sources:
        link_local = {"set": [{"prefix": {"addr": "fe80::", "len": 10}}, "::"]}
        rules.append((_nfproto(6), _match(_payload("ip6", "saddr"), link_local), {"return": None}))
        for family, (proto, _) in _ADDR.items():
            source = _concat(_IIF, _payload(proto, "saddr"))
            rules.append((_nfproto(family), _match(source, f"@pod_sources_v{family}", "!="), _jump("drop_source")))
    return NftChain("from_pods", tuple(rules))


def _tunnel_chains(settings: GuardSettings) -> dict[str, NftChain]:
    vxlan = (_match(_L4PROTO, "udp"), _match(_payload("udp", "dport"), VXLAN_PORT))
    local = _match({"fib": {"result": "type", "flags": ["daddr"]}}, "local")
    tunnel_in: list[Rule] = [(_match(_IIF, settings.underlay, "!="), _jump("drop_tunnel"))]
    raw_output: list[Rule] = []
    for family, (proto, _) in _ADDR.items():
        nodes = f"@cluster_nodes_v{family}"
        tunnel_in.append(
            (_nfproto(family), _match(_payload(proto, "saddr"), nodes), {"notrack": None}, {"accept": None})
        )
        raw_output.append((*vxlan, _nfproto(family), _match(_payload(proto, "daddr"), nodes), {"notrack": None}))
    tunnel_in.append((_jump("drop_tunnel"),))
    drop_tunnel = NftChain("drop_tunnel", (({"counter": FOREIGN_TUNNEL},), ({"drop": None},)))
    return {
        "raw_prerouting": NftChain(
            "raw_prerouting",
            ((_GUARDED, _jump("from_pods")), (*vxlan, local, _jump("tunnel_in"))),
            ("filter", "prerouting", RAW_PRIORITY, "accept"),
        ),
        "raw_output": NftChain("raw_output", tuple(raw_output), ("filter", "output", RAW_PRIORITY, "accept")),
        "tunnel_in": NftChain("tunnel_in", tuple(tunnel_in)),
        "drop_tunnel": drop_tunnel,
    }


def _connection_limit(settings: GuardSettings) -> NftChain:
    rules: list[Rule] = []
    for family, (proto, _) in _ADDR.items():
        count = {"ct count": {"val": settings.connection_limit, "inv": True}}
        add = {
            "set": {"op": "add", "elem": _payload(proto, "saddr"), "set": f"@connections_v{family}", "stmt": [count]}
        }
        new = _match({"ct": {"key": "state"}}, "new", "in")
        rules.append((_GUARDED, _nfproto(family), new, add, _jump("drop_limit")))
    return NftChain("connection_limit", tuple(rules), ("filter", "prerouting", AFTER_CONNTRACK, "accept"))


def _sources(endpoints: Iterable[GuardedEndpoint], family: int) -> frozenset[Any]:
    out = set()
    for ep in endpoints:
        for text in (*ep.addresses, *ep.allowed_prefixes):
            net = ipaddress.ip_network(text, strict=False)
            if net.version == family:
                out.add((ep.interface, (str(net.network_address), str(net.broadcast_address))))
    return frozenset(out)


def _addresses(addresses: Iterable[str], family: int) -> frozenset[Any]:
    return frozenset(a for a in addresses if ipaddress.ip_address(a).version == family)


def _counter_maps(endpoints: list[GuardedEndpoint], reasons: Iterable[str]) -> tuple[dict[str, NftSet], set[str]]:
    maps, counters = {}, set()
    for reason in reasons:
        elements = frozenset((ep.interface, counter_name(reason, ep.interface)) for ep in endpoints)
        counters |= {c for _, c in elements}
        maps[f"drops_{reason}"] = NftSet(f"drops_{reason}", ("ifname",), (), "counter", elements)
    return maps, counters


def inet_guard(endpoints: Iterable[GuardedEndpoint], settings: GuardSettings) -> NftTable:
    eps = sorted(endpoints, key=lambda e: e.interface)
    sets: dict[str, NftSet] = {
        "guarded": NftSet("guarded", ("ifname",), (), None, frozenset(ep.interface for ep in eps)),
        "pod_macs": NftSet(
            "pod_macs", ("ifname", "ether_addr"), (), None, frozenset((e.interface, e.mac) for e in eps)
        ),
        "protected_ports": NftSet(
            "protected_ports", ("inet_proto", "inet_service"), (), None, frozenset(settings.protected_ports)
        ),
    }
    for family, (_, addr_type) in _ADDR.items():
        v = f"v{family}"
        sets[f"pod_sources_{v}"] = NftSet(
            f"pod_sources_{v}", ("ifname", addr_type), ("interval",), None, _sources(eps, family)
        )
        sets[f"cluster_nodes_{v}"] = NftSet(
            f"cluster_nodes_{v}", (addr_type,), (), None, _addresses(settings.cluster_nodes, family)
        )
        control = _addresses([*settings.cluster_nodes, *settings.control_plane], family)
        sets[f"control_plane_{v}"] = NftSet(f"control_plane_{v}", (addr_type,), (), None, control)
        sets[f"connections_{v}"] = NftSet(f"connections_{v}", (addr_type,), filled_by_kernel=True)
    maps, counters = _counter_maps(eps, ("source", "mac", "nd", "control", "limit"))
    sets.update(maps)
    chains = {
        "from_pods": _from_pods(settings),
        "connection_limit": _connection_limit(settings),
        **_tunnel_chains(settings),
        **{f"drop_{r}": _drop_chain(r) for r in ("source", "mac", "nd", "control", "limit")},
    }
    return NftTable(
        chains=chains, sets=sets, counters=frozenset(counters | {FOREIGN_TUNNEL}), family="inet", name=TABLE
    )


# -- the arp table ---------------------------------------------------------------------------------


def arp_guard(endpoints: Iterable[GuardedEndpoint], settings: GuardSettings) -> NftTable:
    eps = sorted(endpoints, key=lambda e: e.interface)
    maps, counters = _counter_maps(eps, ("arp",))
    sets: dict[str, NftSet] = {
        "guarded": NftSet("guarded", ("ifname",), (), None, frozenset(ep.interface for ep in eps)),
        "pod_sources_v4": NftSet("pod_sources_v4", ("ifname", "ipv4_addr"), ("interval",), None, _sources(eps, 4)),
        **maps,
    }
    rules: list[Rule] = [
        (
            _GUARDED,
            _match(_payload("arp", "operation"), "request"),
            _match(_payload("arp", "daddr ip"), GATEWAY_V4, "!="),
            {"drop": None},
        )
    ]
    if settings.verify_sources:
        claimed = _concat(_IIF, _payload("arp", "saddr ip"))
        rules.append((_GUARDED, _match(claimed, "@pod_sources_v4", "!="), _jump("drop_arp")))
    chains = {
        "input": NftChain("input", tuple(rules), ("filter", "input", 0, "accept")),
        "drop_arp": _drop_chain("arp"),
    }
    return NftTable(chains=chains, sets=sets, counters=frozenset(counters), family="arp", name=TABLE)


def drop_counters(endpoints: Iterable[GuardedEndpoint]) -> dict[str, tuple[str, str]]:
    """counter name -> (the pod's interface, the reason's code), every guard counter of a pod."""
    return {counter_name(r, ep.interface): (ep.interface, r) for ep in endpoints for r in REASONS}
