"""The reconciler that applies Tulle's nftables table (kernelstate/nft.py) to the kernel.

The table (family inet, name `tulle`) is Tulle's alone; nothing else is touched. A reconcile
reads the table, compares it with the desired state and sends the difference as one
libnftables JSON transaction, so a packet sees either the old or the new ruleset:
- set and map elements are added and deleted one by one (a label change touches elements);
- a chain is rewritten (flush + add, in the transaction) only when its rules differ; rules
  carry a comment with a hash of their content, so equal rules are recognised and kept with
  their handles;
- sets whose definition changed, and chains, counters and sets no longer wanted, are replaced
  or removed in the same transaction.

`read_table` and `plan` are pure; the libnftables context is injected (`NftRunner`), so the
whole reconcile runs in tests against a fake one.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Protocol

from tulle.kernelstate.nft import (
    Component,
    Key,
    NftChain,
    NftError,
    NftSet,
    NftTable,
    Rule,
    Scalar,
    canonical,
    canonical_elements,
)

Command = dict[str, Any]  # one command of a libnftables JSON transaction


class NftRunner(Protocol):
    """What the reconciler needs from libnftables."""

    def list_table(self, family: str, name: str) -> list[dict[str, Any]] | None:
        """The table's objects as `nft -j list table` gives them, or None if there is no table."""

    def run(self, commands: list[Command]) -> None:
        """Send the commands as one transaction; raise NftError if nftables refuses it."""


class Libnftables:
    """The real NftRunner: libnftables in the current network namespace."""

    def __init__(self) -> None:
        import nftables  # Debian's python3-nftables: the venv sees it through system site packages

        self._nft = nftables.Nftables()
        self._nft.set_json_output(True)
        self._nft.set_handle_output(True)
        self._nft.set_numeric_proto_output(True)
        self._nft.set_numeric_prio_output(True)

    def list_table(self, family: str, name: str) -> list[dict[str, Any]] | None:
        rc, out, err = self._nft.cmd(f"list table {family} {name}")
        if rc != 0:
            if "No such file" in err or "does not exist" in err:
                return None
            raise NftError(f"cannot read table {family} {name}: {err.strip()}")
        data = json.loads(out) if isinstance(out, str) else out
        return list(data["nftables"])

    def run(self, commands: list[Command]) -> None:
        rc, _out, err = self._nft.json_cmd({"nftables": commands})
        if rc != 0:
            raise NftError(f"nftables refused the transaction: {err.strip()}")


# -- what the kernel has ------------------------------------------------------------------------


ActualChain = tuple[tuple[str, str, int, str] | None, list[str]]  # (hook, rule ids in order)


@dataclass
class ActualTable:
    exists: bool = False
    chains: dict[str, ActualChain] = field(default_factory=dict)
    sets: dict[str, NftSet] = field(default_factory=dict)
    counters: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (packets, bytes)


def read_table(objects: list[dict[str, Any]] | None) -> ActualTable:
    """The table as the reconciler compares it, from `nft -j list table` (None: no table)."""
    if objects is None:
        return ActualTable()
    actual = ActualTable(exists=True)
    rules: dict[str, list[str]] = {}
    for item in objects:
        if "chain" in item:
            c = item["chain"]
            hook = (c["type"], c["hook"], int(c["prio"]), c.get("policy", "accept")) if "hook" in c else None
            actual.chains[c["name"]] = (hook, [])
        elif "rule" in item:
            r = item["rule"]
            rules.setdefault(r["chain"], []).append(r.get("comment", ""))
        elif "set" in item or "map" in item:
            raw = item["set"] if "set" in item else item["map"]
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


def as_actual(table: NftTable) -> ActualTable:
    """What the kernel holds after `table` was applied, in the form read_table returns."""
    return ActualTable(
        exists=True,
        chains={name: (c.hook, [rule_id(r) for r in c.rules]) for name, c in table.chains.items()},
        sets={name: canonical(s) for name, s in table.sets.items()},
        counters={name: (0, 0) for name in table.counters},
    )


# -- rendering as nft JSON ----------------------------------------------------------------------


def rule_id(rule: Rule) -> str:
    return "t:" + hashlib.sha256(json.dumps(rule, sort_keys=True).encode()).hexdigest()[:16]


def _table_ref(table: NftTable) -> dict[str, str]:
    return {"family": table.family, "table": table.name}


def _render_scalar(type_name: str, value: Scalar) -> Any:
    if type_name == "ipv4_addr":
        return str(ipaddress.IPv4Address(value))
    if type_name == "ipv6_addr":
        return str(ipaddress.IPv6Address(value))
    return value


def _render_component(s: NftSet, type_name: str, value: Component) -> Any:
    if isinstance(value, tuple):
        lo, hi = value
        if type_name == "ifname":  # nft has no ranges of names: an interface is one value
            return _render_scalar(type_name, lo)
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


def _set_object(s: NftSet, ref: dict[str, str]) -> dict[str, Any]:
    obj: dict[str, Any] = {
        **ref,
        "name": s.name,
        "type": list(s.type) if len(s.type) > 1 else s.type[0],
    }
    if s.flags:
        obj["flags"] = sorted(s.flags)
    if s.map:
        obj["map"] = s.map
    return obj


def _chain_object(c: NftChain, ref: dict[str, str]) -> dict[str, Any]:
    obj: dict[str, Any] = {**ref, "name": c.name}
    if c.hook:
        obj.update(type=c.hook[0], hook=c.hook[1], prio=c.hook[2], policy=c.hook[3])
    return obj


# -- the difference -----------------------------------------------------------------------------


def plan(desired: NftTable, actual: ActualTable) -> list[Command]:
    """The transaction that turns actual into desired (empty if nothing differs).

    Order matters inside the transaction: rules and elements that reference an object go
    before the object is deleted, and come after the object they reference is added.

    >>> plan(NftTable(), read_table(None))
    [{'add': {'table': {'family': 'inet', 'name': 'tulle'}}}]
    """
    ref = _table_ref(desired)
    changes = _ObjectChanges.between(desired, actual)
    element_deletes, element_adds = _element_changes(desired, actual, changes.rebuilt_sets)
    out: list[Command] = []
    if not actual.exists:
        out.append({"add": {"table": {"family": desired.family, "name": desired.name}}})
    # Flushed first: their rules may reference the elements and sets deleted next.
    for name in [n for n in changes.rewritten_chains if n in actual.chains] + changes.removed_chains:
        out.append({"flush": {"chain": {**ref, "name": name}}})
    out.extend(element_deletes)
    out.extend(_object_deletes(desired, actual, changes))
    out.extend(_object_adds(desired, actual, changes))
    out.extend(element_adds)
    for name in changes.rewritten_chains:
        for rule in desired.chains[name].rules:
            out.append({"add": {"rule": {**ref, "chain": name, "expr": list(rule), "comment": rule_id(rule)}}})
    return out


@dataclass(frozen=True)
class _ObjectChanges:
    """Which sets and chains a transaction replaces, rewrites or removes."""

    rebuilt_sets: frozenset[str]  # definition changed: deleted and added again, with all their elements
    rewritten_chains: list[str]  # rules sent again, in name order
    recreated_chains: frozenset[str]  # hook changed: deleted and added again
    removed_chains: list[str]
    removed_sets: list[str]  # no longer wanted, or rebuilt

    @classmethod
    def between(cls, desired: NftTable, actual: ActualTable) -> _ObjectChanges:
        rebuilt = frozenset(
            n for n, s in desired.sets.items() if n in actual.sets and actual.sets[n].definition() != s.definition()
        )
        # nft refuses to delete a set a rule references: when one is rebuilt, every chain is
        # flushed and its rules sent again.
        rewritten = [
            name
            for name, chain in sorted(desired.chains.items())
            if rebuilt or _chain_differs(chain, actual.chains.get(name))
        ]
        recreated = frozenset(
            n for n in rewritten if n in actual.chains and actual.chains[n][0] != desired.chains[n].hook
        )
        return cls(
            rebuilt_sets=rebuilt,
            rewritten_chains=rewritten,
            recreated_chains=recreated,
            removed_chains=sorted(set(actual.chains) - set(desired.chains)),
            removed_sets=sorted((set(actual.sets) - set(desired.sets)) | rebuilt),
        )


def _chain_differs(chain: NftChain, have: ActualChain | None) -> bool:
    return have is None or have[0] != chain.hook or have[1] != [rule_id(r) for r in chain.rules]


def _element_changes(
    desired: NftTable, actual: ActualTable, rebuilt_sets: frozenset[str]
) -> tuple[list[Command], list[Command]]:
    """The element deletes and adds that turn each set's actual elements into its desired ones
    (the kernel's own dynamic sets are left alone)."""
    ref = _table_ref(desired)
    deletes: list[Command] = []
    adds: list[Command] = []
    for name, want in sorted(desired.sets.items()):
        if want.filled_by_kernel:
            continue
        elements = canonical_elements(want, want.elements)
        current = actual.sets[name].elements if name in actual.sets and name not in rebuilt_sets else frozenset()
        gone, new = current - elements, elements - current
        if gone:
            elem = [_render_element(want, e) for e in sorted(gone, key=repr)]
            deletes.append({"delete": {"element": {**ref, "name": name, "elem": elem}}})
        if new:
            elem = [_render_element(want, e) for e in sorted(new, key=repr)]
            adds.append({"add": {"element": {**ref, "name": name, "elem": elem}}})
    return deletes, adds


def _object_deletes(desired: NftTable, actual: ActualTable, changes: _ObjectChanges) -> list[Command]:
    """Chains, sets and counters to delete: after the rules referencing them were flushed."""
    ref = _table_ref(desired)
    out: list[Command] = []
    for name in changes.removed_chains + sorted(changes.recreated_chains):
        out.append({"delete": {"chain": {**ref, "name": name}}})
    for name in changes.removed_sets:
        out.append({"delete": {actual.sets[name].kind: {**ref, "name": name}}})
    for name in sorted(set(actual.counters) - desired.counters):
        out.append({"delete": {"counter": {**ref, "name": name}}})
    return out


def _object_adds(desired: NftTable, actual: ActualTable, changes: _ObjectChanges) -> list[Command]:
    """Counters, sets and chains to add: before the elements and rules that reference them."""
    ref = _table_ref(desired)
    out: list[Command] = []
    for name in sorted(desired.counters - set(actual.counters)):
        out.append({"add": {"counter": {**ref, "name": name}}})
    for name, want in sorted(desired.sets.items()):
        if name not in actual.sets or name in changes.rebuilt_sets:
            out.append({"add": {want.kind: _set_object(want, ref)}})
    for name, chain in sorted(desired.chains.items()):
        if name not in actual.chains or name in changes.recreated_chains:
            out.append({"add": {"chain": _chain_object(chain, ref)}})
    return out


# -- the reconciler ------------------------------------------------------------------------------


class NftReconciler:
    """Applies an NftTable to the kernel with minimal, atomic changes.

    One reconciler per table (`inet tulle` by default); the desired table names the same one.

    >>> forward = NftChain("forward", (), ("filter", "forward", 0, "accept"))
    >>> NftReconciler().apply(NftTable(chains={"forward": forward}))  # doctest: +SKIP
    """

    def __init__(self, nft: NftRunner | None = None, family: str = "inet", name: str = "tulle") -> None:
        self._nft = nft if nft is not None else Libnftables()
        self.family = family
        self.name = name
        self._lock = threading.Lock()
        self._applied: ActualTable | None = None

    def read(self) -> ActualTable:
        return read_table(self._nft.list_table(self.family, self.name))

    def apply(self, desired: NftTable, verify: bool = True) -> list[Command]:
        """Make the table equal to desired; return the commands sent (empty when nothing changed).

        verify=False diffs against what the last apply left instead of reading the kernel: an
        update then costs what it changes, not the size of the table. The periodic resync
        verifies, which repairs anything changed behind our back.
        """
        if (desired.family, desired.name) != (self.family, self.name):
            raise NftError(f"this reconciler keeps {self.family} {self.name}, not {desired.family} {desired.name}")
        with self._lock:
            actual = self._applied if (not verify and self._applied is not None) else self.read()
            commands = plan(desired, actual)
            if commands:
                try:
                    self._nft.run(commands)
                except NftError:
                    self._applied = None
                    raise
            self._applied = as_actual(desired)
            return commands

    def counters(self) -> dict[str, tuple[int, int]]:
        with self._lock:
            return self.read().counters
