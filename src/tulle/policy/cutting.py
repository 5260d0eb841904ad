"""Which established connections a policy change denies (pure).

The datapath accepts `ct state established,related` before any policy check, so a policy
update only decides new connections. After an update the agent lists the node's conntrack
table (dataplane/conntrack.py), asks `connections_to_cut` which entries are now denied, and
deletes those (dataplane/conntrack.py again); the next packet of such a connection is seen as
new (nf_conntrack_tcp_loose) and dropped by the policy chains.

The decision uses the same verdict code as trace (`tulle.policy.verdict.decide`), on the flow
as the forward hook saw its first packet (`Connection.flow`). Only the side enforced on this
node is judged: ingress if the destination is a local endpoint (unless the source is the node
itself: Kubernetes allows a node's traffic to its pods), egress if the source is one.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from tulle.kernelstate.conntrack import Connection
from tulle.policy.compiler import EGRESS, INGRESS, PolicyModel
from tulle.policy.verdict import decide


def _canonical(addresses: Iterable[str]) -> set[str]:
    out = set()
    for a in addresses:
        try:
            out.add(str(ipaddress.ip_interface(a).ip))
        except ValueError:
            continue
    return out


def connections_to_cut(
    model: PolicyModel,
    local_ips: Iterable[str],
    connections: Iterable[Connection],
    node_addresses: Iterable[str] = (),
) -> list[Connection]:
    """The connections the model denies on the side this node enforces.

    A connection that stays allowed is never returned: it is judged exactly as the datapath
    judges a new connection, and only where this node's chains would see it.

    >>> connections_to_cut(model, ["10.244.1.5"], list_connections(), node_addresses())  # doctest: +SKIP
    [Connection(family=4, protocol=6, src='10.244.2.7', dst='10.244.1.5', ...)]
    """
    local = _canonical(local_ips)
    node = _canonical(node_addresses)
    out: list[Connection] = []
    for conn in connections:
        src, dst, protocol, port = conn.flow
        src, dst = str(ipaddress.ip_address(src)), str(ipaddress.ip_address(dst))
        if src in local and not decide(model, EGRESS, src, dst, protocol, port, all_rules=False).allowed:
            out.append(conn)
            continue
        ingress_here = dst in local and src not in node
        if ingress_here and not decide(model, INGRESS, src, dst, protocol, port, all_rules=False).allowed:
            out.append(conn)
    return out
