"""The policy part of the node's nftables table, from the policy model (pure).

A fixed set of chains whose rules never change; everything that depends on pods, namespaces
and policies is set and map elements, so a packet costs the same few lookups whatever the size
of the cluster, and an update is a handful of element adds and deletes.

    forward (filter hook, priority 0):
        ct state established,related accept
        ip saddr vmap @egress_endpoints_v4          isolated local source -> egress_isolated_v4
        ip6 saddr vmap @egress_endpoints_v6
        ip daddr vmap @ingress_endpoints_v4         isolated local destination -> ingress_isolated_v4
        ip6 daddr vmap @ingress_endpoints_v6
    input (filter hook, priority 0):
        ct state established,related accept
        icmpv6 type { nd-router-solicit, nd-neighbor-solicit, nd-neighbor-advert } accept
        the egress vmaps, as in forward (egress policy covers pod -> node traffic)

    ingress_isolated_v4:
        ip daddr @ingress_open_v4 accept                                    a rule opens all
        ip daddr . meta l4proto . th dport @ingress_anyone_v4 accept        from anyone, on ports
        ct mark set ip saddr map @atoms_v4                                  the peer's atom
        ip daddr . ct mark @ingress_peer_all_v4 ct mark set 0 accept        from peers, all ports
        ip daddr . ct mark . meta l4proto . th dport @ingress_peer_ports_v4 ct mark set 0 accept
        counter name ip daddr map @ingress_drop_counters_v4
        drop
    egress_isolated_v4: the same with saddr and daddr swapped, and `return` instead of
        `accept`, so that a packet allowed out of its source still meets the ingress check of
        its destination on this node. Likewise for v6.

The ct mark carries the peer's atom between the rule that looks it up and the rules that use
it (`mark(atom) = atom`). nft 1.0.6 (Debian 12) cannot delete an element of a concatenated
interval set when every component is a single value and one of them is a host-byte-order type
such as mark; the reconciler (dataplane/nft.py) therefore writes single values in such sets as
one-value ranges, which it can delete.

Neighbour discovery from a pod to its node is link-local plumbing, not pod traffic: it is
accepted before egress policy, or an egress-isolated pod could not answer its node's
neighbour solicitations for its own address.

Traffic from the node itself to its pods leaves through the output hook and never meets the
forward chain: Kubernetes allows it whatever the policies say.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from tulle.kernelstate.nft import NftChain, NftSet, NftTable, Rule
from tulle.policy.compiler import DIRECTIONS, EGRESS, FAMILIES, INGRESS, CompiledPort, PodPolicy, PolicyModel
from tulle.policy.verdict import port_ranges


def mark(atom: int) -> int:
    """The ct mark value that stands for an atom in the datapath."""
    return atom


def _mark_range(atom: int) -> tuple[int, int]:
    return (atom, atom)


def _v(family: int) -> str:
    return f"v{family}"


def _addr_type(family: int) -> str:
    return "ipv4_addr" if family == 4 else "ipv6_addr"


def counter_name(direction: str, address: str) -> str:
    """The drop counter of one isolated endpoint address in one direction.

    >>> counter_name("ingress", "fd00:10:244::5")
    'drop_ingress_v6_fd00_10_244__5'
    """
    ip = ipaddress.ip_address(address)
    return f"drop_{direction}_{_v(ip.version)}_{str(ip).replace('.', '_').replace(':', '_')}"


# -- rules ---------------------------------------------------------------------------------------


def _addr(family: int, field: str) -> dict[str, Any]:
    return {"payload": {"protocol": "ip" if family == 4 else "ip6", "field": field}}


_L4PROTO = {"meta": {"key": "l4proto"}}
_DPORT = {"payload": {"protocol": "th", "field": "dport"}}
_CT_MARK = {"ct": {"key": "mark"}}
_ESTABLISHED = {"match": {"op": "in", "left": {"ct": {"key": "state"}}, "right": ["established", "related"]}}
_NEIGHBOUR_DISCOVERY = {
    "match": {
        "op": "==",
        "left": {"payload": {"protocol": "icmpv6", "field": "type"}},
        "right": {"set": ["nd-router-solicit", "nd-neighbor-solicit", "nd-neighbor-advert"]},
    }
}


def _in_set(left: Any, name: str) -> dict[str, Any]:
    return {"match": {"op": "==", "left": left, "right": f"@{name}"}}


def _concat(*parts: Any) -> dict[str, Any]:
    return {"concat": list(parts)}


def _isolated_chain(direction: str, family: int) -> NftChain:
    v = _v(family)
    local, peer = ("daddr", "saddr") if direction == INGRESS else ("saddr", "daddr")
    me, them = _addr(family, local), _addr(family, peer)
    # Egress returns to the base chain: the ingress check of a local destination still runs.
    allow = {"accept": None} if direction == INGRESS else {"return": None}
    reset = {"mangle": {"key": _CT_MARK, "value": 0}}
    rules: tuple[Rule, ...] = (
        (_in_set(me, f"{direction}_open_{v}"), allow),
        (_in_set(_concat(me, _L4PROTO, _DPORT), f"{direction}_anyone_{v}"), allow),
        ({"mangle": {"key": _CT_MARK, "value": {"map": {"key": them, "data": f"@atoms_{v}"}}}},),
        (_in_set(_concat(me, _CT_MARK), f"{direction}_peer_all_{v}"), reset, allow),
        (_in_set(_concat(me, _CT_MARK, _L4PROTO, _DPORT), f"{direction}_peer_ports_{v}"), reset, allow),
        ({"counter": {"map": {"key": me, "data": f"@{direction}_drop_counters_{v}"}}},),
        ({"drop": None},),
    )
    return NftChain(f"{direction}_isolated_{v}", rules)


def _vmap(direction: str, family: int) -> Rule:
    field = "daddr" if direction == INGRESS else "saddr"
    return ({"vmap": {"key": _addr(family, field), "data": f"@{direction}_endpoints_{_v(family)}"}},)


def policy_chains() -> dict[str, NftChain]:
    """The chains: fixed, whatever the cluster holds."""
    egress = tuple(_vmap(EGRESS, f) for f in FAMILIES)
    ingress = tuple(_vmap(INGRESS, f) for f in FAMILIES)
    chains = {
        "forward": NftChain(
            "forward",
            ((_ESTABLISHED, {"accept": None}), *egress, *ingress),
            ("filter", "forward", 0, "accept"),
        ),
        "input": NftChain(
            "input",
            ((_ESTABLISHED, {"accept": None}), (_NEIGHBOUR_DISCOVERY, {"accept": None}), *egress),
            ("filter", "input", 0, "accept"),
        ),
    }
    for direction in DIRECTIONS:
        for family in FAMILIES:
            chain = _isolated_chain(direction, family)
            chains[chain.name] = chain
    return chains


# -- elements ------------------------------------------------------------------------------------


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Disjoint, sorted ranges covering the same values (nft refuses overlapping intervals).

    >>> merge_ranges([(80, 80), (70, 90), (91, 95), (100, 100)])
    [(70, 95), (100, 100)]
    """
    out: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1] = (out[-1][0], hi)
        else:
            out.append((lo, hi))
    return out


class _Allowed:
    """What one isolated endpoint allows in one direction, in the shape of the sets."""

    def __init__(self) -> None:
        self.open = False
        self.anyone: dict[int, list[tuple[int, int]]] = {}  # protocol -> port ranges
        self.peer_all: set[int] = set()  # atoms
        self.peer_ports: dict[tuple[int, int], list[tuple[int, int]]] = {}  # (atom, protocol) -> ranges

    def from_anyone(self, ranges: Iterable[tuple[int, int, int]]) -> None:
        for protocol, lo, hi in ranges:
            self.anyone.setdefault(protocol, []).append((lo, hi))

    def from_peer(self, atom: int, ranges: Iterable[tuple[int, int, int]]) -> None:
        for protocol, lo, hi in ranges:
            self.peer_ports.setdefault((atom, protocol), []).append((lo, hi))


def _named_port_atoms(model: PolicyModel, family: int) -> dict[tuple[str, int], list[tuple[int, int]]]:
    """(name, protocol) -> [(atom, port)] over the family's atoms, for egress to anyone by port name."""
    present = set(model.atom_table(family).atoms)
    out: dict[tuple[str, int], list[tuple[int, int]]] = {}
    for atom, resolution in model.named_ports.items():
        if atom in present:
            for name, protocol, port in resolution:
                out.setdefault((name, protocol), []).append((atom, port))
    return out


def _allowed(
    model: PolicyModel,
    pod: PodPolicy,
    direction: str,
    family: int,
    named_atoms: dict[tuple[str, int], list[tuple[int, int]]],
) -> _Allowed:
    out = _Allowed()
    for rule in model.rules(pod, direction):
        peers = rule.peers(family)
        if peers is not None and not peers:
            continue  # no peer of this family: the rule allows nothing here
        if rule.ports is None:
            if peers is None:
                out.open = True
                return out
            out.peer_all |= peers
        elif direction == INGRESS:
            _allow_ingress_ports(out, pod, peers, rule.ports)
        else:
            _allow_egress_ports(out, model, peers, rule.ports, named_atoms)
    return out


def _allow_ingress_ports(
    out: _Allowed, pod: PodPolicy, peers: frozenset[int] | None, ports: Sequence[CompiledPort]
) -> None:
    # Named ports are the local destination's: resolved once, for every peer.
    ranges = port_ranges(ports, pod.named_ports)
    if peers is None:
        out.from_anyone(ranges)
        return
    for atom in peers:
        out.from_peer(atom, ranges)


def _allow_egress_ports(
    out: _Allowed,
    model: PolicyModel,
    peers: frozenset[int] | None,
    ports: Sequence[CompiledPort],
    named_atoms: dict[tuple[str, int], list[tuple[int, int]]],
) -> None:
    # Numbered ports hold for any destination, named ones per destination atom.
    numbered = port_ranges([p for p in ports if not p.name], frozenset())
    named = [p for p in ports if p.name]
    if peers is None:
        out.from_anyone(numbered)
        for p in named:
            for atom, number in named_atoms.get((p.name, p.protocol), ()):
                out.from_peer(atom, [(p.protocol, number, number)])
        return
    for atom in peers:
        out.from_peer(atom, numbered + port_ranges(named, model.named_ports.get(atom, frozenset())))


def _local_endpoints(model: PolicyModel, local_ips: Iterable[str]) -> list[tuple[str, int, PodPolicy]]:
    out: dict[str, tuple[str, int, PodPolicy]] = {}
    for text in local_ips:
        try:
            ip = ipaddress.ip_interface(text).ip
        except ValueError:
            continue
        pod = model.pod_at(str(ip))
        if pod is not None:
            out[str(ip)] = (str(ip), ip.version, pod)
    return [out[a] for a in sorted(out)]


def _sets(family: int) -> dict[str, NftSet]:
    v, addr = _v(family), _addr_type(family)
    out = {f"atoms_{v}": NftSet(f"atoms_{v}", (addr,), ("interval",), "mark")}
    for d in DIRECTIONS:
        for s in (
            NftSet(f"{d}_endpoints_{v}", (addr,), (), "verdict"),
            NftSet(f"{d}_open_{v}", (addr,)),
            NftSet(f"{d}_anyone_{v}", (addr, "inet_proto", "inet_service"), ("interval",)),
            NftSet(f"{d}_peer_all_{v}", (addr, "mark")),
            NftSet(f"{d}_peer_ports_{v}", (addr, "mark", "inet_proto", "inet_service"), ("interval",)),
            NftSet(f"{d}_drop_counters_{v}", (addr,), (), "counter"),
        ):
            out[s.name] = s
    return out


def policy_table(model: PolicyModel, local_ips: Iterable[str]) -> NftTable:
    """The policy chains, sets, maps and counters for the endpoints at local_ips.

    >>> from tulle.policy.compiler import compile_policies
    >>> from tulle.policy.inputs import PolicyInputs
    >>> policy_table(compile_policies(PolicyInputs()), []).rule_count()
    37
    """
    elements: dict[str, set[Any]] = {}
    counters: set[str] = set()
    for family in FAMILIES:
        _add_elements(elements, _atom_elements(model, family))
    named_atoms = {f: _named_port_atoms(model, f) for f in FAMILIES}
    for address, family, pod in _local_endpoints(model, local_ips):
        for d in DIRECTIONS:
            if not pod.isolating(d):
                continue
            counters.add(counter_name(d, address))
            allowed = _allowed(model, pod, d, family, named_atoms[family])
            _add_elements(elements, _endpoint_elements(d, address, allowed))
    sets: dict[str, NftSet] = {}
    for family in FAMILIES:
        for name, s in _sets(family).items():
            sets[name] = NftSet(s.name, s.type, s.flags, s.map, frozenset(elements.get(name, ())))
    return NftTable(chains=policy_chains(), sets=sets, counters=frozenset(counters))


def _add_elements(elements: dict[str, set[Any]], new: Iterable[tuple[str, Any]]) -> None:
    for name, element in new:
        elements.setdefault(name, set()).add(element)


def _atom_elements(model: PolicyModel, family: int) -> Iterator[tuple[str, Any]]:
    """(set name, element) of the family's atom map: each address interval to its atom's mark."""
    for first, last, atom in model.atom_table(family).intervals():
        yield f"atoms_{_v(family)}", (((first, last),), mark(atom))


def _endpoint_elements(direction: str, address: str, allowed: _Allowed) -> Iterator[tuple[str, Any]]:
    """(set name, element) for one isolated endpoint address in one direction: its jump, counter and allows."""
    ip = ipaddress.ip_address(address)
    d, v, key = direction, _v(ip.version), int(ip)
    yield f"{d}_endpoints_{v}", ((key,), ("jump", f"{d}_isolated_{v}"))
    yield f"{d}_drop_counters_{v}", ((key,), counter_name(d, address))
    if allowed.open:
        yield f"{d}_open_{v}", (key,)
        return  # every other allow is already in this one
    for protocol, ranges in allowed.anyone.items():
        for lo, hi in merge_ranges(ranges):
            yield f"{d}_anyone_{v}", ((key, key), (protocol, protocol), (lo, hi))
    for atom in allowed.peer_all:
        yield f"{d}_peer_all_{v}", (key, mark(atom))
    for (atom, protocol), ranges in allowed.peer_ports.items():
        if atom in allowed.peer_all:
            continue  # all ports from that peer already
        for lo, hi in merge_ranges(ranges):
            yield f"{d}_peer_ports_{v}", ((key, key), _mark_range(atom), (protocol, protocol), (lo, hi))


def drop_counters(model: PolicyModel, local_ips: Iterable[str]) -> dict[str, tuple[str, str]]:
    """Counter name -> (namespace/pod, direction) for every isolated local endpoint address."""
    out: dict[str, tuple[str, str]] = {}
    for address, _, pod in _local_endpoints(model, local_ips):
        for d in DIRECTIONS:
            if pod.isolating(d):
                out[counter_name(d, address)] = (pod.key, d)
    return out
