"""The node's conntrack table: listing its entries and deleting some (the only code that
touches conntrack). Which entries to delete is policy's decision (policy/cutting.py).

Listing uses the `conntrack` tool (conntrack-tools): it dumps ~2000 entries in ~20 ms, where
pyroute2's pure-Python decoder needs ~0.4 ms an entry, and a node's table easily holds
thousands. Deleting uses pyroute2's ctnetlink socket: one socket for all deletions, no process
per entry (~0.4 ms each). Entries of TCP connections that are over (TIME_WAIT, CLOSE) are not
listed: they carry nothing. The agent cuts in its own thread, after the new rules are in
place, so a large table never delays enforcement for new connections.
"""

from __future__ import annotations

import errno
import socket
import subprocess
from collections.abc import Iterable

from tulle.kernelstate.conntrack import Connection
from tulle.model.protocols import ICMP_PROTOCOLS, TCP


def _nfgen_family(family: int) -> int:
    return socket.AF_INET if family == 4 else socket.AF_INET6


_FINISHED_TCP = {"TIME_WAIT", "CLOSE"}


def parse_conntrack_line(line: str) -> Connection | None:
    """One line of `conntrack -L -o extended`, or None for a line that is not an entry carrying traffic.

    >>> parse_conntrack_line("ipv4 2 tcp 6 431999 ESTABLISHED src=10.0.0.1 dst=10.0.0.2 sport=40000 "
    ...     "dport=80 src=10.0.0.2 dst=10.0.0.1 sport=80 dport=40000 [ASSURED] mark=0 use=1").flow
    ('10.0.0.1', '10.0.0.2', 6, 80)
    """
    words = line.split()
    if len(words) < 6 or words[0] not in ("ipv4", "ipv6"):
        return None
    family = 4 if words[0] == "ipv4" else 6
    try:
        protocol = int(words[3])
    except ValueError:
        return None
    if protocol == TCP and words[5] in _FINISHED_TCP:
        return None
    tuples: list[dict[str, str]] = []
    zone = 0
    for word in words[5:]:
        key, sep, value = word.partition("=")
        if not sep:
            continue
        if key == "src":
            tuples.append({})
        if key == "zone":
            zone = int(value)
        elif tuples and key in ("src", "dst", "sport", "dport", "type", "code", "id"):
            tuples[-1].setdefault(key, value)
    if len(tuples) < 2:
        return None
    orig, reply = tuples[0], tuples[1]

    def port(t: dict[str, str], key: str) -> int | None:
        return int(t[key]) if key in t else None

    icmp = None
    if protocol in ICMP_PROTOCOLS:
        icmp = (int(orig.get("id", 0)), int(orig.get("type", 0)), int(orig.get("code", 0)))
    return Connection(
        family,
        protocol,
        orig["src"],
        orig["dst"],
        port(orig, "sport"),
        port(orig, "dport"),
        reply["src"],
        reply["dst"],
        port(reply, "sport"),
        port(reply, "dport"),
        icmp,
        zone,
    )


def list_connections() -> list[Connection]:
    """The conntrack entries of the current network namespace that carry traffic, IPv4 and IPv6."""
    out: list[Connection] = []
    for family in ("ipv4", "ipv6"):
        proc = subprocess.run(
            ["conntrack", "-L", "-f", family, "-o", "extended"], capture_output=True, text=True, timeout=60
        )
        if proc.returncode != 0:
            raise RuntimeError(f"conntrack -L failed: {proc.stderr.strip()}")
        for line in proc.stdout.splitlines():
            conn = parse_conntrack_line(line)
            if conn is not None:
                out.append(conn)
    return out


def delete_connections(connections: Iterable[Connection]) -> int:
    """Delete the entries; return how many were deleted (one already gone is not an error)."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    by_family: dict[int, list[Connection]] = {}
    for conn in connections:
        by_family.setdefault(conn.family, []).append(conn)
    deleted = 0
    for family, conns in sorted(by_family.items()):
        with Conntrack(nfgen_family=_nfgen_family(family)) as ct:
            for conn in conns:
                icmp_id, icmp_type, icmp_code = conn.icmp or (None, None, None)
                orig = NFCTAttrTuple(
                    family=_nfgen_family(family),
                    saddr=conn.src,
                    daddr=conn.dst,
                    proto=conn.protocol,
                    sport=conn.sport if conn.icmp is None else None,
                    dport=conn.dport if conn.icmp is None else None,
                    icmp_id=icmp_id,
                    icmp_type=icmp_type,
                    icmp_code=icmp_code,
                )
                extra = {"zone": conn.zone} if conn.zone else {}
                try:
                    ct.entry("del", tuple_orig=orig, **extra)
                except NetlinkError as exc:
                    if exc.code != errno.ENOENT:
                        raise
                    continue
                deleted += 1
    return deleted
