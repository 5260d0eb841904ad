"""Tulle's nftables table: desired state as plain data, and the reconciler that applies it.

The table (family inet, name `tulle`) is Tulle's alone; nothing else is touched. A reconcile
reads the table, compares it with the desired state and sends the difference as one
libnftables JSON transaction, so a packet sees either the old or the new ruleset:
- set and map elements are added and deleted one by one (a label change touches elements);
- a chain is rewritten (flush + add, in the transaction) only when its rules differ; rules
  carry a comment with a hash of their content, so equal rules are recognised and kept with
  their handles;
- sets whose definition changed, and chains, counters and sets no longer wanted, are replaced
  or removed in the same transaction.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import socket
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

TABLE_FAMILY = "inet"
TABLE_NAME = "tulle"

Rule = tuple[dict[str, Any], ...]  # nft JSON statements of one rule
Scalar = int | str
Component = Scalar | tuple[Scalar, Scalar]  # a value or an inclusive range
Key = tuple[Component, ...]
Element = Key | tuple[Key, Any]  # a set element, or a map element (key, data)


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

    @property
    def interval(self) -> bool:
        return "interval" in self.flags

    def definition(self) -> tuple[Any, ...]:
        return (self.type, tuple(sorted(self.flags)), self.map)


@dataclass(frozen=True)
class NftChain:
    name: str
    rules: tuple[Rule, ...] = ()
    # (type, hook, priority, policy) for base chains
    hook: tuple[str, str, int, str] | None = None


@dataclass
class NftTable:
    chains: dict[str, NftChain] = field(default_factory=dict)
    sets: dict[str, NftSet] = field(default_factory=dict)
    counters: set[str] = field(default_factory=set)

    def merge(self, other: NftTable) -> NftTable:
        clash = (set(self.chains) & set(other.chains)) | (set(self.sets) & set(other.sets))
        if clash:
            raise NftError(f"two parts of the ruleset define {sorted(clash)}")
        return NftTable(
            chains={**self.chains, **other.chains},
            sets={**self.sets, **other.sets},
            counters=self.counters | other.counters,
        )

    def rule_count(self) -> int:
        return sum(len(c.rules) for c in self.chains.values())


# -- values ------------------------------------------------------------------------------------

_PROTOCOLS = {"tcp": 6, "udp": 17, "sctp": 132, "icmp": 1, "ipv6-icmp": 58, "icmpv6": 58}


def _scalar(type_name: str, value: Any) -> Scalar:
    """A component value as Python data: addresses and numbers as int, names as str."""
    if type_name in ("ipv4_addr", "ipv6_addr"):
        return int(ipaddress.ip_address(value))
    if type_name == "ifname":
        return str(value)
    if type_name == "inet_proto" and isinstance(value, str):
        return _PROTOCOLS.get(value) or socket.getprotobyname(value)
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
    if s.map is None:
        return frozenset(_canonical_key(s, e) for e in elements)
    out = set()
    for e in elements:
        key, data = (e[0], e[1]) if isinstance(e, (list, tuple)) else (e, None)
        out.add((_canonical_key(s, key), _canonical_data(s, data)))
    return frozenset(out)


def _render_scalar(type_name: str, value: Scalar) -> Any:
    if type_name == "ipv4_addr":
        return str(ipaddress.IPv4Address(value))
    if type_name == "ipv6_addr":
        return str(ipaddress.IPv6Address(value))
    return value


def _render_component(s: NftSet, type_name: str, value: Component) -> Any:
    if isinstance(value, tuple):
        lo, hi = value
        # nft 1.0.6 cannot delete an element of a concatenated interval set whose parts are all
        # single values when one is a mark ("No such file or directory"); a one-value range works.
        if lo == hi and not (s.interval and len(s.type) > 1):
            return _render_scalar(type_name, lo)
        return {"range": [_render_scalar(type_name, lo), _render_scalar(type_name, hi)]}
    return _render_scalar(type_name, value)


def _render_key(s: NftSet, key: Key) -> Any:
    parts = [_render_component(s, t, v) for t, v in zip(s.type, key, strict=True)]
    return {"concat": parts} if len(parts) > 1 else parts[0]


def _render_data(s: NftSet, data: Any) -> Any:
    if s.map == "verdict":
        verdict = data[0]
        return {verdict: {"target": data[1]}} if len(data) > 1 else {verdict: None}
    return data


def _render_element(s: NftSet, element: Any) -> Any:
    if s.map is None:
        return _render_key(s, element)
    return [_render_key(s, element[0]), _render_data(s, element[1])]


# -- rules -------------------------------------------------------------------------------------


def rule_id(rule: Rule) -> str:
    return "t:" + hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()[:16]


def _table_ref() -> dict[str, str]:
    return {"family": TABLE_FAMILY, "table": TABLE_NAME}


def _set_object(s: NftSet) -> dict[str, Any]:
    obj: dict[str, Any] = {
        **_table_ref(),
        "name": s.name,
        "type": list(s.type) if len(s.type) > 1 else s.type[0],
    }
    if s.flags:
        obj["flags"] = sorted(s.flags)
    if s.map:
        obj["map"] = s.map
    return obj


def _chain_object(c: NftChain) -> dict[str, Any]:
    obj: dict[str, Any] = {**_table_ref(), "name": c.name}
    if c.hook:
        obj.update(type=c.hook[0], hook=c.hook[1], prio=c.hook[2], policy=c.hook[3])
    return obj


# -- reading the kernel ------------------------------------------------------------------------


@dataclass
class ActualTable:
    exists: bool = False
    chains: dict[str, tuple[tuple[str, str, int, str] | None, list[str]]] = field(default_factory=dict)
    sets: dict[str, NftSet] = field(default_factory=dict)
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (packets, bytes)


class NftReconciler:
    """Applies an NftTable to the kernel with minimal, atomic changes.

    >>> forward = NftChain("forward", (), ("filter", "forward", 0, "accept"))
    >>> NftReconciler().apply(NftTable(chains={"forward": forward}))  # doctest: +SKIP
    """

    def __init__(self) -> None:
        import nftables  # Debian's python3-nftables: the venv sees it through system site packages

        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        self._nft.set_numeric_proto_output(True)
        self._nft.set_numeric_prio_output(True)
        self._lock = threading.Lock()
        self._applied: ActualTable | None = None

    def _run_json(self, commands: list[dict[str, Any]]) -> None:
        if not commands:
            return
        rc, _out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(f"nftables refused the transaction: {err.strip()}")

    def read(self) -> ActualTable:
        rc, out, err = self._nft.cmd(f"list table {TABLE_FAMILY} {TABLE_NAME}")
        if rc != 0:
            if "No such file" in err or "does not exist" in err:
                return ActualTable()
            raise NftError(f"cannot read table {TABLE_NAME}: {err.strip()}")
        actual = ActualTable(exists=True)
        data = json.loads(out)["nftables"] if isinstance(out, str) else out["nftables"]
        rules: dict[str, list[str]] = {}
        for item in data:
            if "chain" in item:
                c = item["chain"]
                hook = (c["type"], c["hook"], int(c["prio"]), c.get("policy", "accept")) if "hook" in c else None
                actual.chains[c["name"]] = (hook, [])
            elif "rule" in item:
                r = item["rule"]
                rules.setdefault(r["chain"], []).append(r.get("comment", ""))
            elif "set" in item or "map" in item:
                raw = item.get("set") or item.get("map")
                types = raw["type"] if isinstance(raw["type"], list) else [raw["type"]]
                s = NftSet(name=raw["name"], type=tuple(types), flags=tuple(raw.get("flags", ())), map=raw.get("map"))
                elems = []
                for e in raw.get("elem", []):
                    if isinstance(e, dict) and "elem" in e:
                        e = e["elem"]["val"]
                    elems.append(tuple(e) if isinstance(e, list) else e)
                actual.sets[s.name] = NftSet(s.name, s.type, s.flags, s.map, canonical_elements(s, elems))
            elif "counter" in item:
                c = item["counter"]
                actual.counters[c["name"]] = (int(c.get("packets", 0)), int(c.get("bytes", 0)))
        for name, (hook, _) in list(actual.chains.items()):
            actual.chains[name] = (hook, rules.get(name, []))
        return actual

    def plan(self, desired: NftTable, actual: ActualTable) -> list[dict[str, Any]]:
        """The transaction that turns actual into desired (empty if nothing differs).

        Order matters inside the transaction: rules and elements that reference an object go
        before the object is deleted, and come after the object they reference is added.
        """
        ref = _table_ref()
        rebuilt = {
            n for n, s in desired.sets.items() if n in actual.sets and actual.sets[n].definition() != s.definition()
        }
        rewrite: list[str] = []  # chains whose rules are sent again
        for name, chain in sorted(desired.chains.items()):
            have = actual.chains.get(name)
            if have is None or have[0] != chain.hook or have[1] != [rule_id(r) for r in chain.rules] or rebuilt:
                rewrite.append(name)
        recreate_chains = {n for n in rewrite if n in actual.chains and actual.chains[n][0] != desired.chains[n].hook}
        removed_chains = sorted(set(actual.chains) - set(desired.chains))
        removed_sets = sorted((set(actual.sets) - set(desired.sets)) | rebuilt)

        out: list[dict[str, Any]] = []
        if not actual.exists:
            out.append({"add": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}})
        for name in [n for n in rewrite if n in actual.chains] + removed_chains:
            out.append({"flush": {"chain": {**ref, "name": name}}})
        adds: list[dict[str, Any]] = []
        for name, want in sorted(desired.sets.items()):
            elements = canonical_elements(want, want.elements)
            current = actual.sets[name].elements if name in actual.sets and name not in rebuilt else frozenset()
            gone, new = current - elements, elements - current
            if gone:
                elem = [_render_element(want, e) for e in sorted(gone, key=repr)]
                out.append({"delete": {"element": {**ref, "name": name, "elem": elem}}})
            if new:
                elem = [_render_element(want, e) for e in sorted(new, key=repr)]
                adds.append({"add": {"element": {**ref, "name": name, "elem": elem}}})
        for name in removed_chains + sorted(recreate_chains):
            out.append({"delete": {"chain": {**ref, "name": name}}})
        for name in removed_sets:
            out.append({"delete": {want_kind(actual.sets[name]): {**ref, "name": name}}})
        for name in sorted(set(actual.counters) - desired.counters):
            out.append({"delete": {"counter": {**ref, "name": name}}})
        for name in sorted(desired.counters - set(actual.counters)):
            out.append({"add": {"counter": {**ref, "name": name}}})
        for name, want in sorted(desired.sets.items()):
            if name not in actual.sets or name in rebuilt:
                out.append({"add": {want_kind(want): _set_object(want)}})
        for name, chain in sorted(desired.chains.items()):
            if name not in actual.chains or name in recreate_chains:
                out.append({"add": {"chain": _chain_object(chain)}})
        out.extend(adds)
        for name in rewrite:
            for rule in desired.chains[name].rules:
                out.append({"add": {"rule": {**ref, "chain": name, "expr": list(rule), "comment": rule_id(rule)}}})
        return out

    def apply(self, desired: NftTable, verify: bool = True) -> list[dict[str, Any]]:
        """Make the table equal to desired; return the commands sent (empty when nothing changed).

        verify=False diffs against what the last apply left instead of reading the kernel: an
        update then costs what it changes, not the size of the table. The periodic resync
        verifies, which repairs anything changed behind our back.
        """
        with self._lock:
            actual = self._applied if (not verify and self._applied is not None) else self.read()
            commands = self.plan(desired, actual)
            try:
                self._run_json(commands)
            except NftError:
                self._applied = None
                raise
            self._applied = as_actual(desired)
            return commands

    def counters(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return self.read().counters

    def delete_table(self) -> None:
        with self._lock:
            self._applied = None
            if self.read().exists:
                self._run_json([{"delete": {"table": {"family": TABLE_FAMILY, "name": TABLE_NAME}}}])


def as_actual(table: NftTable) -> ActualTable:
    """What the kernel holds after `table` was applied, in the form read() returns."""
    return ActualTable(
        exists=True,
        chains={name: (c.hook, [rule_id(r) for r in c.rules]) for name, c in table.chains.items()},
        sets={
            name: NftSet(s.name, s.type, s.flags, s.map, canonical_elements(s, s.elements))
            for name, s in table.sets.items()
        },
        counters={name: (0, 0) for name in table.counters},
    )


def want_kind(s: NftSet) -> str:
    return "map" if s.map else "set"
