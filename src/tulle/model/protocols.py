"""IP protocols: the one table of names and numbers, for every layer that names a protocol (pure).

Kubernetes names three protocols, all with ports (NetworkPolicy ports, container ports); trace,
the conntrack table and nftables also meet the two ICMPs, which have none.
"""

from __future__ import annotations

ICMP = 1
TCP = 6
UDP = 17
ICMPV6 = 58
SCTP = 132

KUBERNETES_PROTOCOLS = {"TCP": TCP, "UDP": UDP, "SCTP": SCTP}  # a port's `protocol` field
KUBERNETES_PROTOCOL_NAMES = tuple(sorted(KUBERNETES_PROTOCOLS))  # as the API server lists them: SCTP, TCP, UDP
PORT_PROTOCOLS = frozenset(KUBERNETES_PROTOCOLS.values())  # the protocols whose flows have ports
ICMP_PROTOCOLS = frozenset({ICMP, ICMPV6})

# Lower-case names as nft, conntrack and `tulle policy trace` spell them.
PROTOCOL_NUMBERS = {"tcp": TCP, "udp": UDP, "sctp": SCTP, "icmp": ICMP, "icmpv6": ICMPV6, "ipv6-icmp": ICMPV6}
PROTOCOL_NAMES = {TCP: "TCP", UDP: "UDP", SCTP: "SCTP", ICMP: "ICMP", ICMPV6: "ICMPv6"}  # as users read them
