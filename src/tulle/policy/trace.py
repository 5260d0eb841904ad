"""Why a flow is allowed or denied: the policy model's verdict, explained (pure).

`trace` reads the same compiled model the datapath is built from and decides with the same
function conntrack cutting uses (`tulle.policy.verdict.decide`). For each direction it says
which pod's policies decide, which policies isolate it, which rules allow the flow, and for a
denied flow why each candidate rule does not match (its peers or its ports).

It speaks the user's words, never the model's (atoms, intervals): a rule is named by its
policy, its direction and its place in the policy's `spec.ingress` or `spec.egress` counted
from 1, and said with its peers and ports: `policy shop/allow-web, ingress rule 1 (from pods
app=client in namespace shop, port 80/TCP)`.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from tulle.model.protocols import PROTOCOL_NAMES, PROTOCOL_NUMBERS
from tulle.policy.compiler import EGRESS, INGRESS, CompiledPort, CompiledRule, PolicyModel, canonical_address
from tulle.policy.verdict import (
    DirectionVerdict,
    decide,
    peer_matches,
    port_matches,
    resolution_for,
)


def protocol_number(protocol: str | int) -> int:
    """An IP protocol number from a name or number: 'TCP' -> 6.

    >>> protocol_number("sctp")
    132
    """
    if isinstance(protocol, int):
        return protocol
    if protocol.isdigit():
        return int(protocol)
    found = PROTOCOL_NUMBERS.get(protocol.lower())
    if found is None:
        try:
            found = socket.getprotobyname(protocol.lower())
        except OSError:
            raise ValueError(f"unknown protocol {protocol!r} (use TCP, UDP, SCTP or ICMP)") from None
    return found


def protocol_name(number: int) -> str:
    return PROTOCOL_NAMES.get(number, str(number))


def ports_words(ports: tuple[CompiledPort, ...] | None) -> str:
    """A rule's ports as a user reads them.

    >>> ports_words(None), ports_words((CompiledPort(6, 80, 80),)), ports_words((CompiledPort(17),))
    ('all ports', 'port 80/TCP', 'all UDP ports')
    >>> ports_words((CompiledPort(6, 8000, 8080), CompiledPort(6, name="http")))
    'ports 8000-8080/TCP, http/TCP'
    """
    if ports is None:
        return "all ports"
    if len(ports) == 1 and (ports[0].first, ports[0].last) == (0, 65535) and not ports[0].name:
        return f"all {protocol_name(ports[0].protocol)} ports"
    single = len(ports) == 1 and (ports[0].name or ports[0].first == ports[0].last)
    return ("port " if single else "ports ") + ", ".join(p.text() for p in ports)


def rule_body_words(rule: CompiledRule) -> str:
    """What a rule allows: `from pods app=a in namespace x, port http/TCP`."""
    word = "from" if rule.direction == INGRESS else "to"
    peers = " or ".join(rule.peer_text) if rule.peer_text else "anywhere"
    return f"{word} {peers}, {ports_words(rule.ports)}"


def rule_words(rule: CompiledRule) -> str:
    """`ingress rule 2 (from pods app=a in namespace x, port http/TCP)`: numbered from 1, in
    the order of the policy's spec.ingress (or spec.egress)."""
    return f"{rule.direction} rule {rule.index + 1} ({rule_body_words(rule)})"


def policy_rule_words(rule: CompiledRule) -> str:
    """`policy shop/allow-web, ingress rule 1 (from ..., port 80/TCP)`."""
    return f"policy {rule.policy}, {rule_words(rule)}"


def flow_port_words(protocol: int, port: int | None) -> str:
    return f"port {port}/{protocol_name(protocol)}" if port is not None else f"protocol {protocol_name(protocol)}"


def _policies_words(keys: tuple[str, ...]) -> str:
    return ("policy " if len(keys) == 1 else "policies ") + ", ".join(keys)


@dataclass(frozen=True)
class RuleCheck:
    """One rule that could have allowed the flow, and which of its halves matched."""

    policy: str
    direction: str
    index: int  # in the policy's spec.ingress or spec.egress, from 0
    text: str  # in the user's words: policy_rule_words
    peer_matches: bool
    port_matches: bool

    @property
    def allows(self) -> bool:
        return self.peer_matches and self.port_matches


@dataclass(frozen=True)
class DirectionTrace:
    verdict: DirectionVerdict
    checks: tuple[RuleCheck, ...]

    @property
    def allowed(self) -> bool:
        return self.verdict.allowed

    def status(self) -> str:
        v = self.verdict
        if v.pod is None:
            return "not a pod"
        if not v.isolating:
            return "not isolated"
        return "allowed" if v.allowed_by else "denied"

    def lines(self, peer: str, flow_port: str) -> list[str]:
        """What decided this direction; `peer` names the other side, `flow_port` the flow's port."""
        v = self.verdict
        if v.pod is None:
            side = "destination" if v.direction == INGRESS else "source"
            return [f"{v.direction}: allowed, the {side} is not a pod (no policy applies)"]
        if not v.isolating:
            kind = "Ingress" if v.direction == INGRESS else "Egress"
            return [f"{v.direction}: allowed, pod {v.pod} is not isolated (no policy selecting it has {kind})"]
        out = [f"{v.direction}: pod {v.pod} is isolated by {_policies_words(v.isolating)}"]
        if v.allowed_by:
            out += [f"  allowed by {check.text}" for check in self.checks if check.allows]
            return out
        them = "this policy" if len(v.isolating) == 1 else "these policies"
        out.append(f"  denied: no {v.direction} rule of {them} allows it")
        if not self.checks:
            out.append(f"  ({them} {'has' if len(v.isolating) == 1 else 'have'} no {v.direction} rules)")
        for check in self.checks:
            why = []
            if not check.peer_matches:
                why.append(f"{peer} is not one of its peers")
            if not check.port_matches:
                why.append(f"{flow_port} is not one of its ports")
            out.append(f"  {check.text}: {', and '.join(why)}")
        return out

    def to_json(self) -> dict[str, Any]:
        v = self.verdict
        return {
            "pod": v.pod,
            "status": self.status(),
            "isolatedBy": list(v.isolating),
            "allowedBy": [{"policy": c.policy, "index": c.index, "rule": c.text} for c in self.checks if c.allows],
            "rules": [
                {
                    "policy": c.policy,
                    "index": c.index,
                    "rule": c.text,
                    "peerMatches": c.peer_matches,
                    "portMatches": c.port_matches,
                }
                for c in self.checks
            ],
        }


@dataclass(frozen=True)
class TraceResult:
    src: str
    dst: str
    protocol: int
    port: int | None
    src_pod: str | None
    dst_pod: str | None
    egress: DirectionTrace
    ingress: DirectionTrace

    @property
    def allowed(self) -> bool:
        return self.egress.allowed and self.ingress.allowed

    def flow_text(self) -> str:
        port = f":{self.port}" if self.port is not None else ""
        return f"{protocol_name(self.protocol)} {self.src} -> {self.dst}{port}"

    def lines(self) -> list[str]:
        """A readable explanation, one line per fact."""
        src, dst = _side_words(self.src, self.src_pod), _side_words(self.dst, self.dst_pod)
        flow_port = flow_port_words(self.protocol, self.port)
        out = [f"{'ALLOWED' if self.allowed else 'DENIED'}  {self.flow_text()}"]
        out.append(f"  source       {src}")
        out.append(f"  destination  {dst}")
        out.extend("  " + line for line in self.egress.lines(dst, flow_port))
        out.extend("  " + line for line in self.ingress.lines(src, flow_port))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": "allowed" if self.allowed else "denied",
            "protocol": protocol_name(self.protocol),
            "port": self.port,
            "src": {"address": self.src, "pod": self.src_pod},
            "dst": {"address": self.dst, "pod": self.dst_pod},
            "egress": self.egress.to_json(),
            "ingress": self.ingress.to_json(),
        }


def _side_words(address: str, pod: str | None) -> str:
    return f"pod {pod} ({address})" if pod else f"{address} (not a pod)"


def _direction(
    model: PolicyModel, direction: str, src: str, dst: str, protocol: int, port: int | None
) -> DirectionTrace:
    verdict = decide(model, direction, src, dst, protocol, port)
    pod = model.pod_at(dst if direction == INGRESS else src)
    checks: list[RuleCheck] = []
    if pod is not None:
        family = ipaddress.ip_address(dst).version
        resolution = resolution_for(model, direction, pod, verdict.peer_atom)
        for rule in model.rules(pod, direction):
            checks.append(
                RuleCheck(
                    rule.policy,
                    direction,
                    rule.index,
                    policy_rule_words(rule),
                    peer_matches(rule, family, verdict.peer_atom),
                    port_matches(rule, protocol, port, resolution),
                )
            )
    return DirectionTrace(verdict, tuple(checks))


def trace(model: PolicyModel, src: str, dst: str, protocol: str | int, port: int | None) -> TraceResult:
    """The verdict for src -> dst and why, from the compiled model.

    >>> from tulle.policy.compiler import compile_policies
    >>> from tulle.policy.inputs import inputs_from_objects
    >>> model = compile_policies(inputs_from_objects([], [], [], []))
    >>> trace(model, "10.0.0.1", "10.0.0.2", "TCP", 80).allowed
    True
    """
    src, dst = canonical_address(src), canonical_address(dst)
    if ipaddress.ip_address(src).version != ipaddress.ip_address(dst).version:
        raise ValueError(f"{src} and {dst} are not of the same IP family")
    number = protocol_number(protocol)
    src_pod, dst_pod = model.pod_at(src), model.pod_at(dst)
    return TraceResult(
        src=src,
        dst=dst,
        protocol=number,
        port=port,
        src_pod=src_pod.key if src_pod else None,
        dst_pod=dst_pod.key if dst_pod else None,
        egress=_direction(model, EGRESS, src, dst, number, port),
        ingress=_direction(model, INGRESS, src, dst, number, port),
    )
