"""Connection-tracking entries as plain data: listed by dataplane/conntrack.py, judged by
policy/cutting.py, deleted by dataplane/conntrack.py again (pure)."""

from __future__ import annotations

from dataclasses import dataclass

from tulle.model.protocols import ICMP_PROTOCOLS


@dataclass(frozen=True)
class Connection:
    """A conntrack entry: its original and reply tuples (ports are None without ports)."""

    family: int  # 4 or 6
    protocol: int
    src: str
    dst: str
    sport: int | None
    dport: int | None
    reply_src: str
    reply_dst: str
    reply_sport: int | None
    reply_dport: int | None
    icmp: tuple[int, int, int] | None = None  # (id, type, code) of the original direction
    zone: int = 0

    @property
    def flow(self) -> tuple[str, str, int, int | None]:
        """(source, destination, protocol, destination port) as the forward hook saw the first packet.

        The source is the original one (SNAT happens after filtering); destination and port are
        the reply's source (the address after DNAT, e.g. a service's backend).
        """
        port = None if self.protocol in ICMP_PROTOCOLS else self.reply_sport
        return self.src, self.reply_src, self.protocol, port
