"""The NetworkPolicy compiler: from namespaces, pods and policies to a PolicyModel (pure).

The model is what both the datapath (`tulle.policy.datapath`) and the explanations
(`tulle.policy.trace`) read, so that what trace says is what the kernel does.

Atoms. Every peer of every rule is a predicate on addresses: a PodPeer holds for the addresses
of the pods it selects, a CidrPeer for its cidr minus its excepts (in its own family only). An
address's *signature* is the set of predicates that hold for it, plus, for a pod, how it
resolves the named ports that egress rules mention (an egress rule to port "http" allows
different numbers towards pods that define "http" differently). Each distinct signature gets a
31-bit id, its atom; atom 0 is the empty signature (no predicate holds, no named port). The
address space of each family is cut into disjoint intervals, each with one atom, covering the
whole space. A rule then allows a set of atoms (or every address of a family, `None`), and the
datapath asks "is the peer's atom in the rule's set", whatever the number of pods behind it.

Pods that share namespace and labels are one *group* (no selector can tell them apart);
selectors are evaluated once per group with bitmask indexes (`tulle.model.selectors`).

Atom ids are stable: given the previous model, a signature that still exists keeps its id,
and a new signature takes over the id its addresses had before when that id is free (a new
policy that selects exactly the pods of an existing atom changes no interval of the map).
"""

from __future__ import annotations

import bisect
import ipaddress
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

from tulle.model.protocols import PROTOCOL_NAMES
from tulle.model.selectors import LabelIndex, LabelSelector, bits, mask_of
from tulle.policy.inputs import (
    TYPE_EGRESS,
    TYPE_INGRESS,
    CidrPeer,
    Labels,
    Namespace,
    Peer,
    Pod,
    PodPeer,
    Policy,
    PolicyInputs,
    PortEntry,
    Rule,
)

INGRESS = "ingress"
EGRESS = "egress"
DIRECTIONS = (INGRESS, EGRESS)
FAMILIES = (4, 6)
LAST_ADDRESS = {4: (1 << 32) - 1, 6: (1 << 128) - 1}
MAX_ATOM = (1 << 32) - 1  # the datapath carries the atom in the 32-bit ct mark

Resolution = frozenset[tuple[str, int, int]]  # named ports: (name, protocol, number)
Signature = tuple[frozenset[Peer], Resolution]
EMPTY_SIGNATURE: Signature = (frozenset(), frozenset())


class CompileError(Exception):
    pass


@dataclass(frozen=True)
class CompiledPort:
    """One port entry: protocol and inclusive range, or a name resolved per destination pod."""

    protocol: int
    first: int = 0
    last: int = 65535
    name: str = ""

    def text(self) -> str:
        proto = PROTOCOL_NAMES.get(self.protocol, str(self.protocol))
        if self.name:
            return f"{self.name}/{proto}"
        if (self.first, self.last) == (0, 65535):
            return f"any/{proto}"
        if self.first == self.last:
            return f"{self.first}/{proto}"
        return f"{self.first}-{self.last}/{proto}"


@dataclass(frozen=True)
class CompiledRule:
    policy: str  # namespace/name
    direction: str  # ingress | egress
    index: int  # position in the policy's ingress or egress list
    peers_v4: frozenset[int] | None  # atoms allowed; None = every IPv4 address
    peers_v6: frozenset[int] | None
    ports: tuple[CompiledPort, ...] | None  # None = every port and protocol
    peer_text: tuple[str, ...] = field(default=(), compare=False)  # () = everyone

    def peers(self, family: int) -> frozenset[int] | None:
        return self.peers_v4 if family == 4 else self.peers_v6

    def text(self) -> str:
        peers = "; ".join(self.peer_text) if self.peer_text else "everyone"
        ports = ", ".join(p.text() for p in self.ports) if self.ports is not None else "all ports"
        word = "from" if self.direction == INGRESS else "to"
        return f"{self.policy} {self.direction}[{self.index}]: {word} {peers} on {ports}"


@dataclass(frozen=True)
class CompiledPolicy:
    namespace: str
    name: str
    pod_selector: str  # as text, for explanations
    ingress: tuple[CompiledRule, ...] | None  # None: Ingress is not in its policyTypes
    egress: tuple[CompiledRule, ...] | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def rules(self, direction: str) -> tuple[CompiledRule, ...]:
        return (self.ingress if direction == INGRESS else self.egress) or ()


@dataclass(frozen=True)
class PodPolicy:
    """A pod as policy sees it: where it is, its named ports, and who isolates it."""

    namespace: str
    name: str
    addresses: tuple[str, ...]
    named_ports: Resolution  # every named port of its containers
    ingress: tuple[str, ...]  # keys of the policies isolating it for ingress; () = not isolated
    egress: tuple[str, ...]

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def isolating(self, direction: str) -> tuple[str, ...]:
        return self.ingress if direction == INGRESS else self.egress


@dataclass(frozen=True)
class AtomTable:
    """Disjoint intervals covering a family's address space, each with its atom."""

    family: int
    starts: tuple[int, ...] = (0,)
    lasts: tuple[int, ...] = ()
    atoms: tuple[int, ...] = (0,)

    def lookup(self, address: int) -> int:
        return self.atoms[bisect.bisect_right(self.starts, address) - 1]

    def intervals(self) -> Iterator[tuple[int, int, int]]:
        """(first, last, atom) for each interval, in address order."""
        return zip(self.starts, self.lasts, self.atoms, strict=True)


def _empty_table(family: int) -> AtomTable:
    return AtomTable(family, (0,), (LAST_ADDRESS[family],), (0,))


@dataclass(frozen=True)
class PolicyModel:
    atoms_v4: AtomTable = field(default_factory=lambda: _empty_table(4))
    atoms_v6: AtomTable = field(default_factory=lambda: _empty_table(6))
    signatures: Mapping[Signature, int] = field(default_factory=dict, compare=False)
    named_ports: Mapping[int, Resolution] = field(default_factory=dict)  # atom -> egress named ports
    pods: Mapping[str, PodPolicy] = field(default_factory=dict)  # namespace/name -> pod
    addresses: Mapping[str, str] = field(default_factory=dict)  # address -> namespace/name
    policies: Mapping[str, CompiledPolicy] = field(default_factory=dict)
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def atom_table(self, family: int) -> AtomTable:
        return self.atoms_v4 if family == 4 else self.atoms_v6

    def atom(self, address: str) -> int:
        ip = ipaddress.ip_address(address)
        return self.atom_table(ip.version).lookup(int(ip))

    def pod_at(self, address: str) -> PodPolicy | None:
        key = self.addresses.get(canonical_address(address))
        return self.pods.get(key) if key else None

    def rules(self, pod: PodPolicy, direction: str) -> Iterator[CompiledRule]:
        """Every rule, in policy order, that can allow traffic for the pod in that direction."""
        for key in pod.isolating(direction):
            yield from self.policies[key].rules(direction)


def canonical_address(address: str) -> str:
    try:
        return str(ipaddress.ip_address(address))
    except ValueError:
        return address


# -- selection -----------------------------------------------------------------------------------


class _Selection:
    """Which pod groups a peer or a policy selects, as a bitmask over groups."""

    def __init__(self, namespaces: Sequence[Namespace], groups: Sequence[tuple[str, Labels]]) -> None:
        self._ns_names = [ns.name for ns in namespaces]
        self._ns_index = LabelIndex([dict(ns.labels) for ns in namespaces])
        self._groups = LabelIndex([dict(labels) for _, labels in groups])
        members: dict[str, list[int]] = {}
        for gid, (namespace, _) in enumerate(groups):
            members.setdefault(namespace, []).append(gid)
        self._in_namespace = {ns: mask_of(gids) for ns, gids in members.items()}
        self._namespaces: dict[LabelSelector, int] = {}

    def _selected_namespaces(self, selector: LabelSelector) -> int:
        found = self._namespaces.get(selector)
        if found is None:
            found = 0
            for i in bits(self._ns_index.select(selector)):
                found |= self._in_namespace.get(self._ns_names[i], 0)
            self._namespaces[selector] = found
        return found

    def pods(self, namespace: str | None, namespace_selector: LabelSelector | None, pods: LabelSelector) -> int:
        if namespace_selector is None:
            scope = self._in_namespace.get(namespace or "", 0)
        else:
            scope = self._selected_namespaces(namespace_selector)
        return scope & self._groups.select(pods) if scope else 0


# -- address intervals ---------------------------------------------------------------------------


def _universal(peer: CidrPeer) -> bool:
    return not peer.excepts and ipaddress.ip_network(peer.cidr).prefixlen == 0


def cidr_intervals(peer: CidrPeer) -> list[tuple[int, int]]:
    """The cidr minus its excepts, as disjoint inclusive integer intervals in order.

    >>> [(str(ipaddress.ip_address(a)), str(ipaddress.ip_address(b)))
    ...  for a, b in cidr_intervals(CidrPeer("10.0.0.0/30", ("10.0.0.1/32",)))]
    [('10.0.0.0', '10.0.0.0'), ('10.0.0.2', '10.0.0.3')]
    """
    net = ipaddress.ip_network(peer.cidr)
    out: list[tuple[int, int]] = []
    position = int(net.network_address)
    holes = sorted((int(e.network_address), int(e.broadcast_address)) for e in map(ipaddress.ip_network, peer.excepts))
    for lo, hi in holes:
        if lo > position:
            out.append((position, lo - 1))
        position = max(position, hi + 1)
    if position <= int(net.broadcast_address):
        out.append((position, int(net.broadcast_address)))
    return out


def _segments(
    family: int, cidrs: Sequence[CidrPeer], points: Mapping[int, Signature]
) -> list[tuple[int, int, Signature]]:
    """Cut the family's space where any predicate starts or ends; the signature of each piece."""
    last = LAST_ADDRESS[family]
    starting: dict[int, list[CidrPeer]] = {}
    ending: dict[int, list[CidrPeer]] = {}
    for peer in cidrs:
        for lo, hi in cidr_intervals(peer):
            starting.setdefault(lo, []).append(peer)
            if hi < last:
                ending.setdefault(hi + 1, []).append(peer)
    cuts = {0, *starting, *ending, *points}
    cuts.update(a + 1 for a in points if a < last)
    ordered = sorted(cuts)
    active: set[Peer] = set()
    current: frozenset[Peer] = frozenset()
    out: list[tuple[int, int, Signature]] = []
    for i, first in enumerate(ordered):
        if first in starting or first in ending:
            active.difference_update(ending.get(first, ()))
            active.update(starting.get(first, ()))
            current = frozenset(active)
        end = ordered[i + 1] - 1 if i + 1 < len(ordered) else last
        point = points.get(first)
        if point is not None:
            out.append((first, end, (current | point[0], point[1])))
        else:
            out.append((first, end, (current, frozenset())))
    return out


def _assign_atoms(
    segments: Mapping[int, list[tuple[int, int, Signature]]], previous: PolicyModel | None
) -> dict[Signature, int]:
    pieces: dict[Signature, list[tuple[int, int]]] = {}  # signature -> (family, first) of its pieces
    for family, family_segments in segments.items():
        for first, _, sig in family_segments:
            pieces.setdefault(sig, []).append((family, first))
    assigned = _keep_previous_ids(pieces, previous)
    used = set(assigned.values())
    free = 1
    for sig in pieces:
        if sig in assigned:
            continue
        chosen = _id_of_previous_addresses(pieces[sig], previous, used)
        if chosen is None:
            while free in used:
                free += 1
            if free > MAX_ATOM:
                raise CompileError("more than 2**31 distinct peer signatures")
            chosen = free
        assigned[sig] = chosen
        used.add(chosen)
    return assigned


def _keep_previous_ids(
    pieces: Mapping[Signature, list[tuple[int, int]]], previous: PolicyModel | None
) -> dict[Signature, int]:
    """The signatures that existed in the previous model, with their old ids (and the empty one, 0)."""
    assigned: dict[Signature, int] = {EMPTY_SIGNATURE: 0}
    if previous is None:
        return assigned
    used = {0}
    for sig in pieces:
        old = previous.signatures.get(sig)
        if sig not in assigned and old is not None and old not in used:
            assigned[sig] = old
            used.add(old)
    return assigned


def _id_of_previous_addresses(
    pieces: list[tuple[int, int]], previous: PolicyModel | None, used: set[int]
) -> int | None:
    """The free id most of a new signature's pieces had before, so that their intervals stay as they are."""
    if previous is None:
        return None
    votes = Counter(previous.atom_table(family).lookup(first) for family, first in pieces)
    for atom, _ in sorted(votes.items(), key=lambda kv: (-kv[1], kv[0])):
        if atom not in used:
            return atom
    return None


def _atom_table(family: int, pieces: list[tuple[int, int, Signature]], ids: Mapping[Signature, int]) -> AtomTable:
    starts: list[int] = []
    lasts: list[int] = []
    atoms: list[int] = []
    for first, last, sig in pieces:
        atom = ids[sig]
        if atoms and atoms[-1] == atom:
            lasts[-1] = last
            continue
        starts.append(first)
        lasts.append(last)
        atoms.append(atom)
    return AtomTable(family, tuple(starts), tuple(lasts), tuple(atoms))


# -- rules ---------------------------------------------------------------------------------------


def _port(entry: PortEntry) -> CompiledPort:
    if entry.name:
        return CompiledPort(entry.protocol, name=entry.name)
    if entry.port is None:
        return CompiledPort(entry.protocol)
    return CompiledPort(entry.protocol, entry.port, entry.end_port if entry.end_port is not None else entry.port)


class _RuleCompiler:
    def __init__(self, peer_atoms: Mapping[int, Mapping[Peer, set[int]]]) -> None:
        self._peer_atoms = peer_atoms
        self._cache: dict[tuple[tuple[Peer, ...], int], frozenset[int] | None] = {}

    def peers(self, peers: tuple[Peer, ...], family: int) -> frozenset[int] | None:
        if not peers:
            return None  # no from/to: every address, pod or not
        if (peers, family) in self._cache:
            return self._cache[(peers, family)]
        atoms: set[int] = set()
        result: frozenset[int] | None = None
        for peer in peers:
            if isinstance(peer, CidrPeer):
                if peer.family != family:
                    continue  # an ipBlock says nothing about the other family
                if _universal(peer):
                    break
            atoms |= self._peer_atoms[family].get(peer, set())
        else:
            result = frozenset(atoms)
        self._cache[(peers, family)] = result
        return result

    def rule(self, policy: Policy, direction: str, rule: Rule) -> CompiledRule:
        return CompiledRule(
            policy=policy.key,
            direction=direction,
            index=rule.index,
            peers_v4=self.peers(rule.peers, 4),
            peers_v6=self.peers(rule.peers, 6),
            ports=tuple(_port(p) for p in rule.ports) if rule.ports else None,
            peer_text=tuple(p.text() for p in rule.peers),
        )


# -- the compiler --------------------------------------------------------------------------------


def compile_policies(inputs: PolicyInputs, previous: PolicyModel | None = None) -> PolicyModel:
    """The policy model of the cluster; pass the previous model to keep atom ids stable.

    >>> from tulle.policy.inputs import inputs_from_objects
    >>> model = compile_policies(inputs_from_objects([], [], [], []))
    >>> model.atom("10.1.2.3")
    0
    """
    warnings = list(inputs.warnings)
    groups = _PodGroups(inputs.pods)
    selection = _Selection(inputs.namespaces, groups.keys)
    peers = _PeersInRules.of(inputs.policies)
    group_signature = _group_signatures(selection, peers.pods, len(groups.keys))
    owner, points = _address_points(inputs.pods, groups, group_signature, peers.egress_port_names, warnings)

    segments = {f: _segments(f, list(peers.cidrs[f]), points[f]) for f in FAMILIES}
    ids = _assign_atoms(segments, previous)
    tables = {f: _atom_table(f, segments[f], ids) for f in FAMILIES}
    peer_atoms, named_ports = _atoms_of_peers(segments, ids)

    policies, isolating = _compile_rules(inputs.policies, _RuleCompiler(peer_atoms), selection, len(groups.keys))
    return PolicyModel(
        atoms_v4=tables[4],
        atoms_v6=tables[6],
        signatures=ids,
        named_ports=named_ports,
        pods=_pod_policies(inputs.pods, groups, isolating),
        addresses={address: inputs.pods[i].key for address, i in owner.items()},
        policies=policies,
        warnings=tuple(warnings),
    )


class _PodGroups:
    """Pods that share namespace and labels: no selector tells them apart, so they are selected once."""

    def __init__(self, pods: Sequence[Pod]) -> None:
        ids: dict[tuple[str, Labels], int] = {}
        self.of_pod = [ids.setdefault((pod.namespace, pod.labels), len(ids)) for pod in pods]  # pod index -> group
        self.keys = list(ids)  # group -> (namespace, labels)


@dataclass
class _PeersInRules:
    """Every distinct peer the policies' rules name, and the port names their egress rules use."""

    pods: set[PodPeer] = field(default_factory=set)
    cidrs: dict[int, set[CidrPeer]] = field(default_factory=lambda: {4: set(), 6: set()})  # universal ones left out
    egress_port_names: set[tuple[str, int]] = field(default_factory=set)  # (name, protocol)

    @classmethod
    def of(cls, policies: Sequence[Policy]) -> _PeersInRules:
        out = cls()
        for policy in policies:
            for direction, rules in ((INGRESS, policy.ingress), (EGRESS, policy.egress)):
                for rule in rules:
                    out._add(direction, rule)
        return out

    def _add(self, direction: str, rule: Rule) -> None:
        for peer in rule.peers:
            if isinstance(peer, PodPeer):
                self.pods.add(peer)
            elif not _universal(peer):
                self.cidrs[peer.family].add(peer)
        if direction == EGRESS:
            self.egress_port_names.update((p.name, p.protocol) for p in rule.ports if p.name)


def _group_signatures(selection: _Selection, pod_peers: set[PodPeer], group_count: int) -> list[frozenset[Peer]]:
    """Which pod peers hold for each group: evaluated once per distinct selection, not per peer."""
    by_mask: dict[int, list[PodPeer]] = {}
    for peer in pod_peers:
        mask = selection.pods(peer.namespace, peer.namespace_selector, peer.pod_selector)
        if mask:
            by_mask.setdefault(mask, []).append(peer)
    group_peers: list[list[PodPeer]] = [[] for _ in range(group_count)]
    for mask, peers in by_mask.items():
        for gid in bits(mask):
            group_peers[gid].extend(peers)
    return [frozenset(p) for p in group_peers]


def _address_points(
    pods: Sequence[Pod],
    groups: _PodGroups,
    group_signature: Sequence[frozenset[Peer]],
    egress_port_names: set[tuple[str, int]],
    warnings: list[str],
) -> tuple[dict[str, int], dict[int, dict[int, Signature]]]:
    """Who owns each pod address (address -> pod index), and the signature at each address per family.

    An address two pods claim stays the first one's; the second claim is a warning.
    """
    owner: dict[str, int] = {}
    points: dict[int, dict[int, Signature]] = {4: {}, 6: {}}
    for i, pod in enumerate(pods):
        resolution: Resolution = frozenset(
            (n.name, n.protocol, n.port) for n in pod.named_ports if (n.name, n.protocol) in egress_port_names
        )
        for address in pod.addresses:
            if address in owner:
                warnings.append(
                    f"address {address} is claimed by pods {pods[owner[address]].key} and {pod.key}; "
                    f"policy treats it as {pods[owner[address]].key}'s"
                )
                continue
            owner[address] = i
            ip = ipaddress.ip_address(address)
            points[ip.version][int(ip)] = (group_signature[groups.of_pod[i]], resolution)
    return owner, points


def _atoms_of_peers(
    segments: Mapping[int, list[tuple[int, int, Signature]]], ids: Mapping[Signature, int]
) -> tuple[dict[int, dict[Peer, set[int]]], dict[int, Resolution]]:
    """Per family, the atoms each peer holds for; and the named ports of each atom that has some."""
    peer_atoms: dict[int, dict[Peer, set[int]]] = {4: {}, 6: {}}
    named_ports: dict[int, Resolution] = {}
    for family in FAMILIES:
        for sig in {sig for _, _, sig in segments[family]}:
            atom = ids[sig]
            for peer in sig[0]:
                peer_atoms[family].setdefault(peer, set()).add(atom)
            if sig[1]:
                named_ports[atom] = sig[1]
    return peer_atoms, named_ports


def _compile_rules(
    policies: Sequence[Policy], compiler: _RuleCompiler, selection: _Selection, group_count: int
) -> tuple[dict[str, CompiledPolicy], dict[str, list[list[str]]]]:
    """The compiled policies, and per direction and group the keys of the policies isolating it, in order."""
    compiled: dict[str, CompiledPolicy] = {}
    isolating: dict[str, list[list[str]]] = {d: [[] for _ in range(group_count)] for d in DIRECTIONS}
    for policy in policies:
        has_ingress, has_egress = TYPE_INGRESS in policy.types, TYPE_EGRESS in policy.types
        compiled[policy.key] = CompiledPolicy(
            namespace=policy.namespace,
            name=policy.name,
            pod_selector=policy.pod_selector.text(),
            ingress=tuple(compiler.rule(policy, INGRESS, r) for r in policy.ingress) if has_ingress else None,
            egress=tuple(compiler.rule(policy, EGRESS, r) for r in policy.egress) if has_egress else None,
        )
        for gid in bits(selection.pods(policy.namespace, None, policy.pod_selector)):
            if has_ingress:
                isolating[INGRESS][gid].append(policy.key)
            if has_egress:
                isolating[EGRESS][gid].append(policy.key)
    return compiled, isolating


def _pod_policies(
    pods: Sequence[Pod], groups: _PodGroups, isolating: Mapping[str, list[list[str]]]
) -> dict[str, PodPolicy]:
    ingress_keys = [tuple(keys) for keys in isolating[INGRESS]]
    egress_keys = [tuple(keys) for keys in isolating[EGRESS]]
    return {
        pod.key: PodPolicy(
            namespace=pod.namespace,
            name=pod.name,
            addresses=pod.addresses,
            named_ports=frozenset((n.name, n.protocol, n.port) for n in pod.named_ports),
            ingress=ingress_keys[groups.of_pod[i]],
            egress=egress_keys[groups.of_pod[i]],
        )
        for i, pod in enumerate(pods)
    }
