"""VXLAN's outer packets skip connection tracking (pure).

They are node-to-node transport: no policy, NAT or reply logic needs their state, and tracking
every encapsulated super-packet on both nodes cost about a third of VXLAN throughput here
(measured in the lab: ~10 against ~15 Gbit/s). Cilium does the same for its tunnel traffic.
The pod packets inside are tracked as usual once decapsulated."""

from __future__ import annotations

from tulle.kernelstate.net import VXLAN_PORT
from tulle.kernelstate.nft import NftChain, NftTable

RAW_PRIORITY = -300  # before conntrack (-200)


def tunnel_notrack_table() -> NftTable:
    rule = (
        {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": "udp"}},
        {"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": VXLAN_PORT}},
        {"notrack": None},
    )
    return NftTable(
        chains={
            "raw_prerouting": NftChain("raw_prerouting", (rule,), ("filter", "prerouting", RAW_PRIORITY, "accept")),
            "raw_output": NftChain("raw_output", (rule,), ("filter", "output", RAW_PRIORITY, "accept")),
        }
    )
