"""The verdict of the policy model for one flow, per direction (pure).

This is the model read the way the datapath reads it: the peer is known only by its atom, an
ingress named port is resolved against the destination pod, an egress named port against the
destination's atom. Trace explains flows with it and conntrack cutting decides with it, so
neither can disagree with the kernel about which connections are allowed.

Kubernetes semantics it encodes:
- egress is decided for the source pod and ingress for the destination pod, each only if that
  side is a known pod that some policy isolates in that direction;
- a flow is allowed in a direction if any rule of any isolating policy allows it (the union);
- a rule with ports only matches TCP, UDP and SCTP flows with a destination port.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from tulle.model.protocols import PORT_PROTOCOLS
from tulle.policy.compiler import (
    EGRESS,
    INGRESS,
    CompiledPort,
    CompiledRule,
    PodPolicy,
    PolicyModel,
    Resolution,
    canonical_address,
)


@dataclass(frozen=True, order=True)
class RuleRef:
    policy: str  # namespace/name
    direction: str
    index: int

    def text(self) -> str:
        return f"{self.policy} {self.direction}[{self.index}]"


@dataclass(frozen=True)
class DirectionVerdict:
    direction: str  # ingress | egress
    pod: str | None  # the pod whose policies decide: the destination (ingress) or source (egress)
    isolating: tuple[str, ...]  # the policies isolating it in this direction
    allowed_by: tuple[RuleRef, ...]  # the rules that allow the flow
    peer_atom: int  # the atom of the other side, as the datapath sees it

    @property
    def enforced(self) -> bool:
        return self.pod is not None and bool(self.isolating)

    @property
    def allowed(self) -> bool:
        return not self.enforced or bool(self.allowed_by)


def port_ranges(ports: Iterable[CompiledPort], resolution: Resolution) -> list[tuple[int, int, int]]:
    """(protocol, first, last) of each port entry; a named one gives each number it resolves to.

    A name matches a container port with the same name and protocol; a pod without it gets
    nothing from that entry (the rule does not match it through this entry).
    """
    out: list[tuple[int, int, int]] = []
    for p in ports:
        if not p.name:
            out.append((p.protocol, p.first, p.last))
            continue
        out.extend(
            (p.protocol, n, n) for name, proto, n in sorted(resolution) if name == p.name and proto == p.protocol
        )
    return out


def peer_matches(rule: CompiledRule, family: int, peer_atom: int) -> bool:
    peers = rule.peers(family)
    return peers is None or peer_atom in peers


def port_matches(rule: CompiledRule, protocol: int, port: int | None, resolution: Resolution) -> bool:
    if rule.ports is None:
        return True
    if port is None or protocol not in PORT_PROTOCOLS:
        return False
    ranges = port_ranges(rule.ports, resolution)
    return any(proto == protocol and first <= port <= last for proto, first, last in ranges)


def rule_allows(
    rule: CompiledRule, family: int, peer_atom: int, protocol: int, port: int | None, resolution: Resolution
) -> bool:
    return peer_matches(rule, family, peer_atom) and port_matches(rule, protocol, port, resolution)


def resolution_for(model: PolicyModel, direction: str, pod: PodPolicy, peer_atom: int) -> Resolution:
    """Named ports are the destination's: the pod itself for ingress, the peer's atom for egress."""
    if direction == INGRESS:
        return pod.named_ports
    return model.named_ports.get(peer_atom, frozenset())


def decide(
    model: PolicyModel,
    direction: str,
    src: str,
    dst: str,
    protocol: int,
    port: int | None,
    *,
    all_rules: bool = True,
) -> DirectionVerdict:
    """The verdict of one direction for the flow src -> dst (protocol, destination port).

    With all_rules=False it stops at the first allowing rule (enough to know the verdict).
    """
    src, dst = canonical_address(src), canonical_address(dst)
    family = ipaddress.ip_address(dst).version
    here, peer = (dst, src) if direction == INGRESS else (src, dst)
    pod = model.pod_at(here)
    peer_atom = model.atom(peer)
    if pod is None:
        return DirectionVerdict(direction, None, (), (), peer_atom)
    isolating = pod.isolating(direction)
    resolution = resolution_for(model, direction, pod, peer_atom)
    allowed: list[RuleRef] = []
    for rule in model.rules(pod, direction):
        if rule_allows(rule, family, peer_atom, protocol, port, resolution):
            allowed.append(RuleRef(rule.policy, direction, rule.index))
            if not all_rules:
                break
    return DirectionVerdict(direction, pod.key, isolating, tuple(allowed), peer_atom)


def flow_allowed(model: PolicyModel, src: str, dst: str, protocol: int, port: int | None) -> bool:
    """True if both the source's egress and the destination's ingress allow the flow."""
    return all(decide(model, d, src, dst, protocol, port, all_rules=False).allowed for d in (EGRESS, INGRESS))
