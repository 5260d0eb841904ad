"""`tulle policy trace SRC DST PORT/PROTO`: would this flow be allowed, and why.

    tulle policy trace web/frontend web/backend 8080/tcp --lab demo
    tulle policy trace 10.244.1.5 10.244.2.7 53/udp --datastore http://127.0.0.1:2379 -o json
    tulle policy trace web/frontend 192.0.2.1 icmp --family 6 --lab demo

The answer comes from the same compiled model the agents build their datapath from.
"""

from __future__ import annotations

import argparse
import ipaddress
import sys
from typing import Any

from tulle.cli.common import UserError, add_datastore_args, open_datastore, print_json
from tulle.datastore.base import DatastoreError
from tulle.model import kinds
from tulle.model.protocols import KUBERNETES_PROTOCOL_NAMES, PORT_PROTOCOLS, PROTOCOL_NUMBERS
from tulle.policy.compiler import PolicyModel, compile_policies
from tulle.policy.inputs import inputs_from_objects
from tulle.policy.trace import protocol_number, trace

# The exit statuses of `policy trace`, for scripts (argparse's own errors are 2 as well).
EXIT_ALLOWED = 0
EXIT_DENIED = 1
EXIT_ERROR = 2


def register(sub: Any) -> None:
    policy = sub.add_parser("policy", help="NetworkPolicy tools", description="NetworkPolicy tools")
    verbs = policy.add_subparsers(dest="verb", metavar="VERB", required=True)
    p = verbs.add_parser(
        "trace",
        help="explain whether a flow is allowed",
        description=(
            "Say whether policy allows a flow and why: which policies isolate the source (egress) "
            "and the destination (ingress), and which rule allows it or that none does. Rules are "
            "named by policy, direction and number, counted from 1 in the policy's spec.ingress or "
            "spec.egress: `policy shop/allow-web, ingress rule 1 (from pods app=client in namespace "
            "shop, port 80/TCP)`."
        ),
        epilog=(
            "exit status: 0 if the flow is allowed, 1 if it is denied, 2 on an error (a bad "
            "argument, an unknown pod, an unreachable datastore), so that scripts can test a flow."
        ),
    )
    p.add_argument("src", metavar="SRC", help="source: NAMESPACE/POD, POD (in default) or an address")
    p.add_argument("dst", metavar="DST", help="destination: NAMESPACE/POD, POD (in default) or an address")
    p.add_argument("port", metavar="PORT/PROTO", help="destination port and protocol: 80/tcp, 53/udp, 9/sctp, icmp")
    p.add_argument("--family", type=int, choices=(4, 6), default=4, help="address family of pods (default 4)")
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format")
    add_datastore_args(p)
    p.set_defaults(func=run_trace, error_status=EXIT_ERROR)


def parse_port(text: str) -> tuple[int, int | None]:
    """(protocol, port) from PORT/PROTO: '80/tcp' -> (6, 80), '80' -> (6, 80), 'icmp' -> (1, None)."""
    parts = text.lower().split("/")
    if len(parts) == 1 and not parts[0].isdigit():
        try:
            number = protocol_number(parts[0])
        except ValueError as exc:
            raise UserError(str(exc)) from None
        if number in PORT_PROTOCOLS:
            raise UserError(f"{text!r} needs a port: write PORT/{parts[0]}, e.g. 80/{parts[0]}")
        return number, None
    if len(parts) > 2 or not parts[0].isdigit() or not 0 < int(parts[0]) < 65536:
        raise UserError(f"{text!r} is not PORT/PROTO: write e.g. 80/tcp, 53/udp or icmp")
    protocol = parts[1] if len(parts) == 2 else "tcp"
    if PROTOCOL_NUMBERS.get(protocol) not in PORT_PROTOCOLS:
        known = ", ".join(name.lower() for name in KUBERNETES_PROTOCOL_NAMES)
        raise UserError(f"protocol {protocol!r} has no ports here; use one of {known}, or icmp alone")
    return PROTOCOL_NUMBERS[protocol], int(parts[0])


def resolve_endpoint(model: PolicyModel, text: str, family: int) -> str:
    """An address from an address or NAMESPACE/POD (the pod's address of the family)."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        pass
    key = text if "/" in text else f"default/{text}"
    pod = model.pods.get(key)
    if pod is None:
        raise UserError(f"no pod {key} (give NAMESPACE/POD as in `tulle get pods -A`, or an address)")
    for address in pod.addresses:
        if ipaddress.ip_address(address).version == family:
            return address
    have = ", ".join(pod.addresses) or "none yet"
    raise UserError(f"pod {key} has no IPv{family} address (it has: {have}); try --family {10 - family}")


def _literal(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def load_model(args: argparse.Namespace) -> PolicyModel:
    store = open_datastore(args)
    try:
        objects = [
            store.list(kind)[0] for kind in (kinds.NAMESPACE, kinds.POD, kinds.NETWORK_POLICY, kinds.WORKLOAD_ENDPOINT)
        ]
    except DatastoreError as exc:
        raise UserError(str(exc)) from None
    finally:
        store.close()
    return compile_policies(inputs_from_objects(*objects))


def run_trace(args: argparse.Namespace) -> int:
    protocol, port = parse_port(args.port)
    model = load_model(args)
    for warning in model.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    # An address given on one side decides the family of a pod named on the other.
    family = next((a.version for a in map(_literal, (args.src, args.dst)) if a is not None), args.family)
    src = resolve_endpoint(model, args.src, family)
    dst = resolve_endpoint(model, args.dst, family)
    try:
        result = trace(model, src, dst, protocol, port)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.output == "json":
        print_json(result.to_json())
    else:
        print("\n".join(result.lines()))
    return EXIT_ALLOWED if result.allowed else EXIT_DENIED
