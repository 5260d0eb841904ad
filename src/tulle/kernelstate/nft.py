"""Tulle's nftables table as plain data: chains, sets, maps and counters (pure, no I/O).

Compilers (policy, NAT, the tunnel's notrack rules) each build an NftTable and the agent merges
them; the reconciler (dataplane/nft.py) applies the result. Set and map elements are compared in
one canonical form, whatever form a compiler wrote them in: addresses and numbers as int, names
as str, interval components as (first, last) ranges.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tulle.model.protocols import PROTOCOL_NUMBERS

Rule = tuple[dict[str, Any], ...]  # nft JSON statements of one rule
Scalar = int | str
Component = Scalar | tuple[Scalar, Scalar]  # a value or an inclusive range
Key = tuple[Component, ...]  # a set element; a map element is (Key, data)


class NftError(Exception):
    pass


@dataclass(frozen=True)
class NftSet:
    """A named set (map is None) or map (map names the data type: mark, verdict, counter)."""

    name: str
    type: tuple[str, ...]
    flags: tuple[str, ...] = ()
    map: str | None = None
    elements: frozenset[Any] = frozenset()
    # Filled by the kernel (a rule adds to it, e.g. `ct count` per source; nft then marks it
    # dynamic itself): its elements are not desired state, and a reconcile leaves them alone.
    filled_by_kernel: bool = False

    @property
    def interval(self) -> bool:
        return "interval" in self.flags

    @property
    def kind(self) -> str:
        """The nft object kind: "map" or "set"."""
        return "map" if self.map else "set"

    def definition(self) -> tuple[Any, ...]:
        return (self.type, tuple(sorted(self.flags)), self.map)


@dataclass(frozen=True)
class NftChain:
    name: str
    rules: tuple[Rule, ...] = ()
    # (type, hook, priority, policy) for base chains
    hook: tuple[str, str, int, str] | None = None


@dataclass(frozen=True)
class NftTable:
    """One table of Tulle's: `inet tulle` (NAT, policy) by default; others (the guards' inet and
    arp tables) name their family and name."""

    chains: Mapping[str, NftChain] = field(default_factory=dict)
    sets: Mapping[str, NftSet] = field(default_factory=dict)
    counters: frozenset[str] = frozenset()
    family: str = "inet"
    name: str = "tulle"

    def merge(self, other: NftTable) -> NftTable:
        if (self.family, self.name) != (other.family, other.name):
            raise NftError(f"cannot merge table {other.family} {other.name} into {self.family} {self.name}")
        clash = (set(self.chains) & set(other.chains)) | (set(self.sets) & set(other.sets))
        if clash:
            raise NftError(f"two parts of the ruleset define {sorted(clash)}")
        return NftTable(
            chains={**self.chains, **other.chains},
            sets={**self.sets, **other.sets},
            counters=self.counters | other.counters,
            family=self.family,
            name=self.name,
        )

    def rule_count(self) -> int:
        return sum(len(c.rules) for c in self.chains.values())


# -- canonical elements ---------------------------------------------------------------------------


def _scalar(type_name: str, value: Any) -> Scalar:
    """A component value as Python data: addresses and numbers as int, names as str."""
    if type_name in ("ipv4_addr", "ipv6_addr"):
        return int(ipaddress.ip_address(value))
    if type_name == "ifname":
        return str(value)
    if type_name == "ether_addr":
        return str(value).lower()
    if type_name == "inet_proto" and isinstance(value, str):
        return PROTOCOL_NUMBERS.get(value) or socket.getprotobyname(value)
    return int(value)


def _range(type_name: str, value: Any) -> tuple[Scalar, Scalar]:
    if isinstance(value, dict) and "range" in value:
        lo, hi = value["range"]
        return _scalar(type_name, lo), _scalar(type_name, hi)
    if isinstance(value, dict) and "prefix" in value:
        addr, length = value["prefix"]["addr"], value["prefix"]["len"]
        if type_name in ("ipv4_addr", "ipv6_addr"):
            net = ipaddress.ip_network(f"{addr}/{length}", strict=False)
            return int(net.network_address), int(net.broadcast_address)
        bits = 32 if type_name == "mark" else 16 if type_name == "inet_service" else 8
        base = int(addr)
        return base, base | ((1 << (bits - length)) - 1)
    if isinstance(value, tuple):
        return _scalar(type_name, value[0]), _scalar(type_name, value[1])
    scalar = _scalar(type_name, value)
    return scalar, scalar


def _canonical_key(s: NftSet, key: Any) -> Key:
    parts = key if isinstance(key, tuple) else (key,)
    if isinstance(key, dict) and "concat" in key:
        parts = tuple(key["concat"])
    if len(parts) != len(s.type):
        raise NftError(f"set {s.name}: element {key!r} does not have {len(s.type)} parts")
    if s.interval:
        return tuple(_range(t, v) for t, v in zip(s.type, parts, strict=True))
    return tuple(_scalar(t, v) for t, v in zip(s.type, parts, strict=True))


def _canonical_data(s: NftSet, data: Any) -> Any:
    if s.map == "verdict":
        if isinstance(data, dict):
            (verdict, arg), *_ = data.items()
            return (verdict, arg["target"]) if isinstance(arg, dict) else (verdict,)
        if isinstance(data, tuple):
            return data
        return (str(data),)
    if s.map == "counter":
        return str(data)
    return _scalar(s.map or "mark", data)


def canonical_elements(s: NftSet, elements: Iterable[Any]) -> frozenset[Any]:
    """The elements in canonical form, from Python data or from nft's JSON.

    >>> s = NftSet("ports", ("inet_proto", "inet_service"), ("interval",))
    >>> sorted(canonical_elements(s, [("tcp", (80, 90)), {"concat": [17, {"range": [53, 53]}]}]))
    [((6, 6), (80, 90)), ((17, 17), (53, 53))]
    """
    if s.map is None:
        return frozenset(_canonical_key(s, e) for e in elements)
    out = set()
    for e in elements:
        key, data = (e[0], e[1]) if isinstance(e, (list, tuple)) else (e, None)
        out.add((_canonical_key(s, key), _canonical_data(s, data)))
    return frozenset(out)


def canonical(s: NftSet) -> NftSet:
    """The set with its elements in canonical form."""
    return NftSet(s.name, s.type, s.flags, s.map, canonical_elements(s, s.elements), s.filled_by_kernel)
