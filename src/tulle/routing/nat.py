"""Outgoing NAT for pods (pure): traffic from a pod to anything outside the pod pools leaves
with the node's address, as with Flannel's and Calico's natOutgoing. Pod to pod is never
translated, so policy on the far side sees the real pod address."""

from __future__ import annotations

from tulle.kernelstate.nft import NftChain, NftSet, NftTable, Rule
from tulle.model.pools import Pool

POOLS_SET = {4: "pools_v4", 6: "pools_v6"}


def _masquerade_rule(family: int) -> Rule:
    proto = "ip" if family == 4 else "ip6"
    return (
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": proto, "field": "saddr"}},
                "right": f"@{POOLS_SET[family]}",
            }
        },
        {
            "match": {
                "op": "!=",
                "left": {"payload": {"protocol": proto, "field": "daddr"}},
                "right": f"@{POOLS_SET[family]}",
            }
        },
        {"masquerade": None},
    )


def nat_table(pools: list[Pool]) -> NftTable:
    sets = {}
    for family, name in POOLS_SET.items():
        cidrs = [p.cidr for p in pools if p.family == family]
        elements = frozenset(((str(c.network_address), str(c.broadcast_address)),) for c in cidrs)
        sets[name] = NftSet(name, ("ipv4_addr" if family == 4 else "ipv6_addr",), ("interval",), None, elements)
    rules = tuple(_masquerade_rule(f) for f in (4, 6))
    chain = NftChain("postrouting", rules, ("nat", "postrouting", 100, "accept"))
    return NftTable(chains={"postrouting": chain}, sets=sets)
