"""Why a flow is allowed or denied: the policy model's verdict, explained (pure).

`trace` reads the same compiled model the datapath is built from and decides with the same
function conntrack cutting uses (`tulle.policy.verdict.decide`). For each direction it says
which pod's policies decide, which policies isolate it, which rules allow the flow, and for a
denied flow why each candidate rule does not match (its peers or its ports).
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any

from tulle.model.protocols import PROTOCOL_NAMES, PROTOCOL_NUMBERS
from tulle.policy.compiler import EGRESS, INGRESS, PolicyModel, canonical_address
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


@dataclass(frozen=True)
class RuleCheck:
    """One rule that could have allowed the flow, and which of its halves matched."""

    policy: str
    direction: str
    index: int
    text: str
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

    def lines(self, peer: str) -> list[str]:
        v = self.verdict
        if v.pod is None:
            side = "destination" if v.direction == INGRESS else "source"
            return [f"{v.direction}: allowed, the {side} is not a known pod (no policy applies)"]
        if not v.isolating:
            kind = "Ingress" if v.direction == INGRESS else "Egress"
            return [f"{v.direction}: allowed, {v.pod} is not isolated (no policy selecting it has {kind})"]
        out = [f"{v.direction}: {v.pod} is isolated by {', '.join(v.isolating)}"]
        if v.allowed_by:
            for check in self.checks:
                if check.allows:
                    out.append(f"  allowed by {check.text}")
            return out
        out.append(f"  denied: no {v.direction} rule of these policies allows it")
        if not self.checks:
            out.append(f"  (the policies have no {v.direction} rules: they deny all {v.direction})")
        for check in self.checks:
            why = []
            if not check.peer_matches:
                why.append(f"{peer} is not one of its peers")
            if not check.port_matches:
                why.append("the port does not match")
            out.append(f"  {check.text}: {' and '.join(why)}")
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
    src_atom: int
    dst_atom: int
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
        out = [f"{'ALLOWED' if self.allowed else 'DENIED'}  {self.flow_text()}"]
        out.append(f"  source       {self.src} ({self.src_pod or 'not a pod'}, atom {self.src_atom})")
        out.append(f"  destination  {self.dst} ({self.dst_pod or 'not a pod'}, atom {self.dst_atom})")
        out.extend("  " + line for line in self.egress.lines(f"{self.dst} ({self.dst_pod or 'not a pod'})"))
        out.extend("  " + line for line in self.ingress.lines(f"{self.src} ({self.src_pod or 'not a pod'})"))
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "verdict": "allowed" if self.allowed else "denied",
            "protocol": protocol_name(self.protocol),
            "port": self.port,
            "src": {"address": self.src, "pod": self.src_pod, "atom": self.src_atom},
            "dst": {"address": self.dst, "pod": self.dst_pod, "atom": self.dst_atom},
            "egress": self.egress.to_json(),
            "ingress": self.ingress.to_json(),
        }


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
                    rule.text(),
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
        src_atom=model.atom(src),
        dst_atom=model.atom(dst),
        egress=_direction(model, EGRESS, src, dst, number, port),
        ingress=_direction(model, INGRESS, src, dst, number, port),
    )
